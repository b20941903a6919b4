"""Aggregation (shared.aggregation): weighted FedAvg, per-persona means, FedAdam."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.aggregation import (
    ClientUpdate,
    FedAdamState,
    fedadam_step,
    group_by_persona,
    hierarchical_mean,
    weighted_mean,
)


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


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
    new, state = fedadam_step(current, target, FedAdamState(), lr=lr, beta1=b1, beta2=b2,
                              tau=tau)

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
    x1, s1 = fedadam_step(current, target, FedAdamState(), lr=lr)

    x2, s2 = fedadam_step(x1, target, s1, lr=lr)

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

    fedadam_step(current, target, state, lr=1.0)

    assert current["w"].item() == 0.0 and target["w"].item() == 1.0
    assert state.m["w"].item() == 0.5 and state.v["w"].item() == 0.25


@settings(max_examples=60, deadline=None)
@given(x=st.floats(-10, 10), y=st.floats(-10, 10))
def test_fedadam_first_step_moves_towards_the_target_by_at_most_lr(x, y):
    new, _ = fedadam_step({"w": torch.tensor([x], dtype=torch.float64)},
                          {"w": torch.tensor([y], dtype=torch.float64)}, FedAdamState(), lr=0.5)

    step = new["w"].item() - x
    assert step * (y - x) >= 0  # same direction as the pseudo-gradient
    # |m| / sqrt(v) = (1-b1)/sqrt(1-b2) = 1 at the defaults
    assert abs(step) <= 0.5 + 1e-12
