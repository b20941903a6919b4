"""``fedpersona compare``: several simulations side by side, one table.

Each variant is ``name:key=value,key=value`` on top of the same base settings,
so the variants differ only in what they name. Runs go one after another (on a
2-core machine parallel runs would only slow each other down); each writes its
own run directory under ``--out``, and the comparison is written as
``compare.json`` and ``compare.md``.
"""

from __future__ import annotations

from pathlib import Path

from shared.config import ConfigError
from shared.protocol.wire import EVAL_LEVELS
from shared.util.atomic import write_json_atomic, write_text_atomic
from shared.util.tables import markdown_table


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, sep, settings = text.partition(":")
    if not sep or not name.strip():
        raise ConfigError(f"variant {text!r} is not of the form name:key=value,key=value")
    return name.strip(), [s for s in settings.split(",") if s.strip()]


def comparison_rows(reports: dict[str, dict]) -> list[dict]:
    rows = []
    for name, report in reports.items():
        row = {"variant": name}
        for level in EVAL_LEVELS:
            row[f"{level} ppl"] = report["levels"][level]["perplexity"]
        privacy = report["privacy"]
        row["epsilon max"] = privacy["epsilon_max"] if privacy["dp"] else "no DP"
        user_level = report.get("user_level_privacy", {})  # central DP: the worst user's
        row["user-level epsilon"] = (max(user_level["user_epsilon"].values())
                                     if user_level.get("central_dp") else "off")
        row["minutes"] = round(report["seconds"] / 60, 1)
        rows.append(row)
    return rows


def run_compare_command(out: Path, variants: list[str], settings: list[str]) -> int:
    from simulations.run.simulate import resolve_config, simulate

    parsed = [parse_variant(v) for v in variants]
    names = [n for n, _ in parsed]
    if len(set(names)) != len(names):
        raise ConfigError(f"variant names must be distinct: {', '.join(names)}")
    configs = {name: resolve_config(out / name, settings + extra) for name, extra in parsed}
    reports = {}
    for name, cfg in configs.items():
        print(f"== variant {name}")
        reports[name] = simulate(cfg, final_evaluation=False)
    rows = comparison_rows(reports)
    table = markdown_table(rows)
    write_json_atomic(out / "compare.json",
                      {"settings": settings, "variants": dict(parsed), "rows": rows},
                      sort_keys=False)
    write_text_atomic(out / "compare.md", "# Comparison (macro perplexity per level)\n\n"
                      + table + "\n")
    print(table)
    return 0
