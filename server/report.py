"""The run report: ``report.json`` for machines, ``report.md`` for people."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from shared.atomic import write_text_atomic
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
    write_text_atomic(run_dir / "report.json",
                      json.dumps(_finite(report), indent=1, default=str) + "\n")
    write_text_atomic(run_dir / "report.md", render_markdown(report))


def levels_table(levels: Mapping[str, Any]) -> str:
    rows = [{"level": name, "users": v["users"],
             "perplexity": f"{v['perplexity']:.2f} ± {v['perplexity_ci95']:.2f}",
             "token accuracy": f"{v['token_accuracy']:.3f} ± {v['token_accuracy_ci95']:.3f}"}
            for name, v in levels.items()]
    return markdown_table(rows)


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
    lines += ["", "## Rounds", "", markdown_table([
        {"round": r["round"], "clients": r["clients"], "accepted": r["accepted"],
         "declined": r["declined"], "rejected": r["rejected"],
         "mean update norm": r["update_norm"], "seconds": r["seconds"]}
        for r in report["rounds"]]), ""]
    if report.get("rejected_updates"):
        lines += ["## Rejected updates", "", markdown_table(report["rejected_updates"]), ""]
    return "\n".join(lines)


def _finite(value: Any) -> Any:
    """NaN and Inf are not JSON: they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
