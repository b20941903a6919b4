"""The ledger audit recomputes epsilon independently and flags every inconsistency."""

from __future__ import annotations

import pytest

from shared.privacy.accounting import PrivacyLedger
from simulations.audit.ledger import audit_ledger, recompute

ENTRY = (1.0, 0.2, 5)


def _ledger(rounds=3, budget=8.0, entry=ENTRY):
    ledger = PrivacyLedger(target_epsilon=budget, target_delta=1e-5)
    for _ in range(rounds):
        ledger.record(entry)
    return ledger.to_json()


def test_an_honest_ledger_passes_and_agrees_with_both_accountants():
    raw = _ledger()

    finding = audit_ledger(raw, user_id="u1", train_entry=ENTRY, trained_rounds=3,
                           server_epsilon=raw["epsilon"])

    assert finding.ok, finding.problems
    assert finding.rdp_epsilon == pytest.approx(raw["epsilon"], rel=1e-9)
    assert finding.train_entries == 3
    # PRV is the tighter accountant: below RDP, and not wildly so
    assert 0.5 * finding.rdp_epsilon < finding.prv_epsilon < finding.rdp_epsilon


def test_a_tampered_epsilon_is_caught():
    raw = _ledger()
    raw["epsilon"] = raw["epsilon"] / 2

    finding = audit_ledger(raw, user_id="u1", train_entry=ENTRY)

    # half of it is also below every sound accountant's figure, Google's included
    assert finding.problems == [f"stored epsilon {raw['epsilon']} but the history gives "
                                f"{finding.rdp_epsilon:.6f}",
                                f"stored epsilon {raw['epsilon']} is below the tightest sound "
                                f"bound, {finding.google_pld_epsilon:.4f} by Google PLD: the "
                                "ledger claims less than any accountant gives"]


def test_over_budget_is_flagged():
    raw = _ledger(rounds=20, budget=100.0)
    raw["target_epsilon"] = 2.0

    finding = audit_ledger(raw, user_id="u1", train_entry=ENTRY)

    assert any(p.startswith("over budget") for p in finding.problems)


def test_a_rosier_sample_rate_than_the_run_uses_is_flagged():
    raw = _ledger(entry=(1.0, 0.05, 5))  # accounted at q=0.05 but the data give q=0.2

    finding = audit_ledger(raw, user_id="u1", train_entry=ENTRY, trained_rounds=3)

    assert len([p for p in finding.problems if "is not what this run accounts" in p]) == 3
    assert any("the server counted 3 updates, the ledger accounts 0" in p
               for p in finding.problems)


def test_undercounting_rounds_or_reported_epsilon_is_flagged():
    raw = _ledger(rounds=2)
    reported = recompute([ENTRY] * 3, 1e-5, "rdp")

    finding = audit_ledger(raw, user_id="u1", train_entry=ENTRY, trained_rounds=3,
                           server_epsilon=reported)

    assert any("the server counted 3 updates, the ledger accounts 2" in p
               for p in finding.problems)
    assert any("more than its ledger holds" in p for p in finding.problems)


def test_extra_mechanisms_of_the_run_are_allowed():
    ledger = PrivacyLedger(target_epsilon=50.0, target_delta=1e-5)
    ledger.record(ENTRY, (1.0, 1.0, 1))

    assert audit_ledger(ledger.to_json(), user_id="u", train_entry=ENTRY,
                        extra_entries=[(1.0, 1.0, 1)]).ok
    assert not audit_ledger(ledger.to_json(), user_id="u", train_entry=ENTRY).ok


def test_an_empty_ledger_is_zero_and_an_unlimited_budget_is_never_over():
    raw = PrivacyLedger(target_epsilon=float("inf"), target_delta=1e-5).to_json()

    finding = audit_ledger(raw, user_id="u", train_entry=ENTRY)

    assert finding.ok and finding.rdp_epsilon == 0.0 and finding.target_epsilon == float("inf")


def _planned_ledger(cfg, rounds: int) -> PrivacyLedger:
    """A device's ledger after ``rounds`` rounds with a calibrated noise multiplier."""
    from client.budget import round_mechanisms

    ledger = PrivacyLedger(target_epsilon=cfg.target_epsilon, target_delta=cfg.target_delta,
                           accountant=cfg.accountant)
    for _ in range(rounds):
        ledger.record(*round_mechanisms(cfg, ledger, 1.0, private_choice=False).entries)
    return ledger


