"""The evaluation harness (simulations.run.evaluate) and the metrics it reports (shared.util.metrics):
hand-computed summaries, and evaluate_run on a small run directory built by hand."""

from __future__ import annotations

import json
import math
import statistics

import pytest
from helpers import fit_persona, sim_store, tiny_lora, tiny_peft

from client.store import SIMULATED_FEDERATION
from server.report import (
    federation_gain,
    federation_gain_lines,
    privacy_summary,
    user_check_lines,
    user_check_summary,
)
from shared.config import RunConfig
from shared.data.userdata import (
    ROLE_COLD_CHARACTER,
    ROLE_COLD_PLAY,
    ROLE_TRAIN,
    Profile,
    Record,
    UserData,
    load_population,
    write_population,
)
from shared.model.adapters import level_state, save_adapter
from shared.privacy.accounting import PrivacyLedger
from shared.util.metrics import TokenStats, macro_summary
from shared.util.metrics import stats_summary as summarize
from simulations.run import evaluate as evaluation
from simulations.run.evaluate import (
    FULL_ONLY_ROWS,
    IN_CONTEXT_ROWS,
    LOCAL_IN_CONTEXT,
    LOCAL_ROWS,
    SERVED,
    EvaluationError,
    evaluate_run,
    load_run_config,
)
from simulations.run.simulate import finish_report

SEQ_LEN = 24
STYLE_X = (Record("abab abab abab"), Record("ab abab ab abab")) * 3
STYLE_Y = (Record("zzzz 1234 zzzz"), Record("9876 zzzz 5432")) * 3
TEST_X = (Record("abab ab abab"), Record("ab ab abab ab"))
TEST_Y = (Record("zzzz 5678"), Record("1234 zzzz zz"))


# -- metrics on hand values --------------------------------------------------------------------

def test_token_stats_perplexity_accuracy_and_sums():
    stats = TokenStats(nll_sum=3 * math.log(2.0), correct=2, tokens=3)

    assert stats.perplexity == pytest.approx(2.0)
    assert stats.token_accuracy == pytest.approx(2 / 3)
    pooled = stats + TokenStats(nll_sum=math.log(16.0), correct=1, tokens=1)
    assert pooled == TokenStats(3 * math.log(2.0) + math.log(16.0), 3, 4)
    assert pooled.perplexity == pytest.approx(math.exp(7 * math.log(2.0) / 4))


def test_macro_summary_mean_and_normal_ci95():
    summary = macro_summary({"u1": 2.0, "u2": 8.0, "u3": float("nan")})

    # stdev([2, 8]) = sqrt(18) -> 1.96 * sqrt(18) / sqrt(2) = 1.96 * 3
    assert summary == {"mean": pytest.approx(5.0), "ci95": pytest.approx(5.88), "n": 2}


def test_summarize_macro_averages_users_and_keeps_every_user():
    # Arrange: perplexities 2 and 8, accuracies 1 and 1/2; one user without test tokens
    per_user = {"u2": TokenStats(nll_sum=2 * math.log(8.0), correct=1, tokens=2),
                "u1": TokenStats(nll_sum=3 * math.log(2.0), correct=3, tokens=3),
                "u3": TokenStats(0.0, 0, 0)}

    # Act
    summary = summarize(per_user)

    # Assert
    assert summary["perplexity"] == pytest.approx(5.0)
    assert summary["perplexity_ci95"] == pytest.approx(5.88)
    assert summary["token_accuracy"] == pytest.approx(0.75)
    assert summary["token_accuracy_ci95"] == pytest.approx(1.96 * 0.25)
    assert summary["users"] == 2  # the empty user has no perplexity to average
    assert list(summary["per_user"]) == ["u1", "u2", "u3"]
    assert summary["per_user"]["u2"] == {"perplexity": pytest.approx(8.0),
                                         "token_accuracy": pytest.approx(0.5)}
    assert math.isnan(summary["per_user"]["u3"]["perplexity"])


def test_summarize_of_nobody_is_nan_with_zero_users():
    summary = summarize({})

    assert summary["users"] == 0 and math.isnan(summary["perplexity"])


