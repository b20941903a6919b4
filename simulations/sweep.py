"""``fedpersona sweep``: the same simulation at several privacy budgets, one table and plot.

For each finite budget the noise multiplier is calibrated (Opacus
``get_noise_multiplier``, RDP) so that the user with the fewest records can
take part in its expected number of rounds within the budget; ``inf`` runs
without DP. Everything else is identical across the runs.
"""

from __future__ import annotations

import math
from pathlib import Path

from opacus.accountants.utils import get_noise_multiplier

from shared.atomic import write_json_atomic, write_text_atomic
from shared.config import ConfigError, RunConfig
from shared.federation import load_run_population, training_users
from shared.tables import markdown_table
from shared.wire import EVAL_LEVELS


def parse_epsilons(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--epsilons must be numbers or inf, got {text!r}") from None
    if not values or any(not v > 0 for v in values):
        raise ConfigError(f"--epsilons must be positive numbers or inf, got {text!r}")
    return values


def expected_participations(cfg: RunConfig, num_users: int) -> int:
    return max(1, math.ceil(cfg.num_rounds * min(cfg.clients_per_round, num_users) / num_users))


def calibrated_config(cfg: RunConfig, epsilon: float) -> RunConfig:
    """``cfg`` at budget ``epsilon``: noise chosen so the smallest user fits its rounds."""
    if math.isinf(epsilon):
        return cfg.replace(dp=False, target_epsilon=float("inf"))
    users = training_users(load_run_population(cfg), cfg)
    smallest = min(u.num_train for u in users)
    rate = min(1.0, cfg.batch_size / smallest)
    steps = expected_participations(cfg, len(users)) * (cfg.local_steps + 1)
    sigma = get_noise_multiplier(target_epsilon=epsilon * 0.98, target_delta=cfg.target_delta,
                                 sample_rate=rate, steps=steps, accountant="rdp")
    return cfg.replace(dp=True, target_epsilon=epsilon, noise_multiplier=float(sigma))


def sweep_rows(reports: dict[float, dict]) -> list[dict]:
    rows = []
    for epsilon, report in sorted(reports.items()):
        row = {"epsilon": epsilon,
               "noise multiplier": report["config"]["noise-multiplier"]
               if report["config"]["dp"] else 0.0,
               "epsilon spent (max)": report["privacy"]["epsilon_max"]
               if report["privacy"]["dp"] else float("inf")}
        row.update({level: report["levels"][level]["perplexity"] for level in EVAL_LEVELS})
        rows.append(row)
    return rows


def run_sweep_command(out: Path, epsilons_text: str, settings: list[str]) -> int:
    from simulations.plots import plot_privacy_utility
    from simulations.simulate import resolve_config, simulate

    epsilons = parse_epsilons(epsilons_text)
    base = resolve_config(None, settings)
    reports = {}
    for epsilon in epsilons:
        name = "eps-inf" if math.isinf(epsilon) else f"eps-{epsilon:g}"
        cfg = calibrated_config(base.replace(run_dir=str((out / name).resolve())), epsilon)
        print(f"== {name}: dp={cfg.dp} noise-multiplier={cfg.noise_multiplier:.3f}")
        reports[epsilon] = simulate(cfg, final_evaluation=False)
    rows = sweep_rows(reports)
    plot_privacy_utility(rows, out / "privacy_utility.png")
    table = markdown_table(rows)
    write_json_atomic(out / "sweep.json", {"settings": settings, "rows": rows}, sort_keys=False)
    write_text_atomic(out / "sweep.md", "# Privacy-utility sweep (macro test perplexity)\n\n"
                      + table + "\n\n![privacy-utility](privacy_utility.png)\n")
    print(table)
    return 0
