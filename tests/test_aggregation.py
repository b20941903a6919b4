"""Aggregation (server.aggregation): weighted FedAvg, per-persona means, FedAdam, and the
protocol over changes (one mean change per level, one ``sent + lr * change`` step)."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from server.aggregation import (
    GLOBAL,
    ClientUpdate,
    FedAdamState,
    apply_change,
    change,
    client_change,
    fedadam_step,
    group_by_persona,
    hierarchical_mean,
    level_name,
    mean_changes,
    step_levels,
    weighted_mean,
    weighted_sum,
)


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def _minus(target: dict, current: dict) -> dict:
    """The pseudo-gradient FedAdam takes: ``target - current``."""
    return {k: target[k] - current[k] for k in current}


# -- weighted_mean ------------------------------------------------------------------------

def test_weighted_mean_hand_values():
    # Arrange
    states = [{"w": _t(1.0, 2.0)}, {"w": _t(3.0, 6.0)}]

    # Act
    mean = weighted_mean(states, [1, 3])

    # Assert: (1*1 + 3*3)/4 = 2.5, (1*2 + 3*6)/4 = 5.0
    assert torch.equal(mean["w"], _t(2.5, 5.0))
    assert mean["w"].dtype == torch.float32


def test_weighted_mean_is_key_by_key():
    states = [{"a": _t(0.0), "b": _t(10.0)}, {"a": _t(4.0), "b": _t(20.0)}]

    mean = weighted_mean(states, [3.0, 1.0])

    assert torch.equal(mean["a"], _t(1.0))
    assert torch.equal(mean["b"], _t(12.5))


def test_weighted_mean_keeps_the_input_dtype():
    states = [{"w": _t(1.0).to(torch.bfloat16)}, {"w": _t(3.0).to(torch.bfloat16)}]

    mean = weighted_mean(states, [1, 1])

    assert mean["w"].dtype == torch.bfloat16
    assert mean["w"].item() == 2.0


def test_weighted_mean_does_not_modify_inputs():
    a, b = {"w": _t(1.0, 2.0)}, {"w": _t(3.0, 6.0)}

    weighted_mean([a, b], [1, 1])

    assert torch.equal(a["w"], _t(1.0, 2.0)) and torch.equal(b["w"], _t(3.0, 6.0))


def test_weighted_mean_rejects_mismatched_keys():
    with pytest.raises(ValueError, match="different keys"):
        weighted_mean([{"a": _t(1.0)}, {"b": _t(1.0)}], [1, 1])
    with pytest.raises(ValueError, match="different keys"):
        weighted_mean([{"a": _t(1.0)}, {"a": _t(1.0), "b": _t(1.0)}], [1, 1])


@pytest.mark.parametrize("weights", [[0, 0], [1, -1], [float("nan"), 1.0]])
def test_weighted_mean_rejects_weights_without_positive_sum(weights):
    with pytest.raises(ValueError, match="weights"):
        weighted_mean([{"a": _t(1.0)}, {"a": _t(2.0)}], weights)


def test_weighted_mean_rejects_empty_and_length_mismatch():
    with pytest.raises(ValueError, match="nothing"):
        weighted_mean([], [])
    with pytest.raises(ValueError, match="2 states but 1 weights"):
        weighted_mean([{"a": _t(1.0)}, {"a": _t(2.0)}], [1])


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.floats(-100, 100), min_size=1, max_size=6),
       weights=st.lists(st.integers(1, 50), min_size=6, max_size=6))
def test_weighted_mean_lies_between_min_and_max(values, weights):
    states = [{"w": torch.tensor([v], dtype=torch.float64)} for v in values]

    mean = weighted_mean(states, weights[:len(values)])["w"].item()

    assert min(values) - 1e-9 <= mean <= max(values) + 1e-9


@settings(max_examples=60, deadline=None)
@given(value=st.floats(-1e3, 1e3), n=st.integers(1, 5), scale=st.integers(1, 100))
def test_weighted_mean_of_equal_states_is_that_state(value, n, scale):
    states = [{"w": torch.tensor([value], dtype=torch.float64)} for _ in range(n)]

    mean = weighted_mean(states, [scale] * n)["w"].item()

    assert math.isclose(mean, value, rel_tol=1e-12, abs_tol=1e-12)


# -- hierarchical_mean --------------------------------------------------------------------

def _update(g: float, persona: str, p: float, n: int) -> ClientUpdate:
    return ClientUpdate(global_state={"B": _t(g)}, persona=persona, persona_state={"B": _t(p)},
                        num_examples=n)


def test_hierarchical_mean_hand_values():
    # Arrange: two clients in persona "a", one in "b"
    updates = [_update(1.0, "a", 10.0, 1), _update(4.0, "a", 40.0, 2),
               _update(8.0, "b", 80.0, 5)]

    # Act
    global_mean, persona_means = hierarchical_mean(updates)

    # Assert: global over all 8 examples; each persona over its members only
    assert torch.equal(global_mean["B"], _t((1 * 1 + 4 * 2 + 8 * 5) / 8))  # 6.125
    assert set(persona_means) == {"a", "b"}
    assert torch.equal(persona_means["a"]["B"], _t((10 * 1 + 40 * 2) / 3))  # 30.0
    assert torch.equal(persona_means["b"]["B"], _t(80.0))


def test_hierarchical_mean_with_clients_without_persona():
    updates = [ClientUpdate({"B": _t(2.0)}, "", {}, 1), _update(4.0, "a", 6.0, 1)]

    global_mean, persona_means = hierarchical_mean(updates)

    assert torch.equal(global_mean["B"], _t(3.0))
    assert persona_means[""] == {}
    assert torch.equal(persona_means["a"]["B"], _t(6.0))


def test_group_by_persona_keeps_order():
    updates = [_update(0, "b", 0, 1), _update(1, "a", 0, 1), _update(2, "b", 0, 1)]

    groups = group_by_persona(updates)

    assert list(groups) == ["b", "a"]
    assert [u.global_state["B"].item() for u in groups["b"]] == [0.0, 2.0]


# -- fedadam_step ---------------------------------------------------------------------------

def test_fedadam_first_step_hand_values():
    # Arrange
    current = {"w": torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)}
    target = {"w": torch.tensor([1.5, -1.0, 1.0], dtype=torch.float64)}
    lr, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3

    # Act
    new, state = fedadam_step(current, _minus(target, current), FedAdamState(), lr=lr,
                              beta1=b1, beta2=b2, tau=tau)

    # Assert: from zero moments, m=(1-b1)d, v=(1-b2)d^2, new = x + lr*m/(sqrt(v)+tau)
    for i, (x, y) in enumerate(zip([0.5, -1.0, 2.0], [1.5, -1.0, 1.0])):
        d = y - x
        m, v = (1 - b1) * d, (1 - b2) * d * d
        assert state.m["w"][i].item() == pytest.approx(m, rel=1e-12, abs=1e-15)
        assert state.v["w"][i].item() == pytest.approx(v, rel=1e-12, abs=1e-15)
        assert new["w"][i].item() == pytest.approx(x + lr * m / (math.sqrt(v) + tau),
                                                   rel=1e-12, abs=1e-15)
    assert new["w"][1].item() == -1.0  # no pseudo-gradient, no move


def test_fedadam_second_step_uses_the_moments():
    current = {"w": torch.tensor([0.0], dtype=torch.float64)}
    target = {"w": torch.tensor([1.0], dtype=torch.float64)}
    lr, b1, b2, tau = 1.0, 0.9, 0.99, 1e-3
    x1, s1 = fedadam_step(current, _minus(target, current), FedAdamState(), lr=lr)

    x2, s2 = fedadam_step(x1, _minus(target, x1), s1, lr=lr)

    d1, d2 = 1.0, 1.0 - x1["w"].item()
    m = b1 * (1 - b1) * d1 + (1 - b1) * d2
    v = b2 * (1 - b2) * d1 ** 2 + (1 - b2) * d2 ** 2
    assert s2.m["w"].item() == pytest.approx(m, rel=1e-12)
    assert s2.v["w"].item() == pytest.approx(v, rel=1e-12)
    assert x2["w"].item() == pytest.approx(x1["w"].item() + lr * m / (math.sqrt(v) + tau),
                                           rel=1e-12)


def test_fedadam_does_not_mutate_its_inputs():
    current, target = {"w": _t(0.0)}, {"w": _t(1.0)}
    state = FedAdamState(m={"w": _t(0.5)}, v={"w": _t(0.25)})

    fedadam_step(current, _minus(target, current), state, lr=1.0)

    assert current["w"].item() == 0.0 and target["w"].item() == 1.0
    assert state.m["w"].item() == 0.5 and state.v["w"].item() == 0.25


@settings(max_examples=60, deadline=None)
@given(x=st.floats(-10, 10), y=st.floats(-10, 10))
def test_fedadam_first_step_moves_towards_the_target_by_at_most_lr(x, y):
    new, _ = fedadam_step({"w": torch.tensor([x], dtype=torch.float64)},
                          {"w": torch.tensor([y - x], dtype=torch.float64)}, FedAdamState(),
                          lr=0.5)

    step = new["w"].item() - x
    assert step * (y - x) >= 0  # same direction as the pseudo-gradient
    # |m| / sqrt(v) = (1-b1)/sqrt(1-b2) = 1 at the defaults
    assert abs(step) <= 0.5 + 1e-12


# -- the protocol over changes: one mean change per level, one step -----------------------

def test_change_is_the_float64_difference_and_refuses_other_keys():
    sent = {"w": _t(1.0, 0.5)}

    delta = change(sent, {"w": _t(3.0, 0.25)})

    assert delta["w"].dtype == torch.float64
    assert torch.equal(delta["w"], torch.tensor([2.0, -0.25], dtype=torch.float64))
    with pytest.raises(ValueError, match="different keys from the one sent"):
        change(sent, {"v": _t(1.0, 0.5)})


def test_client_change_takes_each_level_from_what_was_sent():
    sent = {GLOBAL: {"B": _t(1.0)}, level_name("a"): {"B": _t(10.0)}}
    with_persona = ClientUpdate({"B": _t(4.0)}, "a", {"B": _t(7.0)}, num_examples=3)
    without = ClientUpdate({"B": _t(0.0)}, "", {}, num_examples=2)

    a, b = client_change(with_persona, sent), client_change(without, sent)

    assert (a.global_state["B"].item(), a.persona_state["B"].item()) == (3.0, -3.0)
    assert (a.persona, a.num_examples) == ("a", 3)
    assert b.global_state["B"].item() == -1.0 and b.persona_state == {}


def test_weighted_sum_hand_values_and_zeros_when_empty():
    states = [{"w": _t(3.0, 4.0)}, {"w": _t(1.0, 1.0)}]

    summed = weighted_sum(states, [2.0, 0.5])
    empty = weighted_sum([], [], like={"w": torch.ones(2, 3)})

    assert torch.equal(summed["w"], torch.tensor([6.5, 8.5], dtype=torch.float64))
    assert torch.equal(empty["w"], torch.zeros(2, 3, dtype=torch.float64))


def test_mean_changes_hand_values_per_level():
    # Arrange: sent global 1, persona a 10; weights 1, 3 (a) and 4 (no persona)
    sent = {GLOBAL: {"B": _t(1.0)}, level_name("a"): {"B": _t(10.0)}}
    updates = [ClientUpdate({"B": _t(3.0)}, "a", {"B": _t(14.0)}, 1),
               ClientUpdate({"B": _t(5.0)}, "a", {"B": _t(6.0)}, 3),
               ClientUpdate({"B": _t(-1.0)}, "", {}, 4)]

    # Act
    changes = mean_changes([client_change(u, sent) for u in updates])

    # Assert: global (1*2 + 3*4 + 4*(-2)) / 8 = 0.75; persona a (1*4 + 3*(-4)) / 4 = -2
    assert set(changes) == {GLOBAL, level_name("a")}
    assert changes[GLOBAL]["B"].item() == 0.75
    assert changes[level_name("a")]["B"].item() == -2.0
    assert mean_changes([]) == {}  # nobody: nothing moves


def test_apply_change_is_sent_plus_lr_times_change_in_the_dtype_sent():
    sent = {"w": _t(1.0, 2.0), "h": _t(4.0).to(torch.bfloat16)}
    delta = {"w": torch.tensor([0.5, -1.0], dtype=torch.float64),
             "h": torch.tensor([2.0], dtype=torch.float64)}

    new = apply_change(sent, delta, lr=0.5)

    assert torch.equal(new["w"], _t(1.25, 1.5)) and new["w"].dtype == torch.float32
    assert new["h"].item() == 5.0 and new["h"].dtype == torch.bfloat16


def test_step_levels_fedavg_moves_only_the_levels_with_a_change():
    sent = {GLOBAL: {"B": _t(1.0, 2.0)}, level_name("a"): {"B": _t(0.0, 0.0)}}
    changes = {GLOBAL: {"B": torch.tensor([2.0, -4.0], dtype=torch.float64)}}

    new, moments = step_levels(sent, changes, {}, optimizer="fedavg", lr=0.25)

    assert set(new) == {GLOBAL} and moments == {}
    assert torch.equal(new[GLOBAL]["B"], _t(1.5, 1.0))  # 1 + 2/4, 2 - 4/4


def test_step_levels_fedadam_first_step_hand_values_and_moments_in_the_sent_dtype():
    sent = {GLOBAL: {"B": _t(0.0, 1.0)}}
    changes = {GLOBAL: {"B": torch.tensor([1.0, 0.0], dtype=torch.float64)}}

    new, moments = step_levels(sent, changes, {}, optimizer="fedadam", lr=0.1)

    # m = 0.1 d, v = 0.01 d^2: 0 + 0.1 * 0.1 / (0.1 + 1e-3); no pseudo-gradient, no move
    assert new[GLOBAL]["B"][0].item() == pytest.approx(0.01 / 0.101, rel=1e-6)
    assert new[GLOBAL]["B"][1].item() == 1.0
    assert moments[GLOBAL].m["B"].dtype == torch.float32
    assert moments[GLOBAL].m["B"][0].item() == pytest.approx(0.1)
    assert moments[GLOBAL].v["B"][0].item() == pytest.approx(0.01)
    with pytest.raises(ValueError, match="optimizer must be one of fedavg, fedadam"):
        step_levels(sent, changes, {}, optimizer="sgd", lr=0.1)


# -- the plain round against the code before issue 14 (the mean of absolute states) -------

def _old_plain_round(sent: torch.Tensor, states: list[torch.Tensor],
                     weights: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Before issue 14: the weighted mean of the absolute states (float64, cast to float32),
    then ``sent + lr * (mean - sent)`` in float32 at lr = 1. Kept here, only for this
    comparison."""
    total = float(sum(weights))
    mean = sum((w / total) * s.double() for s, w in zip(states, weights)).to(torch.float32)
    return mean, sent + 1.0 * (mean - sent)