def test_federation_gain_per_user_mean_and_how_many_it_helps():
    # Arrange: u4 has no finite baseline, u5 no baseline at all: both left out
    local_only = {"u1": 10.0, "u2": 20.0, "u3": 8.0, "u4": float("nan")}
    federated = {"u1": 8.0, "u2": 25.0, "u3": 4.0, "u4": 5.0, "u5": 3.0}

    # Act
    gain = federation_gain(local_only, federated, excluded=["u9"])

    # Assert: gains 2, -5, 4; relative 20%, -25%, 50%
    assert gain["per_user"] == {
        "u1": {"local_only": 10.0, "federated": 8.0, "gain": 2.0, "relative_percent": 20.0},
        "u2": {"local_only": 20.0, "federated": 25.0, "gain": -5.0, "relative_percent": -25.0},
        "u3": {"local_only": 8.0, "federated": 4.0, "gain": 4.0, "relative_percent": 50.0}}
    assert gain["users"] == 3 and gain["helped"] == 2
    assert gain["mean"] == pytest.approx(1 / 3)
    assert gain["mean_ci95"] == pytest.approx(1.96 * statistics.stdev([2, -5, 4]) / math.sqrt(3))
    assert gain["relative_percent_mean"] == pytest.approx(15.0)
    assert gain["excluded"] == ["u9"]
    lines = federation_gain_lines(gain)
    assert "it helps 2 of 3 users" in lines[2]
    assert "Left out (never trained in the run): u9." in lines
    assert "| u3   | 8.00" in "\n".join(lines)  # the largest gain first


def test_federation_gain_of_nobody_renders_nothing():
    gain = federation_gain({}, {"u1": 3.0})

    assert gain["users"] == 0 and gain["helped"] == 0 and gain["per_user"] == {}
    assert federation_gain_lines(gain) == []


# -- the run's configuration -------------------------------------------------------------------

def test_user_check_summary_sums_the_devices_tallies_and_names_who_discarded():
    summary = user_check_summary({"u1": (3, 3), "u2": (2, 1), "u3": (0, 0), "u0": (4, 2)},
                                 0.2)

    assert summary == {"holdout_fraction": 0.2, "users": 4, "checked_rounds": 9,
                       "kept_rounds": 6, "discarded_rounds": 3,
                       "users_with_a_discard": ["u0", "u2"]}
    assert user_check_lines(summary)[0] == (
        "User adapter, checked on each device against the last 20% of its own training "
        "lines: kept in 6 of 9 rounds; discarded at least once by 2 of 4 users (u0, u2).")
    assert user_check_lines(user_check_summary({"u1": (0, 0)}, 0.0)) == []


def test_load_run_config_without_a_report_is_a_clear_error(tmp_path):
    with pytest.raises(EvaluationError, match="report.json"):
        load_run_config(tmp_path)


@pytest.mark.parametrize("text", ["{not json", "[]", '{"rounds": []}', "\udcff"])
def test_load_run_config_of_a_broken_report_is_a_clear_error(tmp_path, text):
    (tmp_path / "report.json").write_bytes(text.encode("utf-8", "surrogateescape"))

    with pytest.raises(EvaluationError, match="not a valid run report"):
        load_run_config(tmp_path)


def test_load_run_config_reads_back_the_runs_settings(tmp_path):
    cfg = RunConfig(model="tiny", personas="discovered:3", num_rounds=7, seq_len=24,
                    target_epsilon=2.5)
    (tmp_path / "report.json").write_text(json.dumps({"config": cfg.to_flower()}))

    assert load_run_config(tmp_path) == cfg


# -- evaluate_run on a hand-built run ----------------------------------------------------------

