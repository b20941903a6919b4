"""PNG plots for a report (matplotlib, no display needed)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import LogFormatter, MaxNLocator


def plot_levels(report: Mapping, path: Path) -> Path:
    """Macro perplexity (± 95% CI) of each level and baseline, one bar each."""
    entries = list(report["levels"].items())
    for name in ("local-only", "in-context-recent (base)", "in-context-recent (local-only)",
                 "served (federated)", "centralized"):
        if name in report.get("baselines", {}):
            entries.append((name, report["baselines"][name]))
    names = [n for n, _ in entries]
    means = [v["perplexity"] for _, v in entries]
    errors = [v.get("perplexity_ci95", 0.0) for _, v in entries]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(range(len(names)), means, yerr=errors, capsize=4,
           color=["#999999"] + ["#4477aa"] * (len(report["levels"]) - 1)
           + ["#cc6677"] * (len(names) - len(report["levels"])))
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.set_ylabel("test perplexity (macro over users)")
    ax.set_title("Perplexity per level (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_improvement(report: Mapping, path: Path, *, reference: str = "global",
                     level: str = "global+persona+user") -> Path:
    """Per-user relative perplexity change of ``level`` against ``reference``."""
    ref = report["levels"][reference]["per_user"]
    new = report["levels"][level]["per_user"]
    changes = [100.0 * (new[u]["perplexity"] / ref[u]["perplexity"] - 1.0) for u in new
               if u in ref and math.isfinite(new[u]["perplexity"] or math.nan)]
    fig, ax = plt.subplots(figsize=(7, 4))
    low, high = (min(changes), max(changes)) if changes else (0.0, 0.0)
    if high - low < 1e-6:  # numpy cannot cut a (near) zero-width range into several bins
        low, high = low - 1.0, high + 1.0
    ax.hist(changes, bins=min(20, max(5, len(changes) // 2)), range=(low, high),
            color="#4477aa")
    ax.axvline(0.0, color="black", linewidth=1)
    ax.set_xlabel(f"perplexity change of {level} vs {reference} (%)")
    ax.set_ylabel("users")
    better = sum(1 for c in changes if c < 0)
    ax.set_title(f"{better} of {len(changes)} users improve")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_federation_gain(gain: Mapping, path: Path, title: str = "Federation gain") -> Path:
    """One horizontal bar per user: the baseline's perplexity minus the federated one
    (right of zero: the federation helps), sorted, the largest gain on top."""
    per_user = sorted(gain["per_user"].items(), key=lambda kv: kv[1]["gain"])
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.3 * len(per_user) + 1.2)))
    values = [v["gain"] for _, v in per_user]
    ax.barh(range(len(per_user)), values,
            color=["#4477aa" if v > 0 else "#cc6677" for v in values])
    ax.set_yticks(range(len(per_user)), [u for u, _ in per_user])
    ax.axvline(0.0, color="black", linewidth=1)
    ax.set_xlabel(f"perplexity of {gain['baseline']} minus {gain['level']}")
    ax.set_title(f"{title}: helps {gain['helped']} of {gain['users']} users")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_rounds(report: Mapping, path: Path,
                levels: Sequence[str] = ("base", "global", "global+persona",
                                         "global+persona+user")) -> Path:
    """Left: the released (DP-noised) train loss per round. Right: the macro test perplexity
    of each level on the fixed users after each round (log scale; a round without the
    measurement is a gap)."""
    rounds = report["rounds"]
    xs = [r["round"] for r in rounds]
    fig, (loss_ax, ppl_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    loss_ax.plot(xs, [r["train_loss"] for r in rounds], marker="o", color="#4477aa")
    loss_ax.set(xlabel="round", ylabel="train loss (DP-noised release)",
                title="DP train loss per round")
    for level in levels:
        ppl_ax.plot(xs, [r.get("eval", {}).get(level, math.nan) for r in rounds], marker="o",
                    label=level)
    users = len(report.get("round_eval", {}).get("users", ()))
    ppl_ax.set(xlabel="round", ylabel="test perplexity (macro)", yscale="log",
               title=f"Held-out perplexity on {users} fixed users")
    ppl_ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
    ppl_ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))  # plain numbers
    ppl_ax.legend()
    for ax in (loss_ax, ppl_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_privacy_utility(rows: Sequence[Mapping], path: Path,
                         levels: Sequence[str] = ("base", "global", "global+persona",
                                                  "global+persona+user")) -> Path:
    """Macro perplexity of each level against the epsilon budget (inf = no DP, at the right)."""
    finite = [r["epsilon"] for r in rows if math.isfinite(r["epsilon"])]
    right = (max(finite) * 1.6 if finite else 1.0)
    xs = [r["epsilon"] if math.isfinite(r["epsilon"]) else right for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    for level in levels:
        ax.plot(xs, [r[level] for r in rows], marker="o", label=level)
    ax.set_xticks(xs, [f"{r['epsilon']:g}" if math.isfinite(r["epsilon"]) else "no DP"
                       for r in rows])
    ax.set_xlabel("per-user epsilon budget (delta fixed)")
    ax.set_ylabel("test perplexity (macro)")
    ax.set_title("Privacy-utility trade-off")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_audit(run_dirs: Sequence[Path], path: Path) -> Path:
    """Left: ROC of the reference attack on global+persona, one curve per run (log
    axes, where the low-FPR regime shows). Right: canary exposure by copies."""
    import json

    import numpy as np

    from simulations.audit.attacks import attack_scores, canary_exposure
    from simulations.audit.scores import scores_path
    from simulations.audit.stats import roc_points

    fig, (roc_ax, exp_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.8 / max(len(run_dirs), 1)
    for i, run_dir in enumerate(run_dirs):
        scores = json.loads(scores_path(run_dir).read_text())
        name = Path(run_dir).name
        records = scores["records"]
        members = attack_scores([r for r in records if r["member"]], "global+persona",
                                "reference")
        others = attack_scores([r for r in records if not r["member"]], "global+persona",
                               "reference")
        fpr, tpr = roc_points(members, others)
        roc_ax.plot(np.maximum(fpr, 1e-4), np.maximum(tpr, 1e-4), label=name)
        groups = canary_exposure(scores)["by_copies"]
        xs = np.arange(len(groups)) + i * width
        exp_ax.bar(xs, [g["global+persona/mean_rank_exposure"] for g in groups.values()],
                   width=width, label=name)
        exp_ax.set_xticks(np.arange(len(groups)) + width * (len(run_dirs) - 1) / 2,
                          [f"{c} copies" for c in groups])
    grid = np.logspace(-4, 0, 50)
    roc_ax.plot(grid, grid, "k:", label="chance")
    roc_ax.set(xscale="log", yscale="log", xlabel="false positive rate",
               ylabel="true positive rate", title="Membership inference (reference attack)")
    roc_ax.legend()
    exp_ax.axhline(1 / math.log(2), color="k", linestyle=":", label="chance")
    exp_ax.set(ylabel="mean rank exposure (bits)", title="Canary exposure, global+persona")
    exp_ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