def _new_plain_round(sent: torch.Tensor, states: list[torch.Tensor],
                     weights: list[int]) -> torch.Tensor:
    levels = {GLOBAL: {"B": sent}}
    updates = [ClientUpdate({"B": s}, "", {}, w) for s, w in zip(states, weights)]
    changes = mean_changes([client_change(u, levels) for u in updates])
    new, _ = step_levels(levels, changes, {}, optimizer="fedavg", lr=1.0)
    return new[GLOBAL]["B"]


def _random_rounds(seed: int, *, start_at_zero: bool, cases: int = 10):
    """``cases`` random rounds of float32 states: 2-8 clients, 32 x 1000 coordinates, a
    change of 0.01 * N(0, 1) each from a sent N(0, 1) (or zero) adapter, weights 1-199."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(cases):
        n = int(torch.randint(2, 9, (1,), generator=g))
        sent = torch.randn(32, 1000, generator=g)
        if start_at_zero:
            sent = torch.zeros_like(sent)
        states = [sent + 0.01 * torch.randn(32, 1000, generator=g) for _ in range(n)]
        weights = [int(w) for w in torch.randint(1, 200, (n,), generator=g)]
        yield sent, states, weights


def _ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Float32 units in the last place between ``a`` and ``b`` (same sign)."""
    return (a.view(torch.int32).long() - b.view(torch.int32).long()).abs()