ROUNDS = {"t1": 2, "t2": 0, "t3": 1}  # rounds each device trained in (its ledger says so)
CONTEXT_TOKENS = 40


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """Three training users (persona a in style X, b in style Y; t2 never trained), cold-start
    users of a known play (declared a; no label) and of a held-out play (label unknown to
    the run), and a run directory with persona a fitted to X and b to Y."""
    root = tmp_path_factory.mktemp("evaluate")
    population = write_population(root / "pop", [
        (ROLE_TRAIN, UserData(Profile("t1", "a"), STYLE_X, TEST_X)),
        (ROLE_TRAIN, UserData(Profile("t2", "b"), STYLE_Y, TEST_Y)),
        (ROLE_TRAIN, UserData(Profile("t3", "b"), STYLE_Y, TEST_Y)),
        (ROLE_COLD_CHARACTER, UserData(Profile("c1", "a"), STYLE_X, TEST_X)),
        (ROLE_COLD_CHARACTER, UserData(Profile("c2", None), STYLE_X, TEST_X)),
        (ROLE_COLD_PLAY, UserData(Profile("p1", "pastoral"), STYLE_Y, TEST_Y)),
    ], {"personas": ["a", "b"]})
    run = root / "run"
    cfg = RunConfig(model="tiny", data_dir=str(root / "pop"), max_users=0, num_rounds=1,
                    local_steps=1, user_steps=3, batch_size=2, seq_len=SEQ_LEN,
                    run_dir=str(run), device="cpu", lora_rank=4, lora_alpha=8.0,
                    eval_max_records=2, user_learning_rate=0.05)
    run.mkdir()
    for user_id, rounds in ROUNDS.items():  # what the devices' ledgers would say, without DP
        if rounds:
            sim_store(cfg, population.user_dir(user_id)).save_ledger(
                PrivacyLedger(target_epsilon=math.inf, target_delta=cfg.target_delta,
                              federation_rounds={SIMULATED_FEDERATION: rounds}))
    (run / "report.json").write_text(json.dumps({"config": cfg.to_flower()}))
    model = tiny_peft(seed=0)
    start = level_state(model, "persona")
    save_adapter(run / "adapters" / "global", level_state(model, "global"), tiny_lora())
    save_adapter(run / "adapters" / "persona" / "a", fit_persona(model, STYLE_X, start), tiny_lora())
    save_adapter(run / "adapters" / "persona" / "b", fit_persona(model, STYLE_Y, start), tiny_lora())
    return run


@pytest.fixture(scope="module")
def evaluated(run_dir):
    return evaluate_run(run_dir, cold_start_k=3, baseline_users=1, centralized_steps=2, full=True,
                        context_tokens=CONTEXT_TOKENS, progress=lambda _: None)


def test_evaluate_run_reports_levels_baselines_and_both_cold_start_groups(evaluated):
    assert set(evaluated) >= {"levels", "baselines", "cold_start", "cold_start_held_out_plays",
                              "seconds"}
    assert set(evaluated["levels"]) == {"base", "global", "global+persona",
                                        "global+persona+user"}
    assert all(level["users"] == 3 and set(level["per_user"]) == {"t1", "t2", "t3"}
               for level in evaluated["levels"].values())
    assert set(evaluated["cold_start"]["choices"]) == {"c1", "c2"}
    assert set(evaluated["cold_start_held_out_plays"]["choices"]) == {"p1"}


def test_persona_level_helps_the_training_users_of_that_style(evaluated):
    per_user = evaluated["levels"]
    for user in ("t1", "t2"):
        assert (per_user["global+persona"]["per_user"][user]["perplexity"]
                < per_user["global"]["per_user"][user]["perplexity"])
    # no user adapters exist, so the user level changes nothing
    for user in ("t1", "t2"):
        assert per_user["global+persona+user"]["per_user"][user]["perplexity"] == pytest.approx(
            per_user["global+persona"]["per_user"][user]["perplexity"])


def test_kshot_choice_finds_each_cold_start_users_style(evaluated):
    known, held_out = evaluated["cold_start"], evaluated["cold_start_held_out_plays"]

    assert known["choices"]["c1"] == {"declared": "a", "kshot": "a",
                                      "kshot_served_by": "persona (lowest loss on the user's "
                                                         "examples)"}
    assert known["choices"]["c2"]["kshot"] == "a" and known["choices"]["c2"]["declared"] is None
    assert held_out["choices"]["p1"]["kshot"] == "b"
    assert known["kshot_matches_declared"] == 1.0  # c2 declares nothing and is not counted
    assert held_out["kshot_matches_declared"] == 0.0  # "pastoral" is no persona of the run


def test_zero_shot_fallback_uses_the_declared_persona_else_global(evaluated):
    known, held_out = evaluated["cold_start"], evaluated["cold_start_held_out_plays"]

    def ppl(group, name, user):
        return group[name]["per_user"][user]["perplexity"]

    # c1 declares "a", which is also its k-shot choice: the same adapters serve both
    assert ppl(known, "persona_fallback_0shot", "c1") == pytest.approx(
        ppl(known, "persona_fallback_kshot", "c1"))
    # c2 and p1 have no usable label: 0-shot is global alone
    assert ppl(known, "persona_fallback_0shot", "c2") == pytest.approx(ppl(known, "global", "c2"))
    assert ppl(held_out, "persona_fallback_0shot", "p1") == pytest.approx(
        ppl(held_out, "global", "p1"))
    assert ppl(known, "persona_fallback_kshot", "c2") < ppl(known, "global", "c2")