@pytest.mark.parametrize("budget", [0.5, 1.0, 4.0])
def test_the_default_recipe_trains_at_a_small_budget(budget):
    # Arrange: the defaults (the loss release at noise 4, full batch) at a small budget;
    # a fixed 4 alone spends about 1.7 over two full-batch rounds, so every device used
    # to decline every round at epsilon 1
    from client.budget import round_mechanisms
    from shared.config import RunConfig

    cfg = RunConfig(target_epsilon=budget)

    # Act
    ledger = _planned_ledger(cfg, cfg.planned_rounds)
    first = round_mechanisms(cfg, PrivacyLedger(target_epsilon=budget, target_delta=1e-5,
                                                accountant="prv"), 1.0, private_choice=False)

    # Assert: both planned rounds fit, and the loss release has at least 4 times the noise
    # of the step it reports on
    assert ledger.rounds == cfg.planned_rounds
    assert 0.95 * budget < ledger.epsilon <= budget
    sigma = first.noise_multiplier
    assert [s for s, _, _ in first.entries] == [sigma, max(4.0, 4 * sigma)]
    assert sum(n for _, _, n in first.entries) == cfg.local_steps + 1


def test_a_calibrated_ledger_is_replayed_and_a_rosier_one_is_caught():
    # Arrange: noise calibrated for 3 planned rounds at q = 1, PRV, a cheaper loss release
    from client.budget import round_mechanisms
    from shared.config import RunConfig

    cfg = RunConfig(planned_rounds=3, dp_sample_rate=1.0, local_steps=1,
                    loss_noise_multiplier=8.0, accountant="prv")
    ledger = _planned_ledger(cfg, 3)
    raw = ledger.to_json()
    tampered = {**raw, "history": [[s * 1.5, q, n] if i == 0 else [s, q, n]
                                   for i, (s, q, n) in enumerate(raw["history"])]}
    tampered["epsilon"] = PrivacyLedger.from_json(tampered).epsilon

    def plan(state, private_choice):
        return round_mechanisms(cfg, state, 1.0, private_choice).entries

    # Act
    honest = audit_ledger(raw, user_id="u", plan=plan, trained_rounds=3)
    rosier = audit_ledger(tampered, user_id="u", plan=plan, trained_rounds=3)

    # Assert: three rounds spend the budget to within the calibration's tolerance
    assert honest.ok, honest.problems
    assert honest.train_entries == 3 and 7.9 < honest.epsilon <= 8.0
    assert honest.epsilon < honest.rdp_epsilon  # enforced with PRV, RDP kept beside it
    assert not rosier.ok
    assert any("is not what this run accounts" in p for p in rosier.problems)


def test_a_device_ledger_shared_with_another_federation_is_replayed_for_this_run_only():
    # Arrange: this run's calibrated rounds interleaved with another federation's, whose
    # spending makes this run's later rounds noisier (the device's budget is one)
    from client.budget import round_mechanisms
    from shared.config import RunConfig

    cfg = RunConfig(planned_rounds=3, dp_sample_rate=1.0, local_steps=1,
                    loss_noise_multiplier=8.0)
    ledger = PrivacyLedger(target_epsilon=cfg.target_epsilon, target_delta=cfg.target_delta)
    alone = round_mechanisms(cfg, ledger, 1.0, False, "this").noise_multiplier
    ledger.record((3.0, 1.0, 1), federation="other")
    for _ in range(3):
        ledger.record(*round_mechanisms(cfg, ledger, 1.0, False, "this").entries,
                      federation="this")

    def plan(state, private_choice):
        return round_mechanisms(cfg, state, 1.0, private_choice, "this").entries

    # Act
    finding = audit_ledger(ledger.to_json(), user_id="u", plan=plan, trained_rounds=3,
                           federation="this")
    as_if_alone = audit_ledger({**ledger.to_json(), "sources": ["this"] * len(ledger.history)}, user_id="u",
                               plan=plan, trained_rounds=3, federation="this")

    # Assert: the others' spending raised this run's noise, counts in epsilon, and is not
    # judged by this run's settings; read as this run's own it would not replay
    assert ledger.history[1][0] > alone
    assert finding.ok, finding.problems
    assert finding.train_entries == 3 and finding.rounds == 3
    assert finding.epsilon == pytest.approx(ledger.epsilon) and finding.epsilon <= 8.0
    assert not as_if_alone.ok
