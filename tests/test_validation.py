"""Update checks (shared.protocol.validation): spec (keys, dtype, shape) and values (finite, norm)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.protocol.validation import UpdateRejected, check_spec, check_values

EXPECTED = {"a.lora_B.weight": (4, 2), "b.lora_B.weight": (3, 2)}


def _spec(**over):
    spec = {k: ("float32", shape) for k, shape in EXPECTED.items()}
    spec.update(over)
    return spec


# -- check_spec ---------------------------------------------------------------------------

def test_check_spec_accepts_a_matching_spec():
    check_spec(_spec(), EXPECTED, what="global adapter")
    check_spec({k: ("float32", list(v)) for k, v in EXPECTED.items()}, EXPECTED, what="x")


def test_check_spec_rejects_an_unexpected_key():
    spec = {**_spec(), "c.lora_A.weight": ("float32", (2, 2))}

    with pytest.raises(UpdateRejected, match=r"global adapter: unexpected key c\.lora_A\.weight"):
        check_spec(spec, EXPECTED, what="global adapter")


def test_check_spec_counts_further_unexpected_keys():
    spec = {**_spec(), "x": ("float32", (1,)), "y": ("float32", (1,))}

    with pytest.raises(UpdateRejected, match=r"unexpected key x \(\+1 more\)"):
        check_spec(spec, EXPECTED, what="w")


def test_check_spec_rejects_a_missing_key():
    spec = _spec()
    del spec["b.lora_B.weight"]

    with pytest.raises(UpdateRejected, match=r"persona p adapter: missing key b\.lora_B\.weight"):
        check_spec(spec, EXPECTED, what="persona p adapter")


def test_check_spec_rejects_a_wrong_dtype():
    spec = _spec(**{"a.lora_B.weight": ("float64", (4, 2))})

    with pytest.raises(UpdateRejected, match=r"a\.lora_B\.weight has dtype float64"):
        check_spec(spec, EXPECTED, what="w")


def test_check_spec_rejects_a_wrong_shape():
    spec = _spec(**{"b.lora_B.weight": ("float32", (2, 3))})

    with pytest.raises(UpdateRejected,
                       match=r"b\.lora_B\.weight has shape \(2, 3\), expected \(3, 2\)"):
        check_spec(spec, EXPECTED, what="w")


def test_update_rejected_is_a_value_error():
    assert issubclass(UpdateRejected, ValueError)


# -- check_values -------------------------------------------------------------------------

def test_check_values_returns_the_l2_norm():
    assert check_values({"w": torch.tensor([3.0, 4.0])}, what="w") == 5.0


def test_check_values_norm_spans_all_keys():
    state = {"a": torch.tensor([[1.0, 2.0]]), "b": torch.tensor([2.0, 4.0])}

    assert check_values(state, what="w") == 5.0  # sqrt(1 + 4 + 4 + 16)


def test_check_values_measures_the_change_from_the_reference():
    state = {"w": torch.tensor([4.0, 6.0])}
    reference = {"w": torch.tensor([1.0, 2.0])}

    assert check_values(state, what="w", reference=reference) == 5.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_check_values_rejects_non_finite(bad):
    state = {"ok": torch.zeros(2), "w.lora_B": torch.tensor([1.0, bad])}

    with pytest.raises(UpdateRejected, match=r"global adapter: w\.lora_B holds NaN or Inf"):
        check_values(state, what="global adapter")


def test_check_values_enforces_the_bound_on_the_change():
    state = {"w": torch.tensor([4.0, 6.0])}
    reference = {"w": torch.tensor([1.0, 2.0])}

    assert check_values(state, what="w", reference=reference, max_delta_norm=5.0) == 5.0
    with pytest.raises(UpdateRejected, match="exceeds the bound"):
        check_values(state, what="w", reference=reference, max_delta_norm=4.99)
    # The bound is on the change, not on the state itself (norm of the state is ~7.2)
    with pytest.raises(UpdateRejected):
        check_values(state, what="w", max_delta_norm=5.0)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3, width=32), min_size=1, max_size=20))
def test_check_values_matches_torch_norm(values):
    tensor = torch.tensor(values, dtype=torch.float32)

    norm = check_values({"w": tensor}, what="w")

    assert math.isclose(norm, torch.linalg.vector_norm(tensor.double()).item(), rel_tol=1e-12,
                        abs_tol=1e-12)
