"""Privacy accounting (shared.privacy.accounting): epsilon over all rounds and the on-device ledger."""

from __future__ import annotations

import json
import math
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import RDPAccountant

from shared.privacy.accounting import (
    PRV_EPS_ERROR,
    PrivacyLedger,
    calibrate_noise,
    epsilon,
    released_entries,
    round_entries,
)

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
    assert raw["sources"] == ["", ""] and raw["federation_rounds"] == {"": 3}
    assert raw["epsilon"] == pytest.approx(ledger.epsilon, rel=1e-12)
    assert math.isfinite(back.epsilon) and back.epsilon > 0


# -- the PRV accountant, the round's entries and the calibrated noise ----------------------

def _exact_gaussian_epsilon(sigma: float, steps: int, delta: float) -> float:
    """The exact epsilon of ``steps`` full-batch Gaussian mechanisms (sensitivity 1, noise
    ``sigma``): one Gaussian with mu = sqrt(steps) / sigma, whose privacy profile is
    delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2) (Balle and Wang, "Improving
    the Gaussian Mechanism for Differential Privacy", ICML 2018)."""
    from scipy.optimize import brentq
    from scipy.stats import norm

    mu = math.sqrt(steps) / sigma

    def excess(eps: float) -> float:
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2) - delta

    return brentq(excess, 0.0, 100.0)


@pytest.mark.parametrize(("sigma", "steps"), [(1.0, 1), (0.85, 2), (1.36, 5), (2.0, 3)])
def test_prv_is_a_tight_upper_bound_on_the_exact_full_batch_epsilon(sigma, steps):
    # Arrange: at q = 1 the composition has a closed form to compare with
    exact = _exact_gaussian_epsilon(sigma, steps, DELTA)

    # Act
    prv = epsilon([(sigma, 1.0, steps)], delta=DELTA, accountant="prv")
    rdp = epsilon([(sigma, 1.0, steps)], delta=DELTA, accountant="rdp")

    # Assert: PRV is sound (never below the truth) and within its stated error of it; RDP
    # is sound and looser
    assert exact <= prv <= exact + 2 * PRV_EPS_ERROR
    assert rdp > prv


@pytest.mark.parametrize(("history", "pinned_prv"), [
    ([(1.5, 0.04, 2250)], 6.7791), ([(1.0, 0.16, 30)], 6.4506)])
def test_prv_pinned_values_and_within_the_stated_tolerance_below_rdp(history, pinned_prv):
    # Act
    prv = epsilon(history, delta=DELTA, accountant="prv")
    rdp = epsilon(history, delta=DELTA, accountant="rdp")

    # Assert: pinned, and the stated tolerance: PRV at most RDP, and at least 80% of it
    assert prv == pytest.approx(pinned_prv, abs=1e-3)
    assert 0.8 * rdp <= prv <= rdp


def test_round_entries_merge_the_loss_release_when_it_has_the_same_noise():
    same = round_entries(noise_multiplier=1.2, sample_rate=1.0, steps=1,
                         loss_noise_multiplier=1.2)
    apart = round_entries(noise_multiplier=1.2, sample_rate=1.0, steps=1,
                          loss_noise_multiplier=8.0, selection_noise=1.0)

    assert same == [(1.2, 1.0, 2)]
    assert apart == [(1.2, 1.0, 1), (8.0, 1.0, 1), (1.0, 1.0, 1)]


