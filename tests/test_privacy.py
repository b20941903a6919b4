"""Privacy accounting (shared.privacy): epsilon over all rounds and the on-device ledger."""

from __future__ import annotations

import json
import math
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import RDPAccountant

from shared.privacy import PrivacyLedger, epsilon

DELTA = 1e-5


def _opacus_epsilon(steps: list[tuple[float, float, int]], delta: float) -> float:
    """Epsilon from Opacus's accountant stepped one optimizer step at a time."""
    accountant = RDPAccountant()
    for sigma, q, n in steps:
        for _ in range(n):
            accountant.step(noise_multiplier=sigma, sample_rate=q)
    return accountant.get_epsilon(delta=delta)


def test_empty_history_spends_nothing():
    assert epsilon([], delta=DELTA) == 0.0


def test_pinned_value_matches_opacus_stepped_directly():
    # Arrange: the Opacus test case, sigma=1.5, q=0.04, 2250 steps
    history = [(1.5, 0.04, 2250)]

    # Act
    ours = epsilon(history, delta=DELTA)

    # Assert
    assert ours == pytest.approx(_opacus_epsilon(history, DELTA), rel=1e-12)
    assert 7.0 < ours < 7.6  # ~7.33 with Opacus's RDP orders
    assert ours == pytest.approx(7.3291, abs=1e-3)


def test_history_split_into_rounds_composes_to_the_same_epsilon():
    one_run = epsilon([(1.5, 0.04, 2250)], delta=DELTA)

    rounds = epsilon([(1.5, 0.04, 750)] * 3, delta=DELTA)

    assert rounds == pytest.approx(one_run, rel=1e-12)


def test_mixed_history_matches_opacus():
    history = [(1.0, 0.1, 20), (2.0, 0.05, 30), (1.0, 0.1, 5)]

    assert epsilon(history, delta=DELTA) == pytest.approx(_opacus_epsilon(history, DELTA),
                                                          rel=1e-12)


def test_more_noise_spends_less():
    assert epsilon([(2.0, 0.04, 100)], delta=DELTA) < epsilon([(1.0, 0.04, 100)], delta=DELTA)


# Sample rates up to 0.1 plus full batches: Opacus's RDP series for large q < 1 is slow.
_entries = st.tuples(st.floats(0.5, 5.0), st.one_of(st.floats(0.001, 0.1), st.just(1.0)),
                     st.integers(0, 200))


@settings(max_examples=25, deadline=None)
@given(history=st.lists(_entries, min_size=1, max_size=3), extra=_entries)
def test_epsilon_never_decreases_as_history_grows(history, extra):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "optimal order is the largest alpha"
        before = epsilon(history, delta=DELTA)

        after = epsilon([*history, extra], delta=DELTA)

    assert before >= 0.0
    assert after >= before - 1e-9 * max(1.0, before)


# -- the ledger ------------------------------------------------------------------------

def test_ledger_starts_empty():
    ledger = PrivacyLedger(target_epsilon=8.0, target_delta=DELTA)

    assert ledger.epsilon == 0.0 and ledger.history == [] and ledger.rounds == 0


def test_can_afford_compares_the_epsilon_after_with_the_target():
    # Arrange
    entry = (1.5, 0.04, 2250)  # epsilon ~7.33
    rich = PrivacyLedger(target_epsilon=8.0, target_delta=DELTA)
    poor = PrivacyLedger(target_epsilon=7.0, target_delta=DELTA)

    # Act / Assert
    assert rich.can_afford(entry)
    assert not poor.can_afford(entry)
    assert rich.epsilon_after(entry) == pytest.approx(epsilon([entry], delta=DELTA), rel=1e-12)
    assert rich.history == []  # asking does not spend


def test_budget_runs_out_across_rounds():
    ledger = PrivacyLedger(target_epsilon=8.0, target_delta=DELTA)
    entry = (1.5, 0.04, 1125)  # half the pinned run

    ledger.record(entry)

    assert ledger.can_afford(entry)  # the whole run is ~7.33 <= 8
    ledger.record(entry)
    assert ledger.epsilon == pytest.approx(epsilon([(1.5, 0.04, 2250)], delta=DELTA), rel=1e-12)
    assert not ledger.can_afford(entry)


def test_record_appends_and_counts_rounds():
    ledger = PrivacyLedger(target_epsilon=8.0, target_delta=DELTA)

    ledger.record((1, 0.5, 3))
    ledger.record((1.0, 0.5, 0))  # a round without DP steps counts but spends nothing

    assert ledger.history == [(1.0, 0.5, 3)]
    assert all(type(x) is t for x, t in zip(ledger.history[0], (float, float, int)))
    assert ledger.rounds == 2


@pytest.mark.parametrize("entry", [
    (0.0, 0.1, 1), (-1.0, 0.1, 1), (float("nan"), 0.1, 1), (float("inf"), 0.1, 1),
    (1.0, 0.0, 1), (1.0, 1.5, 1), (1.0, float("nan"), 1), (1.0, 0.1, -1),
])
def test_record_rejects_invalid_entries(entry):
    ledger = PrivacyLedger(target_epsilon=8.0, target_delta=DELTA)

    with pytest.raises(ValueError, match="invalid accountant entry"):
        ledger.record(entry)

    assert ledger.history == [] and ledger.rounds == 0


def test_json_round_trip():
    # Arrange
    ledger = PrivacyLedger(target_epsilon=4.0, target_delta=1e-6)
    ledger.record((1.2, 0.05, 40))
    ledger.record((1.2, 0.05, 0))
    ledger.record((0.9, 0.1, 10))

    # Act
    raw = json.loads(json.dumps(ledger.to_json()))
    back = PrivacyLedger.from_json(raw)

    # Assert
    assert back == ledger
    assert raw["rounds"] == 3 and raw["accountant"] == "rdp"
    assert raw["history"] == [[1.2, 0.05, 40], [0.9, 0.1, 10]]
    assert raw["epsilon"] == pytest.approx(ledger.epsilon, rel=1e-12)
    assert math.isfinite(back.epsilon) and back.epsilon > 0
