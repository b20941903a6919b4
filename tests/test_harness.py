"""The evaluation harness, sweep calibration, comparisons and plots."""

import math

import pytest
from helpers import small_config

from shared.config import ConfigError
from shared.metrics import TokenStats
from shared.privacy import epsilon
from simulations import evaluate as evaluation
from simulations.compare import parse_variant, run_compare_command
from simulations.plots import plot_improvement, plot_levels, plot_privacy_utility
from simulations.sweep import calibrated_config, expected_participations, parse_epsilons

PNG = b"\x89PNG\r\n\x1a\n"


def test_parse_epsilons():
    assert parse_epsilons("1, 4,8,inf") == [1.0, 4.0, 8.0, math.inf]
    for bad in ("", "one", "0,4", "-1"):
        with pytest.raises(ConfigError):
            parse_epsilons(bad)


def test_expected_participations():
    cfg = small_config_free(num_rounds=5, clients_per_round=8)

    assert expected_participations(cfg, 24) == 2  # ceil(5 * 8 / 24)
    assert expected_participations(cfg, 4) == 5  # every user every round


def small_config_free(**changes):
    from shared.config import RunConfig

    return RunConfig(model="tiny", **changes)


def test_calibrated_noise_fits_the_smallest_user_in_budget(tmp_path):
    cfg = small_config(tmp_path, num_rounds=3, clients_per_round=2, batch_size=4)

    tuned = calibrated_config(cfg, 4.0)
    no_dp = calibrated_config(cfg, math.inf)

    rate = 4 / 20  # every user of the small population has 20 records
    steps = expected_participations(cfg, 3) * (cfg.local_steps + 1)
    spent = epsilon([(tuned.noise_multiplier, rate, steps)], delta=cfg.target_delta)
    assert tuned.dp and tuned.target_epsilon == 4.0
    assert 3.6 <= spent <= 4.0
    assert not no_dp.dp and no_dp.target_epsilon == math.inf


def test_variants_parse_and_duplicates_are_refused(tmp_path):
    assert parse_variant("ffa:lora-scheme=ffa,seed=1") == ("ffa", ["lora-scheme=ffa", "seed=1"])
    with pytest.raises(ConfigError):
        parse_variant("no-colon")
    with pytest.raises(ConfigError, match="distinct"):
        run_compare_command(tmp_path, ["a:seed=1", "a:seed=2"], ["model=tiny"])
    assert not any(tmp_path.iterdir())  # refused before anything ran


def test_missing_report_is_a_clear_error(tmp_path):
    with pytest.raises(evaluation.EvaluationError, match="report.json: missing"):
        evaluation.load_run_config(tmp_path)


def test_summarize_macro_averages_users():
    stats = {"u1": TokenStats(nll_sum=2 * math.log(4.0), correct=1, tokens=2),
             "u2": TokenStats(nll_sum=2 * math.log(2.0), correct=2, tokens=2)}

    summary = evaluation.summarize(stats)

    assert summary["perplexity"] == pytest.approx(3.0)  # mean of 4 and 2
    assert summary["token_accuracy"] == pytest.approx(0.75)
    assert summary["users"] == 2 and summary["per_user"]["u1"]["perplexity"] == pytest.approx(4)


def test_evaluation_refuses_a_cold_start_user_seen_in_training(tmp_path, monkeypatch):
    import json

    from shared.userdata import PopulationEntry

    cfg = small_config(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / "report.json").write_text(json.dumps({"config": cfg.to_flower()}))
    leaked = PopulationEntry("u1", "cold-start-character", "a", 20, 4)
    monkeypatch.setattr(evaluation, "training_users", lambda population, cfg: (leaked,))
    monkeypatch.setattr(evaluation, "RunEvaluator", lambda run_dir, cfg: None)
    monkeypatch.setattr(evaluation, "_local_only", lambda *a: TokenStats(1.0, 1, 1))
    monkeypatch.setattr(evaluation, "_centralized", lambda *a: {"u1": TokenStats(1.0, 1, 1)})
    monkeypatch.setattr(evaluation, "load_run_population", _population_with(leaked))

    with pytest.raises(evaluation.EvaluationError, match="u1"):
        evaluation.evaluate_run(run, include_levels=False, progress=lambda _: None)


def _population_with(entry):
    from pathlib import Path

    from shared.userdata import Population

    return lambda cfg: Population(root=Path("/nonexistent"), users=(entry,), meta={})


def _report():
    levels = {name: {"perplexity": p, "perplexity_ci95": 1.0,
                     "per_user": {"u1": {"perplexity": p}, "u2": {"perplexity": p * 1.1}}}
              for name, p in (("base", 200.0), ("global", 180.0), ("global+persona", 170.0),
                              ("global+persona+user", 120.0))}
    return {"levels": levels, "baselines": {"local-only": {"perplexity": 190.0},
                                            "centralized": {"perplexity": 100.0}}}


def test_plots_are_png_files(tmp_path):
    rows = [{"epsilon": e, "base": 200.0, "global": 190.0 - e, "global+persona": 185.0 - e,
             "global+persona+user": 150.0 - e} for e in (1.0, 8.0, math.inf)]
    rows[-1] = {**rows[-1], "global": 170.0, "global+persona": 160.0,
                "global+persona+user": 120.0}

    paths = [plot_levels(_report(), tmp_path / "a.png"),
             plot_improvement(_report(), tmp_path / "b.png"),
             plot_privacy_utility(rows, tmp_path / "c.png")]

    for path in paths:
        data = path.read_bytes()
        assert data.startswith(PNG) and len(data) > 5000
