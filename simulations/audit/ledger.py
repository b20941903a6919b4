"""Check a device's privacy ledger against an independent recomputation.

The ledger stores Opacus's accountant history, ``[(noise multiplier, sample
rate, steps), ...]``, and the epsilon it computed. The audit recomputes epsilon
from the history with fresh Opacus accountants (RDP, which the ledger uses, and
PRV as a second, tighter opinion), and checks that

- the stored epsilon equals the recomputation with the ledger's own accountant
  (RDP or PRV), and the PRV figure is not above the RDP one beyond PRV's error;
- the recomputed epsilon is within the budget;
- every history entry is a mechanism this run's settings produce (noise
  multiplier, Poisson rate, steps), so nothing was accounted at a rosier rate
  than it ran; with a calibrated noise multiplier (``planned-rounds``) the
  device's choice is replayed round by round from the ledger's own prefix;
- the ledger holds at least one round of DP steps for every round the server
  counted an update from this user, and at least the epsilon the device reported.

A device's ledger composes every federation it joined. Epsilon and the budget are
checked on all of it; the entries are checked against this run's settings only
where the ledger attributes them to this run's federation (the others' settings are
not this run's to know), and still count in the replay's spending so far.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from shared.privacy.accounting import PRV_EPS_ERROR, HistoryEntry, PrivacyLedger, epsilon

# plan(ledger so far, private persona choice?) -> the entries the device records for a
# round, or None when it would decline (client.budget.round_mechanisms)
RoundPlan = Callable[[PrivacyLedger, bool], "list[HistoryEntry] | None"]

REL_TOLERANCE = 1e-6


@dataclass
class LedgerFinding:
    user_id: str
    stored_epsilon: float | None
    rdp_epsilon: float
    prv_epsilon: float | None
    target_epsilon: float
    delta: float
    rounds: int
    train_entries: int
    trained_rounds: int  # rounds the server counted an update from this user
    server_epsilon: float | None
    accountant: str = "rdp"
    epsilon: float = 0.0  # by the ledger's own accountant: what the budget is enforced with
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def recompute(history: Sequence[HistoryEntry], delta: float, accountant: str) -> float:
    """Epsilon from a fresh accountant of Opacus's (:func:`shared.privacy.accounting.epsilon`)."""
    return epsilon(history, delta=delta, accountant=accountant)


def _same(a: float, b: float) -> bool:
    return abs(a - b) <= REL_TOLERANCE * max(1.0, abs(a), abs(b))