def test_plain_round_from_a_zero_adapter_is_bit_identical_to_the_old_mean():
    """Round 1 of LoRA's B (sent = 0): the new path and the old one agree bit for bit."""
    for sent, states, weights in _random_rounds(0, start_at_zero=True):
        old_mean, old_stepped = _old_plain_round(sent, states, weights)

        new = _new_plain_round(sent, states, weights)

        assert torch.equal(new, old_mean) and torch.equal(new, old_stepped)


def test_plain_round_differs_from_the_old_mean_by_one_ulp_in_few_coordinates():
    """From a non-zero adapter, ``sent + sum_i (w_i / W)(s_i - sent)`` and the old
    ``sum_i (w_i / W) s_i`` round differently in float64, so a few float32 coordinates
    differ, by one ulp (measured: 101 of 320,000). Where they differ, the new value is
    mostly the exactly rounded mean (100 of the 101; the old one in 1): the new sum
    rounds terms of size |s_i - sent|, the old one terms of size |s_i|."""
    differing = total = new_exact = old_exact = 0
    for sent, states, weights in _random_rounds(1, start_at_zero=False):
        old_mean, _ = _old_plain_round(sent, states, weights)

        new = _new_plain_round(sent, states, weights)

        where = (new != old_mean).nonzero().tolist()
        differing, total = differing + len(where), total + new.numel()
        assert int(_ulps(new, old_mean).max()) <= 1
        for i, j in where:  # the exact mean, in rationals
            exact = sum(Fraction(w, sum(weights)) * Fraction(float(s[i, j]))
                        for s, w in zip(states, weights))
            rounded = torch.tensor(float(exact), dtype=torch.float64).float()
            new_exact += bool(new[i, j] == rounded)
            old_exact += bool(old_mean[i, j] == rounded)
    assert 0 < differing < 1e-3 * total
    assert new_exact > 0.9 * differing > old_exact


def test_plain_round_differs_from_the_old_float32_step_within_its_rounding():
    """The old path then took ``sent + 1.0 * (mean - sent)`` in float32, which is not the
    mean where ``mean - sent`` does not fit in float32 (sign changes, cancellation): there
    today's adapters were off by up to one float32 ulp of max(|sent|, |mean|) (measured:
    680 of 320,000 coordinates, up to 134 ulps of the result). The new step rounds once."""
    differing = 0
    for sent, states, weights in _random_rounds(1, start_at_zero=False):
        old_mean, old_stepped = _old_plain_round(sent, states, weights)

        new = _new_plain_round(sent, states, weights)

        scale = torch.maximum(sent.abs(), old_mean.abs())
        assert bool(((new - old_stepped).abs() <= torch.finfo(torch.float32).eps * scale).all())
        differing += int((new != old_stepped).sum())
    assert 0 < differing < 1e-2 * 320_000