@pytest.mark.parametrize(("step", "loss", "selection", "expected"), [
    ((1.2, 0.5, 3), (1.2, 0.5, 1), None, [(1.2, 0.5, 4)]),  # same mechanism: one more step
    ((1.2, 0.5, 3), (4.8, 0.5, 1), None, [(1.2, 0.5, 3), (4.8, 0.5, 1)]),
    ((1.2, 0.5, 3), (1.2, 0.25, 1), (1.0, 1.0, 1), [(1.2, 0.5, 3), (1.2, 0.25, 1), (1.0, 1.0, 1)]),
    (None, None, None, []),  # no DP: nothing to account
])
def test_released_entries_compose_what_the_mechanisms_returned(step, loss, selection, expected):
    assert released_entries(step, loss, selection) == expected


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_calibrated_noise_is_the_smallest_that_fits_the_planned_rounds(accountant):
    # Arrange: one round already spent; two more planned
    spent = [(1.0, 1.0, 1)]

    def per_round(sigma):
        return [(sigma, 1.0, 1), (8.0, 1.0, 1)]

    # Act
    sigma = calibrate_noise(spent, per_round, rounds_left=2, target_epsilon=8.0, delta=DELTA,
                            accountant=accountant, tolerance=0.001)

    # Assert: it fits, and a little less noise would not
    def total(s):
        return epsilon([*spent, (s, 1.0, 2), (8.0, 1.0, 2)], delta=DELTA,
                       accountant=accountant)

    assert total(sigma) <= 8.0 < total(sigma - 0.002)


def test_calibration_gives_up_when_the_budget_is_spent_and_floors_at_low():
    def per_round(sigma):
        return [(sigma, 1.0, 1)]

    spent = [(0.5, 1.0, 4)]  # epsilon far above 1 already
    assert calibrate_noise(spent, per_round, rounds_left=1, target_epsilon=1.0,
                           delta=DELTA) is None
    assert calibrate_noise([], per_round, rounds_left=1, target_epsilon=1000.0, delta=DELTA,
                           low=0.3) == 0.3


def test_a_prv_ledger_enforces_prv_and_keeps_rdp_beside_it():
    # Arrange
    ledger = PrivacyLedger(target_epsilon=8.0, target_delta=DELTA, accountant="prv")
    ledger.record((0.85, 1.0, 2))

    # Act
    raw = ledger.to_json()
    back = PrivacyLedger.from_json(json.loads(json.dumps(raw)))

    # Assert: 7.99 by PRV fits the budget of 8 where RDP (8.59) would not
    assert raw["accountant"] == "prv" and back.accountant == "prv"
    assert raw["epsilon"] == pytest.approx(7.997, abs=2e-3) and raw["epsilon"] <= 8.0
    assert raw["rdp_epsilon"] == pytest.approx(8.586, abs=2e-3)
    with pytest.raises(ValueError, match="unknown accountant"):
        PrivacyLedger.from_json({**raw, "accountant": "moments"})


def test_an_open_round_is_taken_back_only_for_its_own_retry_and_survives_json():
    # Arrange: one closed round, then one open round
    ledger = PrivacyLedger(target_epsilon=8.0, target_delta=1e-5)
    ledger.record((1.0, 0.5, 2), opening=(1, "a"), federation="f")
    ledger.close()
    ledger.record((0.9, 0.5, 2), (4.0, 1.0, 1), opening=(2, "b"), federation="f")
    stored = PrivacyLedger.from_json(json.loads(json.dumps(ledger.to_json())))

    # Act / Assert: another round or instruction takes nothing back
    assert stored.open_round == (2, "b", 1, "f", 1)
    assert not stored.reopen(2, "c") and not stored.reopen(3, "b")
    assert stored.rounds == 2 and len(stored.history) == 3 and stored.sources == ["f"] * 3
    # its own retry takes back exactly that round's entries, once
    assert stored.reopen(2, "b")
    assert stored.history == [(1.0, 0.5, 2)] and stored.rounds_in("f") == 1
    assert stored.sources == ["f"]
    assert not stored.reopen(2, "b")
    assert not ledger.reopen(1, "a")  # a closed round stays accounted


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_epsilon_warns_nothing_at_large_noise(accountant):
    # PRV sizes its domain with an RDP bound whose "optimal order is the largest alpha"
    # warning filled every simulated device's log; the bound is still sound
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spent = epsilon([(20.0, 1.0, 1)], delta=1e-5, accountant=accountant)
    assert 0 < spent < 1
