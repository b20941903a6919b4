"""Privacy sweeps (simulations.run.sweep) and variant comparisons (simulations.run.compare): parsing,
noise calibration against the accountant, and the commands with the simulation stubbed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from helpers import FIXED_NOISE, text_records, write_small_population

import simulations.run.simulate as simulate_module
from shared.config import ConfigError, RunConfig
from shared.data.userdata import Profile, UserData, write_population
from shared.privacy.accounting import PrivacyLedger, epsilon
from shared.protocol.wire import EVAL_LEVELS
from simulations.run.compare import comparison_rows, parse_variant, run_compare_command
from simulations.run.sweep import (
    calibrated_config,
    expected_participations,
    parse_epsilons,
    run_sweep_command,
    sweep_rows,
)

# -- parse_epsilons ----------------------------------------------------------------------------


def test_parse_epsilons_reads_numbers_and_inf():
    assert parse_epsilons("1,4,8,inf") == [1.0, 4.0, 8.0, math.inf]
    assert parse_epsilons(" 0.5 , 2,, inf ") == [0.5, 2.0, math.inf]


@pytest.mark.parametrize("text", ["", " , ", "one,two", "1;4", "4,eight"])
def test_parse_epsilons_rejects_text_that_is_not_numbers(text):
    with pytest.raises(ConfigError, match="epsilons"):
        parse_epsilons(text)


@pytest.mark.parametrize("text", ["0", "1,0", "-1", "4,-inf", "nan"])
def test_parse_epsilons_rejects_zero_negative_and_nan(text):
    with pytest.raises(ConfigError, match="positive"):
        parse_epsilons(text)


# -- expected participations -------------------------------------------------------------------

@pytest.mark.parametrize("rounds, per_round, users, expected", [
    (5, 8, 24, 2),  # ceil(5 * 8 / 24) = ceil(1.67)
    (5, 8, 4, 5),  # fewer users than slots: everyone, every round
    (3, 3, 10, 1),  # ceil(0.9)
    (1, 1, 100, 1),  # at least one
    (10, 4, 8, 5),  # exactly 5
])
def test_expected_participations_on_hand_values(rounds, per_round, users, expected):
    cfg = RunConfig(model="tiny", num_rounds=rounds, clients_per_round=per_round)

    assert expected_participations(cfg, users) == expected


# -- calibration -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_population(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep") / "pop"
    write_small_population(root)  # three users with 20 training records each
    return root


def test_infinite_budget_turns_dp_off_and_changes_nothing_else(small_population):
    cfg = RunConfig(model="tiny", data_dir=str(small_population), max_users=0)

    tuned = calibrated_config(cfg, math.inf)

    assert tuned.dp is False and tuned.target_epsilon == math.inf
    assert tuned.replace(dp=cfg.dp, target_epsilon=cfg.target_epsilon) == cfg


BUDGETS = (1.0, 4.0, 8.0)


@pytest.fixture(scope="module")
def calibrated(small_population):
    """5 rounds of 8 clients over 3 users -> every round; 4 steps + 1 release, the fixed
    noise the sweep calibrates (with planned-rounds the devices calibrate their own)."""
    cfg = RunConfig(model="tiny", data_dir=str(small_population), max_users=0, local_steps=4,
                    **FIXED_NOISE)
    return cfg, {budget: calibrated_config(cfg, budget) for budget in BUDGETS}


@pytest.mark.parametrize("budget", BUDGETS)
def test_calibrated_noise_spends_just_under_the_budget(calibrated, budget):
    # Arrange / Act (the fixture calibrates)
    cfg, tuned_by_budget = calibrated
    tuned = tuned_by_budget[budget]

    # Assert
    participations = expected_participations(cfg, 3)
    steps = participations * (cfg.local_steps + 1)
    rate = cfg.batch_size / 20
    spent = epsilon([(tuned.noise_multiplier, rate, steps)], delta=cfg.target_delta)
    assert participations == 5
    assert tuned.dp is True and tuned.target_epsilon == budget
    assert 0.9 * budget <= spent <= budget
    assert tuned.replace(dp=cfg.dp, target_epsilon=cfg.target_epsilon,
                         noise_multiplier=cfg.noise_multiplier) == cfg


def test_calibrated_noise_is_larger_for_a_smaller_budget(calibrated):
    _, tuned_by_budget = calibrated

    sigmas = [tuned_by_budget[b].noise_multiplier for b in BUDGETS]

    assert sigmas[0] > sigmas[1] > sigmas[2] > 0


def test_calibration_is_at_the_rate_of_the_user_with_fewest_records(tmp_path):
    # Arrange: 10, 20 and 40 records; the 10-record user samples at the highest rate
    write_population(tmp_path / "pop", [
        ("train", UserData(Profile(f"u{n}", "a"), text_records(n))) for n in (40, 10, 20)],
        {"personas": ["a"]})
    cfg = RunConfig(model="tiny", data_dir=str(tmp_path / "pop"), max_users=0, num_rounds=4,
                    clients_per_round=3, local_steps=3, batch_size=4, **FIXED_NOISE)

    # Act
    tuned = calibrated_config(cfg, 4.0)

    # Assert: the smallest user, through the real ledger, affords all its rounds
    ledger = PrivacyLedger(target_epsilon=4.0, target_delta=cfg.target_delta)
    entry = (tuned.noise_multiplier, 4 / 10, cfg.local_steps + 1)
    for _ in range(expected_participations(cfg, 3)):
        assert ledger.can_afford(entry)
        ledger.record(entry)
    assert ledger.epsilon >= 0.9 * 4.0


def test_calibration_under_discovered_personas_leaves_room_for_the_private_choice(
        small_population):
    # Arrange: 3 users, 3 clients a round: everyone in rounds 1..3; round 1 is the free
    # random start, rounds 2 and 3 each add the private choice
    cfg = RunConfig(model="tiny", data_dir=str(small_population), max_users=0,
                    personas="discovered:2", discovery_warmup=0, num_rounds=3,
                    clients_per_round=3, selection_noise=1.0, **FIXED_NOISE)

    # Act
    tuned = calibrated_config(cfg, 8.0)

    # Assert: replay the smallest user's ledger as client.round.train_round would
    ledger = PrivacyLedger(target_epsilon=8.0, target_delta=cfg.target_delta)
    dp_sgd = (tuned.noise_multiplier, cfg.batch_size / 20, cfg.local_steps + 1)
    afforded = 0
    for server_round in range(1, cfg.num_rounds + 1):
        entries = [dp_sgd]
        if server_round > cfg.discovery_warmup + 1:
            entries.append((tuned.selection_noise, 1.0, 1))
        if ledger.can_afford(*entries):
            ledger.record(*entries)
            afforded += 1
    assert afforded == expected_participations(cfg, 3)


# -- the sweep command, simulation stubbed -----------------------------------------------------

def _fake_report(cfg: RunConfig, *, base: float = 100.0) -> dict:
    bonus = 0.0 if not cfg.dp else 10.0 / cfg.target_epsilon
    return {"config": cfg.to_flower(), "seconds": 90.0,
            "privacy": {"dp": cfg.dp, "epsilon_max": cfg.target_epsilon * 0.95 if cfg.dp
                        else None},
            "levels": {level: {"perplexity": base - i * 5 + bonus}
                       for i, level in enumerate(EVAL_LEVELS)}}


def test_sweep_runs_each_budget_and_writes_table_and_plot(small_population, tmp_path,
                                                          monkeypatch):
    # Arrange
    ran = []

    def fake_simulate(cfg, **kwargs):
        ran.append(cfg)
        Path(cfg.run_dir).mkdir(parents=True)  # as the real simulation does
        return _fake_report(cfg)

    monkeypatch.setattr(simulate_module, "simulate", fake_simulate)
    out = tmp_path / "sweep"
    settings = ["model=tiny", f"data-dir={small_population}", "max-users=0",
                "planned-rounds=0"]

    # Act
    code = run_sweep_command(out, "inf,4", settings)

    # Assert
    assert code == 0
    assert [c.dp for c in ran] == [False, True]
    assert [c.run_dir for c in ran] == [str((out / "eps-inf").resolve()),
                                        str((out / "eps-4").resolve())]
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    # sorted, no-DP last; JSON has no Inf, so json_safe writes it as null
    assert [r["epsilon"] for r in rows] == [4.0, None]
    assert rows[0]["noise multiplier"] == pytest.approx(ran[1].noise_multiplier)
    assert rows[0]["epsilon spent (max)"] == pytest.approx(3.8)
    assert rows[1]["noise multiplier"] == 0.0 and rows[1]["epsilon spent (max)"] is None
    assert rows[1]["global+persona+user"] == 85.0
    assert (out / "privacy_utility.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    table = (out / "sweep.md").read_text()
    assert "privacy_utility.png" in table and "| inf" in table


def test_sweep_with_a_bad_budget_runs_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(simulate_module, "simulate", lambda *a, **k: pytest.fail("ran"))

    with pytest.raises(ConfigError):
        run_sweep_command(tmp_path / "sweep", "4,0", ["model=tiny"])
    assert not (tmp_path / "sweep").exists()


# -- compare -----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("ffa:lora-scheme=ffa,seed=1", ("ffa", ["lora-scheme=ffa", "seed=1"])),
    (" adam :server-optimizer=fedadam", ("adam", ["server-optimizer=fedadam"])),
    ("plain:", ("plain", [])),
    ("x:a=1,,b=2,", ("x", ["a=1", "b=2"])),
])
def test_parse_variant(text, expected):
    assert parse_variant(text) == expected


@pytest.mark.parametrize("text", ["no-colon", ":seed=1", "  :seed=1", ""])
def test_parse_variant_rejects_a_missing_name(text):
    with pytest.raises(ConfigError, match="name:key=value"):
        parse_variant(text)


def test_duplicate_variant_names_are_refused_before_anything_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(simulate_module, "simulate", lambda *a, **k: pytest.fail("ran"))

    with pytest.raises(ConfigError, match="distinct"):
        run_compare_command(tmp_path, ["a:seed=1", "b:seed=3", "a:seed=2"], ["model=tiny"])
    assert not any(tmp_path.iterdir())


def test_a_bad_setting_in_a_later_variant_is_refused_before_the_first_runs(tmp_path,
                                                                            monkeypatch):
    monkeypatch.setattr(simulate_module, "simulate", lambda *a, **k: pytest.fail("ran"))

    with pytest.raises(ConfigError, match="no-such-setting"):
        run_compare_command(tmp_path, ["a:seed=1", "b:no-such-setting=3"], ["model=tiny"])
    assert not any(tmp_path.iterdir())


def test_compare_runs_variants_in_order_and_writes_the_table(tmp_path, monkeypatch):
    # Arrange
    ran = []

    def fake_simulate(cfg, **kwargs):
        ran.append(cfg)
        return _fake_report(cfg, base=100.0 + cfg.seed)

    monkeypatch.setattr(simulate_module, "simulate", fake_simulate)

    # Act
    code = run_compare_command(tmp_path, ["one:seed=1", "two:seed=2,dp=false"],
                               ["model=tiny", "num-rounds=2"])

    # Assert
    assert code == 0
    assert [(c.seed, c.dp, c.num_rounds) for c in ran] == [(1, True, 2), (2, False, 2)]
    assert [c.run_dir for c in ran] == [str((tmp_path / n).resolve()) for n in ("one", "two")]
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert saved["variants"] == {"one": ["seed=1"], "two": ["seed=2", "dp=false"]}
    assert [r["variant"] for r in saved["rows"]] == ["one", "two"]
    assert saved["rows"][1]["epsilon max"] == "no DP"
    assert saved["rows"][0]["minutes"] == 1.5
    assert "| one" in (tmp_path / "compare.md").read_text()


def test_comparison_rows_on_hand_values():
    report = _fake_report(RunConfig(model="tiny", target_epsilon=4.0), base=50.0)

    (row,) = comparison_rows({"v": report})

    assert row["variant"] == "v" and row["epsilon max"] == pytest.approx(3.8)
    assert row["base ppl"] == pytest.approx(52.5)
    assert row["global+persona+user ppl"] == pytest.approx(37.5)


def test_with_planned_rounds_the_sweep_only_sets_the_budget_and_devices_calibrate(
        small_population):
    cfg = RunConfig(model="tiny", data_dir=str(small_population), max_users=0,
                    planned_rounds=2)

    tuned = calibrated_config(cfg, 4.0)

    assert tuned == cfg.replace(dp=True, target_epsilon=4.0)
    assert sweep_rows({4.0: _fake_report(tuned)})[0]["noise multiplier"] == \
        "calibrated per device"
