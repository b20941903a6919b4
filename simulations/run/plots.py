"""PNG plots for a report (matplotlib, no display needed). Each bar and point shows its
value, each plot of several series has a legend, and the report's keys show in words
(:func:`server.report.label`)."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import Patch
from matplotlib.ticker import LogFormatter, MaxNLocator

from server.report import label

# a line plot labels every point up to this many; past it only each line's last point
# (the labels of more would overlap into a smear)
MAX_LABELLED_POINTS = 12
VALUE_FONT = 7


def wrapped(key: str, width: int = 24) -> str:
    """A key's label over several lines, to fit under a bar."""
    return textwrap.fill(label(key), width, break_long_words=False)


def label_points(ax, xs: Sequence[float], ys: Sequence[float], fmt: str = "{:.1f}",
                 color: str | None = None, below: bool = False) -> None:
    """Each finite point's value just above it, or below (every other line, so that two
    close lines' labels part), or only the last one past :data:`MAX_LABELLED_POINTS`."""
    points = [(x, y) for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
    if len(points) > MAX_LABELLED_POINTS:
        points = points[-1:]
    for x, y in points:
        ax.annotate(fmt.format(y), (x, y), textcoords="offset points",
                    xytext=(0, -6 if below else 5), va="top" if below else "bottom",
                    ha="center", fontsize=VALUE_FONT, color=color)


def readable_legend(ax) -> None:
    """A legend of the lines in words, beside the axes (where it hides no point); the lines
    keep their keys as labels (to look up)."""
    lines = [line for line in ax.get_lines() if not line.get_label().startswith("_")]
    ax.legend(lines, [textwrap.fill(label(line.get_label()), 28) for line in lines],
              fontsize=VALUE_FONT + 1, loc="upper left", bbox_to_anchor=(1.01, 1.0))


LEVEL_GROUPS = (("base model", "#999999"), ("federated levels", "#4477aa"),
                ("baselines", "#cc6677"))


def plot_levels(report: Mapping, path: Path) -> Path:
    """Macro perplexity (± 95% CI) of each level and baseline, one bar each, its value on
    top and its users under its name (levels and baselines may cover different users)."""
    entries = list(report["levels"].items())
    for name in ("local-only", "in-context-recent (base)", "in-context-recent (local-only)",
                 "served (federated)", "centralized"):
        if name in report.get("baselines", {}):
            entries.append((name, report["baselines"][name]))
    levels = len(report["levels"])
    fig, ax = plt.subplots(figsize=(max(8.0, 1.3 * len(entries)), 5))
    group_of = [0 if i == 0 else 1 if i < levels else 2 for i in range(len(entries))]
    for group, (name, color) in enumerate(LEVEL_GROUPS):
        xs = [i for i, g in enumerate(group_of) if g == group]
        if not xs:
            continue
        means = [entries[i][1]["perplexity"] for i in xs]
        errors = [entries[i][1].get("perplexity_ci95", 0.0) for i in xs]
        ax.bar(xs, means, yerr=errors, capsize=4, color=color, label=name)
        for x, mean, error in zip(xs, means, errors):
            ax.annotate(f"{mean:.1f}", (x, mean + error), textcoords="offset points",
                        xytext=(0, 3), ha="center", fontsize=VALUE_FONT + 1)
    ax.set_xticks(range(len(entries)),
                  [wrapped(n, 16) + (f"\n({v['users']} users)" if "users" in v else "")
                   for n, v in entries], fontsize=VALUE_FONT + 1)
    ax.margins(y=0.1)
    ax.set_ylabel("test perplexity (macro over users;\nlower is better)")
    ax.set_title("Perplexity per level (lower is better)")
    ax.legend(fontsize=VALUE_FONT + 1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_improvement(report: Mapping, path: Path, *, reference: str = "global",
                     level: str = "global+persona+user") -> Path:
    """Per-user relative perplexity change of ``level`` against ``reference``: a histogram,
    bins edged and each bar's count of users on it."""
    ref = report["levels"][reference]["per_user"]
    new = report["levels"][level]["per_user"]
    changes = [100.0 * (new[u]["perplexity"] / ref[u]["perplexity"] - 1.0) for u in new
               if u in ref and math.isfinite(new[u]["perplexity"] or math.nan)]
    fig, ax = plt.subplots(figsize=(7, 4))
    low, high = (min(changes), max(changes)) if changes else (0.0, 0.0)
    if high - low < 1e-6:  # numpy cannot cut a (near) zero-width range into several bins
        low, high = low - 1.0, high + 1.0
    counts, _, bars = ax.hist(changes, bins=min(20, max(5, len(changes) // 2)),
                              range=(low, high), color="#4477aa", edgecolor="black",
                              linewidth=0.7)
    ax.bar_label(bars, labels=[f"{c:.0f}" if c else "" for c in counts],
                 fontsize=VALUE_FONT + 1)
    ax.axvline(0.0, color="black", linewidth=1)
    ax.margins(y=0.1)
    ax.set_xlabel(textwrap.fill(f"perplexity change of {label(level)} vs {label(reference)} "
                                "(%; below 0 is better)", 70))
    ax.set_ylabel("users")
    better = sum(1 for c in changes if c < 0)
    ax.set_title(f"{better} of {len(changes)} users improve")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


GAIN_COLORS = (("the federation helps", "#4477aa"), ("the federation hurts", "#cc6677"))


def plot_federation_gain(gain: Mapping, path: Path, title: str = "Federation gain") -> Path:
    """One horizontal bar per user: the baseline's perplexity minus the federated one
    (right of zero: the federation helps), sorted, the largest gain on top, its value at
    its end."""
    per_user = sorted(gain["per_user"].items(), key=lambda kv: kv[1]["gain"])
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.3 * len(per_user) + 1.6)))
    values = [v["gain"] for _, v in per_user]
    helps = [v > 0 for v in values]
    (_, helps_color), (_, hurts_color) = GAIN_COLORS
    bars = ax.barh(range(len(per_user)), values,
                   color=[helps_color if h else hurts_color for h in helps])
    ax.bar_label(bars, labels=[f"{v:+.2f}" for v in values], padding=3, fontsize=VALUE_FONT)
    ax.set_yticks(range(len(per_user)), [u for u, _ in per_user])
    ax.axvline(0.0, color="black", linewidth=1)
    ax.margins(x=0.15)
    ax.set_xlabel(textwrap.fill(f"perplexity of {label(gain['baseline'])} minus "
                                f"{label(gain['level'])} (right of 0: the federation helps)",
                                60))
    ax.set_title(f"{title}: helps {gain['helped']} of {gain['users']} users")
    shown = [Patch(color=color, label=name) for (name, color), present
             in zip(GAIN_COLORS, (True in helps, False in helps)) if present]
    if shown:
        ax.legend(handles=shown, fontsize=VALUE_FONT + 1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_rounds(report: Mapping, path: Path,
                levels: Sequence[str] = ("base", "global", "global+persona",
                                         "global+persona+user")) -> Path:
    """Left: the released (DP-noised) train loss per round. Right: the macro test perplexity
    of each level on the fixed users after each round (log scale; a round without the
    measurement is a gap). The points carry their values."""
    rounds = report["rounds"]
    xs = [r["round"] for r in rounds]
    fig, (loss_ax, ppl_ax) = plt.subplots(1, 2, figsize=(13, 4.6))
    losses = [r["train_loss"] for r in rounds]
    loss_ax.plot(xs, losses, marker="o", color="#4477aa")
    label_points(loss_ax, xs, losses, "{:.3f}", color="#4477aa")
    loss_ax.set(xlabel="round", ylabel="train loss (DP-noised release; lower is better)",
                title="DP train loss per round")
    for i, level in enumerate(levels):
        ys = [r.get("eval", {}).get(level, math.nan) for r in rounds]
        (line,) = ppl_ax.plot(xs, ys, marker="o", label=level)
        label_points(ppl_ax, xs, ys, color=line.get_color(), below=i % 2 == 1)
    users = len(report.get("round_eval", {}).get("users", ()))
    ppl_ax.set(xlabel="round", ylabel="test perplexity (macro; lower is better)", yscale="log",
               title=f"Held-out perplexity on {users} fixed users")
    ppl_ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
    ppl_ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))  # plain numbers
    readable_legend(ppl_ax)
    for ax in (loss_ax, ppl_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.margins(y=0.12)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_privacy_utility(rows: Sequence[Mapping], path: Path,
                         levels: Sequence[str] = ("base", "global", "global+persona",
                                                  "global+persona+user")) -> Path:
    """Macro perplexity of each level against the epsilon budget (inf = no DP, at the
    right), each point with its value."""
    finite = [r["epsilon"] for r in rows if math.isfinite(r["epsilon"])]
    right = (max(finite) * 1.6 if finite else 1.0)
    xs = [r["epsilon"] if math.isfinite(r["epsilon"]) else right for r in rows]
    fig, ax = plt.subplots(figsize=(9.5, 4.5))
    for i, level in enumerate(levels):
        ys = [r[level] for r in rows]
        (line,) = ax.plot(xs, ys, marker="o", label=level)
        label_points(ax, xs, ys, color=line.get_color(), below=i % 2 == 1)
    ax.set_xticks(xs, [f"{r['epsilon']:g}" if math.isfinite(r["epsilon"]) else "no DP"
                       for r in rows])
    ax.set_xlabel("per-user epsilon budget (delta fixed)")
    ax.set_ylabel("test perplexity (macro; lower is better)")
    ax.set_title("Privacy-utility trade-off")
    ax.margins(y=0.12)
    readable_legend(ax)
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
    from simulations.audit.stats import roc_auc, roc_points

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
        # a curve of one point per threshold: its AUC stands for its values
        roc_ax.plot(np.maximum(fpr, 1e-4), np.maximum(tpr, 1e-4),
                    label=f"{name} (AUC {roc_auc(members, others):.3f})")
        groups = canary_exposure(scores)["by_copies"]
        xs = np.arange(len(groups)) + i * width
        bars = exp_ax.bar(xs, [g["global+persona/mean_rank_exposure"] for g in groups.values()],
                          width=width, label=name)
        exp_ax.bar_label(bars, fmt="%.2f", fontsize=VALUE_FONT)
        exp_ax.set_xticks(np.arange(len(groups)) + width * (len(run_dirs) - 1) / 2,
                          [f"{c} copies" for c in groups])
    grid = np.logspace(-4, 0, 50)
    roc_ax.plot(grid, grid, "k:", label="chance")
    roc_ax.set(xscale="log", yscale="log", xlabel="false positive rate",
               ylabel="true positive rate", title="Membership inference (reference attack)")
    roc_ax.legend()
    exp_ax.axhline(1 / math.log(2), color="k", linestyle=":", label="chance")
    exp_ax.set(ylabel="mean rank exposure (bits; lower is more private)",
               title="Canary exposure, global+persona")
    exp_ax.margins(y=0.1)
    exp_ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