@pytest.mark.parametrize("leaked_id", ["c1", "p1"])
def test_evaluate_run_refuses_a_cold_start_user_who_took_part_in_training(
        run_dir, monkeypatch, leaked_id):
    # Arrange: the run's training users include a cold-start user
    population = load_population(load_run_config(run_dir).data_dir)
    entries = {u.user_id: u for u in population.users}
    leaked = (entries["t1"], entries["t2"], entries[leaked_id])
    monkeypatch.setattr(evaluation, "training_users", lambda population, cfg: leaked)

    # Act / Assert
    with pytest.raises(EvaluationError, match=leaked_id):
        evaluate_run(run_dir, cold_start_k=2, baseline_users=1, centralized_steps=1,
                     include_levels=False, progress=lambda _: None)


def test_evaluate_run_without_a_report_is_refused(tmp_path):
    with pytest.raises(EvaluationError, match="missing"):
        evaluate_run(tmp_path, progress=lambda _: None)


# -- the baselines, on the users that trained --------------------------------------------------

FAIR = {"t1", "t3"}  # t2 never trained: no local-only baseline is fair to it


def test_baselines_run_on_the_users_that_trained_and_leave_out_the_others(evaluated):
    baselines = evaluated["baselines"]

    assert evaluated["untrained_users"] == ["t2"]
    for name in ("local-only", "local-only-all-steps", *IN_CONTEXT_ROWS, "centralized",
                 "base (same users)", "global+persona+user (same users)"):
        assert set(baselines[name]["per_user"]) == FAIR, name
        assert baselines[name]["users"] == 2, name
    assert set(baselines["local-only-dp-global"]["per_user"]) == {"t1"}  # baseline_users=1
    gain = evaluated["federation_gain"]
    assert set(gain["per_user"]) == FAIR and gain["excluded"] == ["t2"]
    assert gain["users"] == 2 and 0 <= gain["helped"] <= 2


def test_local_only_trains_the_user_adapter_alone_and_beats_the_base_model(evaluated):
    baselines, levels = evaluated["baselines"], evaluated["levels"]

    for user in FAIR:
        base = levels["base"]["per_user"][user]["perplexity"]
        local = baselines["local-only"]["per_user"][user]["perplexity"]
        more = baselines["local-only-all-steps"]["per_user"][user]["perplexity"]
        assert math.isfinite(local) and local < base
        assert math.isfinite(more) and more != pytest.approx(local)  # more steps, other result


def test_federation_gain_is_local_only_minus_the_federated_level(evaluated):
    gain = evaluated["federation_gain"]
    local = evaluated["baselines"]["local-only"]["per_user"]
    federated = evaluated["levels"]["global+persona+user"]["per_user"]

    for user, value in gain["per_user"].items():
        assert value["gain"] == pytest.approx(
            local[user]["perplexity"] - federated[user]["perplexity"])
    assert gain["helped"] == sum(v["gain"] > 0 for v in gain["per_user"].values())


def test_in_context_rows_score_the_same_tokens_as_the_levels(evaluated):
    baselines = evaluated["baselines"]

    for name in IN_CONTEXT_ROWS:
        for user in FAIR:
            assert math.isfinite(baselines[name]["per_user"][user]["perplexity"]), name
    # the federated row serves the user's persona too (t1's and t3's are fitted to them)
    for user in FAIR:
        assert baselines["in-context-recent (federated)"]["per_user"][user]["perplexity"] != \
            pytest.approx(baselines["in-context-recent (global)"]["per_user"][user]["perplexity"])


def test_the_served_row_is_the_in_context_row_of_the_stack_the_device_chose(evaluated):
    # Arrange: the stack each device chose, and the in-context row that scores that stack
    baselines = evaluated["baselines"]
    row_of = {"base": "in-context-recent (base)", "global": "in-context-recent (global)",
              "global+persona+user": "in-context-recent (federated)"}

    # Act / Assert: the same tokens under the same adapters give the same perplexity
    assert set(evaluated["served_stacks"]) == set(FAIR)
    for user, stack in evaluated["served_stacks"].items():
        served = baselines[SERVED]["per_user"][user]["perplexity"]
        assert stack in ("base", "global", "global+persona", "global+persona+user")
        if stack in row_of:
            assert served == pytest.approx(baselines[row_of[stack]]["per_user"][user]
                                           ["perplexity"])
    for user in FAIR:  # the local-only adapter under the context is its own row
        assert math.isfinite(baselines[LOCAL_IN_CONTEXT]["per_user"][user]["perplexity"])


