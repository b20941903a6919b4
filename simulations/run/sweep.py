"""``fedpersona sweep``: the same simulation at several privacy budgets, one table and plot.

For each finite budget the noise multiplier is calibrated. With ``planned-rounds``
(the default) each device calibrates its own, every round, from the budget and
its history (:mod:`client.budget`), so the sweep only sets the budget. Without it
the sweep bisects the run's accountant so that the user with the fewest records
can take part in its expected number of rounds within the budget. ``inf`` runs
without DP. Everything else is identical across the runs.
"""

from __future__ import annotations

import math
from pathlib import Path

from client.budget import loss_noise
from shared.config import ConfigError, RunConfig
from shared.data.federation import load_run_population, training_users
from shared.privacy.accounting import epsilon as accounted_epsilon
from shared.protocol.wire import EVAL_LEVELS
from shared.util.atomic import write_json_atomic, write_text_atomic
from shared.util.tables import markdown_table


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


def calibrated_config(cfg: RunConfig, budget: float) -> RunConfig:
    """``cfg`` at ``budget``: the smallest noise multiplier with which the user with the
    fewest records can take part in its expected rounds within the budget.

    Each round spends ``local-steps + 1`` subsampled Gaussian steps (DP-SGD and the
    train-loss release) and, with discovered personas, one full-batch Gaussian
    step for the private choice in every round after the random start.
    """
    if math.isinf(budget):
        return cfg.replace(dp=False, target_epsilon=float("inf"))
    if cfg.planned_rounds:
        return cfg.replace(dp=True, target_epsilon=budget)
    users = training_users(load_run_population(cfg), cfg)
    smallest = min(u.num_train for u in users)
    rate = cfg.dp_sample_rate or min(1.0, cfg.batch_size / smallest)
    rounds = expected_participations(cfg, len(users))
    choosing = max(0, cfg.num_rounds - cfg.discovery_warmup - 1)  # rounds with a private choice
    choices = math.ceil(choosing * min(cfg.clients_per_round, len(users)) / len(users))
    fixed = [(cfg.selection_noise, 1.0, choices)] \
        if cfg.discovered_k and cfg.selection_noise and choices else []
    target = budget * 0.98

    def spent(sigma: float) -> float:
        loss = loss_noise(cfg, sigma)
        return accounted_epsilon([(sigma, rate, rounds * cfg.local_steps), (loss, rate, rounds),
                                  *fixed], delta=cfg.target_delta, accountant=cfg.accountant)

    low, high = 0.1, 1000.0
    if spent(high) > target:
        raise ConfigError(f"budget {budget:g} cannot be met: the private persona choice alone "
                          f"(selection-noise {cfg.selection_noise:g}) spends more")
    for _ in range(60):  # bisection: spent() falls as sigma grows
        middle = (low + high) / 2
        low, high = (middle, high) if spent(middle) > target else (low, middle)
    return cfg.replace(dp=True, target_epsilon=budget, noise_multiplier=high)


def sweep_rows(reports: dict[float, dict]) -> list[dict]:
    rows = []
    for epsilon, report in sorted(reports.items()):
        config = report["config"]
        row = {"epsilon": epsilon,
               "noise multiplier": ("calibrated per device" if config["dp"] and
                                    config.get("planned-rounds") else
                                    config["noise-multiplier"] if config["dp"] else 0.0),
               "epsilon spent (max)": report["privacy"]["epsilon_max"]
               if report["privacy"]["dp"] else float("inf")}
        row.update({level: report["levels"][level]["perplexity"] for level in EVAL_LEVELS})
        rows.append(row)
    return rows


def run_sweep_command(out: Path, epsilons_text: str, settings: list[str]) -> int:
    from simulations.run.plots import plot_privacy_utility
    from simulations.run.simulate import resolve_config, simulate

    epsilons = parse_epsilons(epsilons_text)
    base = resolve_config(None, settings)
    reports = {}
    for epsilon in epsilons:
        name = "eps-inf" if math.isinf(epsilon) else f"eps-{epsilon:g}"
        cfg = calibrated_config(base.replace(run_dir=str((out / name).resolve())), epsilon)
        print(f"== {name}: dp={cfg.dp} " + ("noise multiplier calibrated on each device"
                                             if cfg.planned_rounds and cfg.dp else
                                             f"noise-multiplier={cfg.noise_multiplier:.3f}"))
        reports[epsilon] = simulate(cfg, final_evaluation=False)
        if cfg.dp and not reports[epsilon]["privacy"]["epsilon_max"]:
            print(f"warning: at epsilon {epsilon:g} no device trained (each round's "
                  f"release did not fit the budget); its row is the untrained adapters")
    rows = sweep_rows(reports)
    plot_privacy_utility(rows, out / "privacy_utility.png")
    table = markdown_table(rows)
    write_json_atomic(out / "sweep.json", {"settings": settings, "rows": rows}, sort_keys=False)
    write_text_atomic(out / "sweep.md", "# Privacy-utility sweep (macro test perplexity)\n\n"
                      + table + "\n\n![privacy-utility](privacy_utility.png)\n")
    print(table)
    return 0
