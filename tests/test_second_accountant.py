"""Google's dp_accounting agrees with Opacus on pinned histories, and the audit uses it."""

from __future__ import annotations

import math

import pytest
from scipy.optimize import brentq
from scipy.stats import norm

from shared.privacy import second_accountant
from shared.privacy.accounting import PRV_EPS_ERROR, PrivacyLedger, epsilon
from shared.privacy.second_accountant import pld_epsilon, rdp_epsilon
from simulations.audit import ledger as ledger_audit
from simulations.audit.ledger import (
    NUMERICAL_TOLERANCE,
    RDP_COMPARISON_ORDERS,
    RDP_REL_TOLERANCE,
    audit_ledger,
    recompute,
)
from tests.test_ledger_audit import ENTRY, _ledger

DELTA = 1e-5
FULL_BATCH = [(0.9, 1.0, 1)]
DEFAULT_ROUNDS = [(0.9, 1.0, 1), (3.6, 1.0, 1)] * 2  # two rounds: a step, its loss at 4x noise
LONG_SUBSAMPLED = [(1.1, 0.01, 1000)]
MIXED = [(1.0, 0.2, 5), (4.0, 0.2, 1), (2.0, 1.0, 1)]

# (history, Google PLD, Google RDP), computed with dp-accounting 0.6.0 at delta 1e-5
PINNED = [
    (FULL_BATCH, 4.94732, 5.33915),
    (DEFAULT_ROUNDS, 7.73237, 8.31416),
    (LONG_SUBSAMPLED, 1.51619, 1.71173),
    (MIXED, 4.37499, 5.04546),
]


def _gaussian_epsilon(history, delta: float) -> float:
    """The exact epsilon of full-batch Gaussians: together one Gaussian with
    mu = sqrt(sum n / sigma^2) (Balle and Wang, "Improving the Gaussian Mechanism for
    Differential Privacy", ICML 2018, Theorem 8)."""
    mu = math.sqrt(sum(n / sigma ** 2 for sigma, _, n in history))

    def excess(eps: float) -> float:
        return norm.cdf(mu / 2 - eps / mu) - math.exp(eps) * norm.cdf(-mu / 2 - eps / mu) - delta

    return brentq(excess, 0.0, 100.0)


@pytest.mark.parametrize(("history", "pld", "rdp"), PINNED,
                         ids=["full-batch", "default-rounds", "long-subsampled", "mixed"])
def test_google_and_opacus_agree_on_pinned_histories(history, pld, rdp):
    # Act
    google_pld, google_rdp = pld_epsilon(history, delta=DELTA), rdp_epsilon(history, delta=DELTA)
    prv = epsilon(history, delta=DELTA, accountant="prv")
    opacus_rdp = epsilon(history, delta=DELTA, accountant="rdp")

    # Assert: the pinned numbers, the audit's tolerances, and on these histories even
    # the headline RDP figures within 0.1% (they need not be in general: other grids)
    assert google_pld == pytest.approx(pld, abs=1e-4)
    assert google_rdp == pytest.approx(rdp, abs=1e-4)
    assert abs(prv - google_pld) <= NUMERICAL_TOLERANCE
    assert prv - 2 * PRV_EPS_ERROR <= google_pld <= prv  # PRV's upper bound carries its error
    assert abs(google_rdp - opacus_rdp) <= 1e-3 * opacus_rdp
    assert rdp_epsilon(history, delta=DELTA, orders=RDP_COMPARISON_ORDERS) == pytest.approx(
        ledger_audit._opacus_rdp_at(history, DELTA, RDP_COMPARISON_ORDERS), rel=RDP_REL_TOLERANCE)


@pytest.mark.parametrize("history", [FULL_BATCH, DEFAULT_ROUNDS])
def test_pld_is_the_exact_gaussian_epsilon_up_to_its_discretisation(history):
    exact = _gaussian_epsilon(history, DELTA)

    google_pld = pld_epsilon(history, delta=DELTA)

    assert exact <= google_pld <= exact + 1e-3  # pessimistic: never below the truth


