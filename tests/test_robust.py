"""Robust aggregation (server/aggregation/robust.py): exact answers, the trimmed mean's range bound,
the clip's norm bound, its wiring into the strategy, and the settings' validation."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from server.aggregation import (
    GLOBAL,
    ClientUpdate,
    apply_change,
    change,
    clip_update,
    level_name,
    robust_changes,
    robust_hierarchical_mean,
    robust_mean,
    trimmed_count,
    trimmed_mean,
    weighted_mean,
)
from server.checkpoint import ServerState
from server.strategy import apply_round
from shared.config import ConfigError, RunConfig

KEY = "w.lora_B.weight"


def _robust_state(sent: dict, states: list[dict], weights: list[int], **settings) -> dict:
    """``sent`` stepped by the robust mean change of ``states`` at lr = 1."""
    return apply_change(sent, robust_mean([change(sent, s) for s in states], weights,
                                          **settings), lr=1.0)


def test_clip_scales_the_whole_adapter_as_one_vector():
    clipped = clip_update({"a": torch.tensor([3.0]), "b": torch.tensor([4.0])}, 1.0)

    assert torch.allclose(clipped["a"], torch.tensor([0.6], dtype=torch.float64), atol=1e-15)
    assert torch.allclose(clipped["b"], torch.tensor([0.8], dtype=torch.float64), atol=1e-15)


def test_clip_leaves_an_update_within_the_bound_unchanged():
    delta = {"a": torch.tensor([0.3, 0.4])}

    assert torch.equal(clip_update(delta, 1.0)["a"], delta["a"].double())


@pytest.mark.parametrize(("n", "fraction", "expected"), [
    (10, 0.1, 1), (5, 0.2, 1), (4, 0.2, 0), (100, 0.29, 29), (3, 0.0, 0), (7, 0.49, 3)])
def test_trimmed_count_is_floor_of_fraction_times_n(n, fraction, expected):
    assert trimmed_count(n, fraction) == expected


@pytest.mark.parametrize("fraction", [0.5, -0.1, math.nan])
def test_trimmed_count_refuses_a_fraction_outside_0_to_half(fraction):
    with pytest.raises(ValueError, match="trim fraction must be in"):
        trimmed_count(5, fraction)


def test_trimmed_mean_drops_the_extremes_of_each_coordinate():
    # coordinate 0: 1 2 3 100 -50 -> 2; coordinate 1: 10 -1e6 30 20 1e6 -> 20
    states = [{"w": torch.tensor([v0, v1])} for v0, v1 in
              [(1.0, 10.0), (2.0, -1e6), (3.0, 30.0), (100.0, 20.0), (-50.0, 1e6)]]

    out = trimmed_mean(states, 0.2)

    assert torch.equal(out["w"], torch.tensor([2.0, 20.0]))
    assert out["w"].dtype == torch.float32


def test_trimmed_mean_with_nothing_trimmed_is_the_plain_mean():
    states = [{"w": torch.tensor([1.0, 4.0])}, {"w": torch.tensor([2.0, 8.0])}]

    assert torch.equal(trimmed_mean(states, 0.1)["w"], torch.tensor([1.5, 6.0]))


def test_trimmed_mean_refuses_states_with_different_keys():
    with pytest.raises(ValueError, match="different keys"):
        trimmed_mean([{"a": torch.zeros(1)}, {"b": torch.zeros(1)}], 0.1)


@given(honest=st.lists(st.floats(-10, 10), min_size=3, max_size=9),
       bad=st.lists(st.sampled_from([-1e30, 1e30, 0.0, 5e3]), min_size=0, max_size=4),
       fraction=st.floats(0.0, 0.49))
def test_trimmed_mean_stays_within_the_honest_range(honest, bad, fraction):
    """Yin et al. 2018: with at most floor(beta n) bad values, the result lies between the
    smallest and largest honest value."""
    assume(len(bad) <= trimmed_count(len(honest) + len(bad), fraction))
    states = [{"w": torch.tensor([v], dtype=torch.float64)} for v in honest + bad]

    value = float(trimmed_mean(states, fraction)["w"])

    assert min(honest) - 1e-9 <= value <= max(honest) + 1e-9


def test_robust_mean_without_clip_or_trim_is_the_weighted_mean():
    sent = {"w": torch.tensor([1.0, -1.0])}
    states = [{"w": torch.tensor([2.0, 0.0])}, {"w": torch.tensor([4.0, 1.0])}]

    out = _robust_state(sent, states, [1, 3], aggregation="mean", trim_fraction=0.1,
                        clip_norm=0.0)

    assert torch.allclose(out["w"], weighted_mean(states, [1, 3])["w"], atol=1e-7)


def test_robust_mean_clips_each_change_before_averaging():
    sent = {"w": torch.tensor([1.0, 1.0])}
    # changes [3, 4] (norm 5 -> [0.6, 0.8]) and [0, 0.5] (within the bound)
    states = [{"w": torch.tensor([4.0, 5.0])}, {"w": torch.tensor([1.0, 1.5])}]

    out = _robust_state(sent, states, [1, 1], aggregation="mean", trim_fraction=0.1,
                        clip_norm=1.0)

    assert torch.allclose(out["w"], torch.tensor([1.3, 1.65]), atol=1e-6)


def test_robust_changes_trim_each_level_and_clip_before_the_mean():
    # five clients of persona a, changes 1 2 3 100 -50 (global) and 2x (persona)
    changes = [ClientUpdate({"w": torch.tensor([v])}, "a", {"w": torch.tensor([2 * v])}, 1)
               for v in (1.0, 2.0, 3.0, 100.0, -50.0)]

    trimmed = robust_changes(changes, aggregation="trimmed-mean", trim_fraction=0.2,
                             clip_norm=0.0)
    clipped = robust_changes(changes[:2], aggregation="mean", trim_fraction=0.1,
                             clip_norm=1.5)

    assert set(trimmed) == {GLOBAL, level_name("a")}
    assert trimmed[GLOBAL]["w"].item() == 2.0 and trimmed[level_name("a")]["w"].item() == 4.0
    # 1 and 2 clipped to 1 and 1.5 (global); 2 and 4 to 1.5 and 1.5 (persona)
    assert clipped[GLOBAL]["w"].item() == 1.25 and clipped[level_name("a")]["w"].item() == 1.5
    assert robust_changes([], aggregation="mean", trim_fraction=0.1, clip_norm=0.0) == {}


def _update(value: float, persona: str, examples: int = 10) -> ClientUpdate:
    return ClientUpdate(global_state={KEY: torch.full((2, 2), value)}, persona=persona,
                        persona_state={KEY: torch.full((2, 2), 2 * value)} if persona else {},
                        num_examples=examples)


def test_robust_hierarchical_mean_groups_by_persona_and_skips_clients_without_one():
    # sent zero: each update's states are its changes
    updates = [_update(1.0, "a"), _update(3.0, "a"), _update(5.0, "")]

    global_mean, personas = robust_hierarchical_mean(
        updates, aggregation="mean", trim_fraction=0.1, clip_norm=0.0)

    assert torch.allclose(global_mean[KEY], torch.full((2, 2), 3.0))
    assert set(personas) == {"a"}
    assert torch.allclose(personas["a"][KEY], torch.full((2, 2), 4.0))


def _server_state() -> ServerState:
    zero = {KEY: torch.zeros(2, 2), "w.lora_A.weight": torch.ones(2, 2)}
    return ServerState(round=0, global_state=dict(zero), persona_states={"a": dict(zero)})


@pytest.mark.parametrize("settings", [{"aggregation": "trimmed-mean", "trim_fraction": 0.2},
                                      {"clip_update_norm": 1.0}], ids=["trimmed", "clipped"])
def test_apply_round_bounds_one_extreme_update(settings):
    """Four honest changes of 0.1..0.4 per coordinate and one of 1000: the plain mean moves
    by ~200, the trimmed mean stays in the honest range, the clipped mean moves <= C."""
    updates = [_update(v, "a") for v in (0.1, 0.2, 0.3, 0.4, 1000.0)]
    plain, robust = _server_state(), _server_state()

    apply_round(plain, updates, RunConfig())
    apply_round(robust, updates, RunConfig(**settings))

    assert float(plain.global_state[KEY].max()) > 199
    change = robust.global_state[KEY]
    if "trim_fraction" in settings:
        assert float(change.min()) >= 0.1 and float(change.max()) <= 0.4
        assert torch.allclose(change, torch.full((2, 2), 0.3))  # mean of 0.2, 0.3, 0.4
    else:
        assert float(change.norm()) <= 1.0 + 1e-6
    assert torch.equal(robust.global_state["w.lora_A.weight"], torch.ones(2, 2))  # not sent


def test_default_aggregation_is_unchanged_by_the_hook():
    updates = [_update(v, "a", examples=n) for v, n in ((0.1, 1), (0.7, 3))]
    state = _server_state()

    apply_round(state, updates, RunConfig())

    expected = weighted_mean([u.global_state for u in updates], [1, 3])[KEY]
    assert torch.equal(state.global_state[KEY], expected)


@pytest.mark.parametrize(("changes", "message"), [
    ({"aggregation": "median"}, "aggregation must be one of mean, trimmed-mean; got 'median'"),
    ({"trim_fraction": 0.5}, r"trim-fraction must be in \[0, 0.5\), got 0.5"),
    ({"clip_update_norm": -1.0}, "clip-update-norm must be a finite number >= 0, got -1.0"),
    ({"clip_update_norm": math.inf}, "clip-update-norm must be a finite number >= 0, got inf"),
    ({"fault_fraction": 1.0}, r"fault-fraction must be in \[0, 1\), got 1.0"),
    ({"fault_kinds": "nan,oops"}, ("fault-kinds must name some of nan, inf, shape, names, "
                                   "norm, crash; got 'nan,oops'")),
    ({"fault_kinds": " , "}, "fault-kinds must name some of"),
    ({"central_dp": True, "aggregation": "trimmed-mean"}, "central-dp aggregates them its own"),
    ({"central_dp": True, "clip_update_norm": 1.0}, "need the server to see each update"),
])
def test_bad_robustness_settings_are_refused_by_name(changes, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig(**changes)


def test_robust_core_does_not_import_flower():
    code = "import sys, server.aggregation; sys.exit('flwr' in sys.modules)"

    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
