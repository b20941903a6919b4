"""User-level DP on the aggregates (server.aggregation.central_dp) and its wiring in the
server."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from flwr.supercore.differential_privacy import clip_inputs_inplace
from helpers import initial_server_state, small_config, tiny_lora
from opacus.accountants import RDPAccountant

from server.aggregation import (
    GLOBAL,
    CentralLedger,
    ClientUpdate,
    apply_change,
    change,
    clip_update,
    l2_norm,
    level_name,
    plan_levels,
    private_changes,
    private_mean_change,
)
from server.checkpoint import load_checkpoint, save_checkpoint, states_equal
from server.report import render_markdown
from server.run_record import RunDirError
from server.strategy import apply_round, sent_part
from shared.config import ConfigError, RunConfig


def _opacus_epsilon(history, delta):
    accountant = RDPAccountant()
    accountant.history = list(history)
    return accountant.get_epsilon(delta=delta)


def _private_mean(sent: dict, states: list[dict], **kwargs) -> dict:
    """``sent`` stepped (lr = 1) by the private mean change of ``states``."""
    return apply_change(sent, private_mean_change([change(sent, s) for s in states], sent,
                                                  **kwargs), lr=1.0)


def _ledger(**changes) -> CentralLedger:
    args = {"population": 24, "clients_per_round": 8, "clipping_norm": 1.0,
            "noise_multiplier": 1.0, "delta": 1e-5, "min_clients": 1.0}
    args.update(changes)
    counts = args.pop("counts", {"a": 12, "b": 6, "c": 3})
    return plan_levels(counts, **args)


# -- clipping -------------------------------------------------------------------------------

def test_clip_scales_3_4_to_0_6_0_8_at_norm_1():
    clipped = clip_update({"w": torch.tensor([3.0, 4.0])}, 1.0)

    assert torch.allclose(clipped["w"], torch.tensor([0.6, 0.8], dtype=torch.float64))


def test_clip_takes_the_whole_adapter_as_one_vector_and_keeps_small_updates():
    delta = {"x": torch.tensor([3.0]), "y": torch.tensor([[4.0]])}

    assert l2_norm(clip_update(delta, 1.0)) == pytest.approx(1.0)
    assert clip_update(delta, 10.0)["y"].item() == 4.0  # within the bound: unchanged
    assert clip_update({"z": torch.zeros(3)}, 1.0)["z"].eq(0).all()  # no division by zero


def test_clip_agrees_with_flowers_flat_clip():
    generator = torch.Generator().manual_seed(1)
    delta = {"a": torch.randn(4, 3, generator=generator), "b": torch.randn(5, generator=generator)}
    arrays = [delta[k].numpy().astype(np.float64) for k in ("a", "b")]

    clip_inputs_inplace(arrays, 0.7)
    ours = clip_update(delta, 0.7)

    assert np.allclose(ours["a"].numpy(), arrays[0]) and np.allclose(ours["b"].numpy(), arrays[1])


# -- noise and the fixed denominator --------------------------------------------------------

def test_noise_std_on_the_mean_is_z_c_over_m():
    sent = {"w": torch.zeros(400, 500)}  # 200k coordinates: the std is measured to ~0.3%
    generator = torch.Generator().manual_seed(0)

    out = _private_mean(sent, [], clipping_norm=0.5, noise_multiplier=2.0, expected_clients=4.0,
                       generator=generator)

    assert out["w"].dtype == torch.float32 and out["w"].shape == (400, 500)
    assert out["w"].double().std().item() == pytest.approx(2.0 * 0.5 / 4.0, rel=0.01)
    assert abs(out["w"].double().mean().item()) < 0.01


def test_the_denominator_is_the_expected_clients_not_the_count():
    sent = {"w": torch.tensor([1.0, 1.0])}
    deltas = [{"w": sent["w"] + torch.tensor([1.0, 0.0])},
              {"w": sent["w"] + torch.tensor([0.0, 1.0])}]

    out = _private_mean(sent, deltas, clipping_norm=10.0, noise_multiplier=0.0,
                       expected_clients=4.0, generator=torch.Generator())

    assert torch.equal(out["w"], torch.tensor([1.25, 1.25]))  # sum / 4, though 2 came


def test_updates_are_clipped_before_summing():
    sent = {"w": torch.zeros(2)}
    big = {"w": torch.tensor([30.0, 40.0])}  # norm 50, clipped to norm 1

    out = _private_mean(sent, [big, big], clipping_norm=1.0, noise_multiplier=0.0,
                       expected_clients=2.0, generator=torch.Generator())

    assert torch.allclose(out["w"], torch.tensor([0.6, 0.8]))


def test_private_mean_change_is_the_clipped_sum_plus_pinned_noise_over_m():
    # Arrange: [3, 4] (norm 5) clipped to C = 2.5 is [1.5, 2]; [0, 0.5] is within C
    like = {"w": torch.zeros(2)}
    changes = [{"w": torch.tensor([3.0, 4.0])}, {"w": torch.tensor([0.0, 0.5])}]
    settings = {"clipping_norm": 2.5, "expected_clients": 4.0}

    # Act
    exact = private_mean_change(changes, like, noise_multiplier=0.0,
                                generator=torch.Generator(), **settings)
    noised = private_mean_change(changes, like, noise_multiplier=2.0,
                                 generator=torch.Generator().manual_seed(5), **settings)

    # Assert: (1.5 + 0, 2 + 0.5) / 4; the noise is N(0, (z C)^2) / m from the generator
    assert torch.equal(exact["w"], torch.tensor([0.375, 0.625], dtype=torch.float64))
    noise = torch.randn(2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert torch.equal(noised["w"], (torch.tensor([1.5, 2.5], dtype=torch.float64)
                                     + noise * 5.0) / 4.0)


def test_weights_are_uniform_whatever_the_example_counts():
    ledger = _ledger(counts={}, population=2, clients_per_round=2, noise_multiplier=1e-12,
                     clipping_norm=100.0)
    sent = {GLOBAL: {"w": torch.zeros(1)}}
    updates = [ClientUpdate({"w": torch.tensor([2.0])}, "", {}, num_examples=1),
               ClientUpdate({"w": torch.tensor([4.0])}, "", {}, num_examples=1000)]

    out = private_changes(updates, sent, ledger, torch.Generator().manual_seed(0))  # sent 0

    assert out[GLOBAL]["w"].item() == pytest.approx(3.0)  # not (2 + 4000) / 1001


def test_every_released_level_is_released_without_members_and_merged_ones_never():
    ledger = _ledger(counts={"a": 12, "tiny": 1}, min_clients=2.0)  # tiny: 1/3 expected
    sent = {GLOBAL: {"w": torch.zeros(3)}, level_name("a"): {"w": torch.zeros(3)}}
    lone = ClientUpdate({"w": torch.ones(3)}, "tiny", {"w": torch.ones(3)}, num_examples=5)

    out = private_changes([lone], sent, ledger, torch.Generator().manual_seed(3))  # sent 0

    assert set(out) == {GLOBAL, level_name("a")}
    assert not torch.equal(out[level_name("a")]["w"], torch.zeros(3))  # noise, no member
    assert ledger.merged == {"tiny": pytest.approx(1 / 3)}


def test_a_pinned_generator_gives_pinned_noise():
    sent = {"w": torch.zeros(5), "v": torch.zeros(2)}
    kwargs = {"clipping_norm": 1.0, "noise_multiplier": 1.0, "expected_clients": 2.0}

    a = _private_mean(sent, [], generator=torch.Generator().manual_seed(7), **kwargs)
    b = _private_mean(sent, [], generator=torch.Generator().manual_seed(7), **kwargs)

    assert states_equal(a, b)


# -- the plan -------------------------------------------------------------------------------

def test_default_population_merges_every_genre():
    # 24 users, 4 per genre, 8 per round: 4/3 expected members per genre < 2
    ledger = plan_levels({g: 4 for g in "abcdef"}, population=24, clients_per_round=8,
                         clipping_norm=0.1, noise_multiplier=1.0, delta=1e-5, min_clients=2.0)

    assert ledger.sample_rate == pytest.approx(1 / 3)
    assert list(ledger.levels) == [GLOBAL]
    assert ledger.levels[GLOBAL].expected_clients == pytest.approx(8.0)
    assert ledger.merged == {g: pytest.approx(4 / 3) for g in "abcdef"}
    assert "merged into global: expected 1.33 members per round < min 2" in \
        ledger.summary()["merged_into_global"]["a"]


def test_persona_denominator_is_q_times_members_and_its_noise_grows_as_it_shrinks():
    ledger = _ledger()  # q = 1/3
    levels = ledger.summary()["levels"]

    assert levels[level_name("a")]["expected_clients"] == pytest.approx(4.0)
    assert levels[level_name("c")]["expected_clients"] == pytest.approx(1.0)
    assert levels[level_name("c")]["noise_std_on_mean"] == pytest.approx(1.0)
    assert levels[level_name("a")]["noise_std_on_mean"] == pytest.approx(0.25)
    assert levels[GLOBAL]["noise_std_on_mean"] == pytest.approx(1 / 8)


def test_clients_per_round_above_the_population_means_q_one():
    ledger = plan_levels({"a": 2, "b": 1}, population=3, clients_per_round=8, clipping_norm=1.0,
                         noise_multiplier=1.0, delta=1e-5, min_clients=2.0)

    assert ledger.sample_rate == 1.0
    assert set(ledger.levels) == {GLOBAL, level_name("a")} and set(ledger.merged) == {"b"}


def test_plan_rejects_counts_beyond_the_population():
    with pytest.raises(ValueError, match="exceed the population"):
        plan_levels({"a": 5}, population=3, clients_per_round=2, clipping_norm=1.0,
                    noise_multiplier=1.0, delta=1e-5, min_clients=0.0)


# -- accounting -----------------------------------------------------------------------------

def test_level_epsilon_is_opacus_rdp_for_z_q_rounds():
    ledger = _ledger()
    for _ in range(5):
        ledger.record_release([GLOBAL, level_name("a")])

    assert ledger.epsilon(GLOBAL) == _opacus_epsilon([(1.0, 1 / 3, 5)], 1e-5)
    assert ledger.epsilon(GLOBAL) == pytest.approx(6.356, abs=1e-3)  # pinned
    assert ledger.epsilon(level_name("b")) == 0.0  # never released


def test_epsilon_never_decreases_with_rounds():
    ledger = _ledger()
    values = []
    for _ in range(6):
        ledger.record_release([GLOBAL])
        values.append(ledger.epsilon(GLOBAL))

    assert all(b > a for a, b in itertools.pairwise(values))


def test_a_users_epsilon_is_the_joint_release_of_global_and_persona():
    ledger = _ledger(persona_noise={"a": 2.0})
    for _ in range(4):
        ledger.record_release([GLOBAL, level_name("a")])
    ledger.record_release([GLOBAL])  # one extra global-only round
    q = 1 / 3
    joint = (1.0 ** -2 + 2.0 ** -2) ** -0.5

    assert ledger.user_epsilon("a") == _opacus_epsilon([(joint, q, 4), (1.0, q, 1)], 1e-5)
    independent = _opacus_epsilon([(1.0, q, 5), (2.0, q, 4)], 1e-5)
    assert ledger.user_epsilon("a") > independent > ledger.epsilon(GLOBAL)
    assert ledger.user_epsilon(None) == ledger.epsilon(GLOBAL)
    assert ledger.user_epsilon("merged-or-unknown") == ledger.epsilon(GLOBAL)


def test_record_release_rejects_an_unplanned_level():
    with pytest.raises(ValueError, match="not a released level"):
        _ledger().record_release(["persona/zzz"])


def test_ledger_json_round_trip():
    ledger = _ledger(counts={"a": 12, "small": 1}, min_clients=2.0, persona_noise={"a": 1.5})
    ledger.record_release([GLOBAL, level_name("a")])

    again = CentralLedger.from_json(json.loads(json.dumps(ledger.to_json())))

    assert again == ledger


# -- wiring: strategy, checkpoint, config, report ------------------------------------------

def test_apply_round_with_central_dp_releases_every_level_and_counts_it(tmp_path):
    cfg = small_config(tmp_path, central_dp=True, clipping_norm=0.5)
    state = initial_server_state(cfg)
    state.central_dp = plan_levels({"a": 2, "b": 1}, population=3, clients_per_round=8,
                                   clipping_norm=0.5, noise_multiplier=1.0, delta=1e-5,
                                   min_clients=2.0)
    before = {p: dict(s) for p, s in state.persona_states.items()}
    sent = sent_part(state.global_state, cfg.lora_scheme)
    update = ClientUpdate({k: v + 1.0 for k, v in sent.items()}, "", {}, num_examples=3)

    apply_round(state, [update], cfg)
    apply_round(state, [], cfg)  # nobody answered: still a (noise-only) release

    assert state.central_dp.releases == {GLOBAL: 2, level_name("a"): 2}
    assert not states_equal(state.persona_states["a"], before["a"])
    assert states_equal(state.persona_states["b"], before["b"])  # merged: never released


def test_checkpoint_keeps_the_central_dp_account(tmp_path):
    cfg = small_config(tmp_path)
    state = initial_server_state(cfg)
    state.central_dp = _ledger(counts={"a": 2, "b": 1}, population=3, min_clients=2.0)
    state.central_dp.record_release([GLOBAL, level_name("a")])

    save_checkpoint(tmp_path / "run", state, tiny_lora())
    loaded = load_checkpoint(tmp_path / "run")

    assert loaded.central_dp == state.central_dp
    assert loaded.central_dp.epsilon(GLOBAL) == state.central_dp.epsilon(GLOBAL) > 0


def test_checkpoint_without_central_dp_loads_none(tmp_path):
    cfg = small_config(tmp_path)
    save_checkpoint(tmp_path / "run", initial_server_state(cfg), tiny_lora())

    assert load_checkpoint(tmp_path / "run").central_dp is None


@pytest.mark.parametrize("changes, message", [
    ({"clipping_norm": 0.0}, "clipping-norm must be > 0"),
    ({"clipping_norm": math.nan}, "clipping-norm must be a finite number"),
    ({"central_delta": 1.0}, "central-delta must be in"),
    ({"central_min_clients": -1.0}, "central-min-clients must be a finite number >= 0"),
    ({"central_dp": True, "central_noise_multiplier": 0.0},
     "central-noise-multiplier must be > 0"),
    ({"central_dp": True, "personas": "discovered:3"}, "central-dp needs declared personas"),
])
def test_config_rejects(changes, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig(**changes)


def test_report_renders_the_user_level_section():
    ledger = _ledger(counts={"a": 12, "small": 1}, min_clients=2.0)
    ledger.record_release([GLOBAL, level_name("a")])
    report = {"config": RunConfig().to_flower(), "rounds": [],
              "privacy": {"dp": False}, "user_level_privacy": ledger.summary()}

    text = render_markdown(report)

    assert "## User-level privacy (central DP on the aggregates)" in text
    assert f"{ledger.epsilon(GLOBAL):.3f}" in text
    assert "persona small: merged into global: expected 0.33 members per round < min 2" in text


# -- a real simulation ------------------------------------------------------------------------

@pytest.mark.integration
def test_simulation_reports_per_level_epsilons(tmp_path):
    from simulations.run.simulate import simulate

    cfg = small_config(tmp_path, central_dp=True, num_rounds=2, clipping_norm=1.0,
                       central_noise_multiplier=1.5, target_epsilon=100.0)

    report = simulate(cfg, final_evaluation=False)

    on_disk = json.loads((tmp_path / "run" / "report.json").read_text())
    user_dp = on_disk["user_level_privacy"]
    # 3 users (a: u1, u3; b: u2), 8 per round: q = 1; b expects 1 member < 2: merged
    assert set(user_dp["levels"]) == {GLOBAL, level_name("a")}
    assert set(user_dp["merged_into_global"]) == {"b"}
    for level in user_dp["levels"].values():
        assert level["rounds_released"] == 2
        assert level["epsilon"] > 0
        assert level["epsilon"] == pytest.approx(_opacus_epsilon([(1.5, 1.0, 2)], 1e-5))
    assert user_dp["user_epsilon"]["a"] == pytest.approx(
        _opacus_epsilon([(1.5 / math.sqrt(2), 1.0, 2)], 1e-5))
    assert all(r["accepted"] == 3 and r["rejected"] == 0 for r in on_disk["rounds"])
    assert report["user_level_privacy"] == user_dp
    assert "User-level privacy" in (tmp_path / "run" / "report.md").read_text()
    # b's adapter was never released: still at its initial value
    initial = initial_server_state(cfg).persona_states["b"]
    assert states_equal(load_checkpoint(tmp_path / "run").persona_states["b"], initial)
    assert load_checkpoint(tmp_path / "run").central_dp.releases == {GLOBAL: 2,
                                                                     level_name("a"): 2}
    # the sample came from a secret kept with the run, never from the public seed
    secret = tmp_path / "run" / "server-secret"
    assert len(secret.read_bytes()) == 32 and secret.stat().st_mode & 0o777 == 0o600
    # a resume that would change q is refused before it starts (the run's record: a resume
    # changes no training setting), and the checkpoint is left as it was
    with pytest.raises(RunDirError, match="changes clients-per-round=8 -> 2"):
        simulate(cfg.replace(num_rounds=3, clients_per_round=2), final_evaluation=False)
    assert load_checkpoint(tmp_path / "run").round == 2