def test_nothing_spent_is_zero_and_entries_compose_in_any_grouping():
    assert pld_epsilon([], delta=DELTA) == rdp_epsilon([], delta=DELTA) == 0.0
    assert pld_epsilon([(1.0, 0.5, 0)], delta=DELTA) == 0.0
    assert second_accountant.history_event([(1.0, 0.5, 0)]) is None
    # the same spending split over rounds, in another order, is the same event
    split = [(3.6, 1.0, 1), (0.9, 1.0, 1)] * 2
    assert second_accountant.history_event(split) == second_accountant.history_event(
        [(3.6, 1.0, 2), (0.9, 1.0, 2)])
    assert pld_epsilon(split, delta=DELTA) == pytest.approx(pld_epsilon(DEFAULT_ROUNDS,
                                                                        delta=DELTA), abs=1e-9)


def test_a_ledger_claiming_less_than_its_history_gives_fails_and_an_honest_one_passes():
    # Arrange: the history holds q = 0.2, the stored epsilon was computed at q = 0.02
    honest = _ledger(rounds=1)
    understated = {**honest, "epsilon": recompute([(1.0, 0.02, 5)], DELTA, "rdp")}

    # Act
    ok = audit_ledger(honest, user_id="u", train_entry=ENTRY)
    bad = audit_ledger(understated, user_id="u", train_entry=ENTRY)

    # Assert
    assert ok.ok, ok.problems
    assert ok.google_pld_epsilon == pytest.approx(3.88046, abs=1e-4)
    assert ok.google_rdp_epsilon == pytest.approx(ok.rdp_epsilon, rel=1e-6)
    assert f"stored epsilon {understated['epsilon']} is below the tightest sound bound, " \
           f"{bad.google_pld_epsilon:.4f} by Google PLD: the ledger claims less than any " \
           "accountant gives" in bad.problems


def test_a_prv_ledger_at_its_upper_bound_is_not_below_googles_pld():
    ledger = PrivacyLedger(target_epsilon=16.0, target_delta=DELTA, accountant="prv")
    ledger.record(*DEFAULT_ROUNDS)

    finding = audit_ledger(ledger.to_json(), user_id="u", train_entry=DEFAULT_ROUNDS[0],
                           extra_entries=[DEFAULT_ROUNDS[1]])

    assert finding.ok, finding.problems
    assert finding.google_pld_epsilon < finding.epsilon  # the tightest, but within tolerance


def test_accountants_that_disagree_are_flagged(monkeypatch):
    # Arrange: Google's figures moved, as a bug in either library would move one side
    raw = _full_batch_ledger()
    real_pld, real_rdp = second_accountant.pld_epsilon, second_accountant.rdp_epsilon
    monkeypatch.setattr(second_accountant, "pld_epsilon",
                        lambda h, **kw: real_pld(h, **kw) + 2 * NUMERICAL_TOLERANCE)
    monkeypatch.setattr(second_accountant, "rdp_epsilon",
                        lambda h, **kw: real_rdp(h, **kw) * (1 + 10 * RDP_REL_TOLERANCE))

    # Act
    finding = audit_ledger(raw, user_id="u", train_entry=FULL_BATCH[0])

    # Assert
    assert any("and Google's PLD" in p and "the accountants disagree" in p
               for p in finding.problems)
    assert any("at the integer orders 2-64 differ" in p for p in finding.problems)


def test_a_google_failure_is_recorded_and_only_a_problem_without_prv(monkeypatch):
    # Arrange
    raw = _full_batch_ledger()

    def fails(history, **kwargs):
        raise ValueError("no grid for this history")

    monkeypatch.setattr(second_accountant, "pld_epsilon", fails)
    monkeypatch.setattr(second_accountant, "rdp_epsilon", fails)

    # Act
    with_prv = audit_ledger(raw, user_id="u", train_entry=FULL_BATCH[0])
    monkeypatch.setattr(ledger_audit, "recompute", lambda h, d, accountant: (
        epsilon(h, delta=d) if accountant == "rdp" else fails(h)))
    without_prv = audit_ledger(raw, user_id="u", train_entry=FULL_BATCH[0])

    # Assert
    assert with_prv.ok, with_prv.problems
    assert with_prv.google_pld_epsilon is None and with_prv.google_rdp_epsilon is None
    assert without_prv.problems == ["neither Opacus's PRV nor Google's PLD accountant can "
                                    "compute this history"]


def _full_batch_ledger() -> dict:
    ledger = PrivacyLedger(target_epsilon=8.0, target_delta=DELTA)
    ledger.record(*FULL_BATCH)
    return ledger.to_json()
