"""The run report: ``report.json`` for machines, ``report.md`` for people."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from shared.atomic import write_json_atomic, write_text_atomic
from shared.metrics import TokenStats, macro_summary
from shared.tables import markdown_table
from shared.wire import EVAL_LEVELS


def level_metrics(per_user_stats: Mapping[str, Mapping[str, TokenStats]]) -> dict[str, Any]:
    """``user -> level -> stats`` into, per level, macro means with 95% CIs and per-user values."""
    levels: dict[str, Any] = {}
    for level in EVAL_LEVELS:
        ppl = {u: s[level].perplexity for u, s in per_user_stats.items() if level in s}
        acc = {u: s[level].token_accuracy for u, s in per_user_stats.items() if level in s}
        p, a = macro_summary(ppl), macro_summary(acc)
        levels[level] = {"perplexity": p["mean"], "perplexity_ci95": p["ci95"],
                         "token_accuracy": a["mean"], "token_accuracy_ci95": a["ci95"],
                         "users": p["n"],
                         "per_user": {u: {"perplexity": ppl[u], "token_accuracy": acc[u]}
                                      for u in sorted(ppl)}}
    return levels


def privacy_summary(epsilon_per_user: Mapping[str, float], *, dp: bool, delta: float,
                    budget: float) -> dict[str, Any]:
    if not dp:
        return {"dp": False, "note": "no DP", "delta": None, "epsilon_per_user": {},
                "epsilon_max": None}
    finite = [e for e in epsilon_per_user.values() if math.isfinite(e)]
    return {"dp": True, "accountant": "rdp", "delta": delta, "target_epsilon": budget,
            "epsilon_per_user": dict(sorted(epsilon_per_user.items())),
            "epsilon_max": max(finite) if finite else 0.0,
            "over_budget": sorted(u for u, e in epsilon_per_user.items() if e > budget)}


def write_report(run_dir: Path, report: dict[str, Any]) -> None:
    run_dir = Path(run_dir)
    write_json_atomic(run_dir / "report.json", report, sort_keys=False)
    write_text_atomic(run_dir / "report.md", render_markdown(report))


def levels_table(levels: Mapping[str, Any], label: str = "level") -> str:
    rows = [{label: name, "users": v["users"],
             "perplexity": f"{v['perplexity']:.2f} ± {v['perplexity_ci95']:.2f}",
             "token accuracy": f"{v['token_accuracy']:.3f} ± {v['token_accuracy_ci95']:.3f}"}
            for name, v in levels.items() if isinstance(v, Mapping) and "perplexity" in v]
    return markdown_table(rows)


COLD_START_TITLES = {
    "cold_start": "Cold-start users: new characters of plays that took part",
    "cold_start_held_out_plays": "Cold-start users: characters of held-out plays",
}


def user_level_lines(summary: Mapping[str, Any]) -> list[str]:
    """The "User-level privacy" section (central DP on the aggregates), or nothing."""
    if not summary.get("central_dp"):
        return []
    rows = [{"level": name, "users": v["population"],
             "expected clients per round": f"{v['expected_clients']:.2f}",
             "noise multiplier": v["noise_multiplier"],
             "noise std on the mean": f"{v['noise_std_on_mean']:.4g}",
             "rounds released": v["rounds_released"], "epsilon": f"{v['epsilon']:.3f}"}
            for name, v in summary["levels"].items()]
    users = [{"a user of": p, "epsilon (global + persona)": f"{e:.3f}"}
             for p, e in summary["user_epsilon"].items()]
    lines = ["", "## User-level privacy (central DP on the aggregates)", "",
             (f"Each client's change of each adapter clipped to L2 norm "
             f"{summary['clipping_norm']:g}, Gaussian noise on every aggregate's sum, divided "
             f"by the expected clients of that aggregate (DP-FedAvg, McMahan et al. 2018). "
             f"Epsilon at delta = {summary['delta']:g}, RDP accountant, sampling rate "
             f"q = {summary['sample_rate']:.4g} ({summary['sampling']}). The server is trusted "
             "with individual updates; this bounds what the released adapters reveal about "
             "any one user, on top of the record-level DP above."), "",
             markdown_table(rows), "", markdown_table(users), ""]
    for persona, note in summary["merged_into_global"].items():
        lines.append(f"- persona {persona}: {note} (its adapter is not released; its "
                     "members trained the global adapter only)")
    return lines


def user_check_summary(tallies: Mapping[str, tuple[int, int]],
                       holdout_fraction: float) -> dict[str, Any]:
    """``user -> (rounds checked, rounds kept)`` of the on-device user-adapter check, summed;
    the users who discarded at least one new adapter are named."""
    checked = sum(c for c, _ in tallies.values())
    kept = sum(k for _, k in tallies.values())
    return {"holdout_fraction": holdout_fraction, "users": len(tallies),
            "checked_rounds": checked, "kept_rounds": kept, "discarded_rounds": checked - kept,
            "users_with_a_discard": sorted(u for u, (c, k) in tallies.items() if k < c)}


def user_check_lines(summary: Mapping[str, Any] | None) -> list[str]:
    if not summary or not summary["checked_rounds"]:
        return []
    discarded = summary["users_with_a_discard"]
    return [f"User adapter, checked on each device against the last "
            f"{100 * summary['holdout_fraction']:g}% of its own training lines: kept in "
            f"{summary['kept_rounds']} of {summary['checked_rounds']} rounds; "
            + (f"discarded at least once by {len(discarded)} of {summary['users']} users "
               f"({', '.join(discarded)})." if discarded else "never discarded."), ""]


def render_markdown(report: Mapping[str, Any]) -> str:
    cfg = report["config"]
    privacy = report["privacy"]
    lines = ["# fedpersona run report", "",
             f"Model `{cfg['model']}`, {report.get('num_users', '?')} users, "
             f"{cfg['num-rounds']} rounds x {cfg['clients-per-round']} clients, personas by "
             f"{cfg['personas']}, LoRA r={cfg['lora-rank']} ({cfg['lora-scheme']}).", ""]
    if "levels" in report:
        lines += ["## Test metrics per level (macro over users, ± 95% CI)", "",
                  levels_table(report["levels"]), ""]
        lines += user_check_lines(report.get("user_adapter_check"))
    if "baselines" in report:
        lines += ["## Baselines", "",
                  "`local-only`: each user trains alone with the same DP setting and steps; "
                  "`centralized`: one non-private LoRA on all training data pooled (upper "
                  "reference).", "", levels_table(report["baselines"], "baseline"), ""]
    for key, title in COLD_START_TITLES.items():
        if key in report:
            cold = report[key]
            lines += [f"## {title}", "", levels_table(cold, "served by"), ""]
            if cold.get("kshot_matches_declared") is not None:
                lines += [f"The k-shot choice picked the declared persona for "
                          f"{100 * cold['kshot_matches_declared']:.0f}% of these users.", ""]
    if "discovery" in report:
        disc = report["discovery"]
        clusters = sorted({c for row in disc["contingency"].values() for c in row})
        rows = [{"genre": g, **{c: row.get(c, 0) for c in clusters}}
                for g, row in disc["contingency"].items()]
        ari = disc["adjusted_rand_index"]
        lines += [f"## Discovered personas (IFCA, K = {disc['k']})", "",
                  f"Adjusted Rand index against the genres: "
                  f"{ari:.3f} over {disc['users']} users." if ari is not None else
                  "No user chose a discovered persona.", "",
                  f"Privacy of the choice: {disc['note']}.", "", markdown_table(rows), ""]
    for name, path in report.get("plots", {}).items():
        lines += [f"![{name}]({path})", ""]
    lines += ["## Privacy", ""]
    if privacy["dp"]:
        lines.append(f"Record-level DP-SGD on each device: epsilon_max = "
                     f"{privacy['epsilon_max']:.3f} at delta = {privacy['delta']:g} "
                     f"(budget {privacy['target_epsilon']:g}, RDP accountant), over "
                     f"{len(privacy['epsilon_per_user'])} users.")
        if privacy["over_budget"]:
            lines.append(f"Over budget: {', '.join(privacy['over_budget'])}")
    else:
        lines.append("no DP: this run gives no formal privacy guarantee.")
    lines += user_level_lines(report.get("user_level_privacy", {}))
    lines += ["", "## Rounds", "", markdown_table([
        {"round": r["round"], "clients": r["clients"], "accepted": r["accepted"],
         "declined": r["declined"], "rejected": r["rejected"],
         "train loss (DP)": r["train_loss"], "update norm": r["update_norm"],
         "seconds": r["seconds"]}
        for r in report["rounds"]]), ""]
    lines += robustness_lines(cfg, report.get("rejected_updates", []))
    return "\n".join(lines)


def robustness_lines(cfg: Mapping[str, Any], rejected: list[Mapping[str, Any]]) -> list[str]:
    """Fault injection and robust aggregation when on, and every rejected update: round,
    user, reason."""
    lines = []
    if cfg.get("fault-fraction"):
        note = (f"Fault injection (simulation): fault-fraction {cfg['fault-fraction']:g} "
                f"of the users misbehave on purpose ({cfg['fault-kinds']}).")
        lines += ["", note, ""]
    if cfg.get("aggregation", "mean") != "mean" or cfg.get("clip-update-norm"):
        clip = cfg.get("clip-update-norm")
        lines += ["", "Robust aggregation: "
                  + (f"each update's change clipped to L2 norm {clip:g}; " if clip else "")
                  + (f"coordinate-wise trimmed mean, {cfg['trim-fraction']:g} dropped at each "
                     "end" if cfg.get("aggregation") == "trimmed-mean"
                     else "example-weighted mean") + ".", ""]
    if rejected:
        lines += ["## Rejected updates", "",
                  markdown_table(rejected, columns=["round", "client", "reason"]), ""]
    return lines