def test_served_gain_is_the_best_local_row_minus_the_served_stack(evaluated):
    baselines, gain = evaluated["baselines"], evaluated["served_gain"]
    best = min(LOCAL_ROWS, key=lambda n: baselines[n]["perplexity"])

    assert gain["baseline"] == best and gain["level"] == SERVED
    for user, value in gain["per_user"].items():
        assert value["gain"] == pytest.approx(
            baselines[best]["per_user"][user]["perplexity"]
            - baselines[SERVED]["per_user"][user]["perplexity"])
    assert sorted(gain["per_user"]) == sorted(FAIR)


def test_finish_report_merges_the_baselines_gain_and_plot_into_both_files(
        evaluated, tmp_path):
    # Arrange: a server report with the levels from its Flower evaluation round
    cfg = RunConfig(model="tiny", num_rounds=1, seq_len=SEQ_LEN)
    server = {"config": cfg.to_flower(), "num_users": 3, "rounds": [],
              "privacy": privacy_summary({}, dp=False, delta=1e-5, budget=math.inf),
              "levels": evaluated["levels"]}
    evaluation = {**{k: v for k, v in evaluated.items()
                     if k not in ("levels", "federation_gain", "served_gain")},
                  "baselines": {k: v for k, v in evaluated["baselines"].items()
                                if not k.endswith("(same users)")}}

    # Act
    report = finish_report(tmp_path, server, evaluation)

    # Assert
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["federation_gain"] == evaluated["federation_gain"]
    assert report["baselines"].keys() == evaluated["baselines"].keys()
    assert (tmp_path / "federation_gain.png").read_bytes()[:4] == b"\x89PNG"
    markdown = (tmp_path / "report.md").read_text()
    assert "## Federation gain" in markdown and "## Served gain" in markdown
    assert "Stacks the devices serve" in markdown
    assert (tmp_path / "served_gain.png").read_bytes()[:4] == b"\x89PNG"
    assert "![federation gain per user](federation_gain.png)" in markdown
    assert "| local-only-all-steps " in markdown and "| in-context-retrieved (global) " \
        in markdown
    assert "left out as they never trained: t2 (a fair" in markdown
    assert "`local-only-dp-global` ran on 1 of these users" in markdown


def test_without_full_the_slow_rows_are_left_out_and_the_rest_agree(run_dir, evaluated):
    # Act
    quick = evaluate_run(run_dir, cold_start_k=0, baseline_users=1, centralized_steps=2,
                         context_tokens=CONTEXT_TOKENS, include_levels=False,
                         progress=lambda _: None)

    # Assert: the same figures for every row both ran (the same seeds and adapters)
    rows = set(quick["baselines"])
    assert not rows & (FULL_ONLY_ROWS | {"local-only-all-steps", "local-only-dp-global"})
    assert {"local-only", LOCAL_IN_CONTEXT, SERVED, "in-context-recent (base)",
            "in-context-recent (global)", "centralized"} <= rows
    for name in rows:
        assert quick["baselines"][name]["perplexity"] == pytest.approx(
            evaluated["baselines"][name]["perplexity"]), name
    assert quick["served_stacks"] == evaluated["served_stacks"]


@pytest.mark.parametrize("full", [False, True])
def test_local_only_trains_as_many_user_steps_as_the_device_and_its_final_fit(
        run_dir, monkeypatch, full):
    # Arrange: a spy on the user-adapter training the baselines call
    cfg = load_run_config(run_dir)
    chunks: list[int] = []
    real = evaluation.train_user_checked

    def spy(model, data, **kwargs):
        chunks.append(kwargs["steps"])
        return real(model, data, **kwargs)

    monkeypatch.setattr(evaluation, "train_user_checked", spy)

    # Act
    evaluate_run(run_dir, cold_start_k=0, baseline_users=0, centralized_steps=1,
                 context_tokens=CONTEXT_TOKENS, include_levels=False, full=full,
                 progress=lambda _: None)

    # Assert: per fair user, local-only then local-only-all-steps, each round's steps and
    # then the device's final fit (user-final-steps); the all-steps row only when full
    final = [cfg.user_final_steps]
    expected = []
    for user in sorted(FAIR):
        expected += [cfg.user_steps] * ROUNDS[user] + final
        expected += ([cfg.user_steps + cfg.local_steps] * ROUNDS[user] + final) * full
    assert cfg.user_final_steps > 0 and chunks == expected