def audit_ledger(raw: dict, *, user_id: str, train_entry: HistoryEntry | None = None,
                 extra_entries: Sequence[HistoryEntry] = (), plan: RoundPlan | None = None,
                 trained_rounds: int = 0, server_epsilon: float | None = None,
                 federation: str = "") -> LedgerFinding:
    """``raw``: the ledger's JSON. Either ``train_entry``, what one round of this run
    accounts, with ``extra_entries``, other mechanisms the run may add (the private
    persona choice); or ``plan``, which the audit replays round by round (a noise
    multiplier calibrated from the ledger itself). ``federation``: the run's name in
    the ledger's attribution."""
    history = [(float(s), float(q), int(n)) for s, q, n in raw.get("history", [])]
    sources = [str(s) for s in raw.get("sources", [federation] * len(history))]
    own = [source == federation for source in sources]
    delta = float(raw["target_delta"])
    budget = math.inf if raw.get("target_epsilon") is None else float(raw["target_epsilon"])
    accountant = raw.get("accountant", "rdp")
    rdp = recompute(history, delta, "rdp")
    try:
        prv = recompute(history, delta, "prv")
    except (ValueError, RuntimeError, OverflowError):
        prv = None  # PRV's numerical grid does not cover every (sigma, q); RDP decides
    if plan is not None:
        allowed, train_entries = _replay(history, sources, plan, federation=federation,
                                         budget=budget, delta=delta, accountant=accountant)
    else:
        if train_entry is None:
            raise ValueError("audit_ledger needs train_entry or plan")
        allowed = [not mine or any(_matches(e, a) for a in (train_entry, *extra_entries))
                   for e, mine in zip(history, own)]
        train_entries = sum(1 for entry, mine in zip(history, own)
                            if mine and _matches(entry, train_entry))
    rounds = raw.get("federation_rounds", {federation: raw.get("rounds", 0)})
    enforced = prv if accountant == "prv" else rdp
    finding = LedgerFinding(
        user_id=user_id, stored_epsilon=raw.get("epsilon"), rdp_epsilon=rdp, prv_epsilon=prv,
        target_epsilon=budget, delta=delta, rounds=int(rounds.get(federation, 0)),
        train_entries=train_entries, trained_rounds=trained_rounds,
        server_epsilon=server_epsilon, accountant=accountant)
    stored = raw.get("epsilon")
    if enforced is None:
        finding.problems.append(f"the ledger's {accountant} accountant cannot be recomputed")
        enforced = rdp
    elif stored is None or not _same(float(stored), enforced):
        finding.problems.append(f"stored epsilon {stored} but the history gives "
                                f"{enforced:.6f}" + (" (prv)" if accountant == "prv" else ""))
    if prv is not None and prv > rdp + 2 * PRV_EPS_ERROR:
        finding.problems.append(f"PRV epsilon {prv:.4f} above RDP's {rdp:.4f}: the "
                                "accountants disagree")
    finding.epsilon = enforced
    if enforced > budget * (1 + REL_TOLERANCE):
        finding.problems.append(f"over budget: epsilon {enforced:.4f} > {budget:g}")
    for entry, ok in zip(history, allowed):
        if not ok:
            expected = ("the replayed plan" if plan is not None else f"{train_entry}" + (
                f" or {', '.join(map(str, extra_entries))}" if extra_entries else ""))
            finding.problems.append(
                f"entry {entry} is not what this run accounts (expected {expected})")
    if train_entries < trained_rounds:
        finding.problems.append(f"the server counted {trained_rounds} updates, the ledger "
                                f"accounts {train_entries} rounds of DP steps")
    if server_epsilon is not None and \
            server_epsilon > enforced * (1 + REL_TOLERANCE) + 1e-12:
        finding.problems.append(f"the device reported epsilon {server_epsilon:.4f}, more than "
                                f"its ledger holds ({enforced:.4f})")
    return finding


def _replay(history: list[HistoryEntry], sources: list[str], plan: RoundPlan, *,
            federation: str, budget: float, delta: float,
            accountant: str) -> tuple[list[bool], int]:
    """Walk ``history`` round by round as the device planned it: which entries match
    the plan, and how many rounds of DP steps it holds. Other federations' entries are
    taken as spent where they stand. The walk stops at the first entry of this
    federation that no plan explains (everything after it is flagged)."""
    ledger = PrivacyLedger(target_epsilon=budget, target_delta=delta, accountant=accountant)
    allowed = [False] * len(history)
    position = rounds = 0
    while position < len(history):
        if sources[position] != federation:
            ledger.record(history[position], federation=sources[position])
            allowed[position] = True
            position += 1
            continue
        for private_choice in (False, True):
            entries = plan(ledger, private_choice)
            span = history[position:position + len(entries or [])]
            if entries and len(span) == len(entries) and all(
                    _matches(e, x) for e, x in zip(span, entries)):
                break
        else:
            return allowed, rounds
        allowed[position:position + len(entries)] = [True] * len(entries)
        ledger.record(*entries, federation=federation)
        position += len(entries)
        rounds += 1
    return allowed, rounds


def _matches(entry: HistoryEntry, expected: HistoryEntry) -> bool:
    return (_same(entry[0], expected[0]) and _same(entry[1], expected[1])
            and int(entry[2]) == int(expected[2]))
