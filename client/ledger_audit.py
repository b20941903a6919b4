"""Check a device's privacy ledger against an independent recomputation.

The ledger stores Opacus's accountant history, ``[(noise multiplier, sample
rate, steps), ...]``, and the epsilon it computed. The audit recomputes epsilon
from the history with fresh Opacus accountants (RDP, which the ledger uses, and
PRV as a second, tighter opinion), and checks that

- the stored epsilon equals the RDP recomputation;
- the recomputed epsilon is within the budget;
- every history entry is a mechanism this run's settings produce (noise
  multiplier, Poisson rate ``batch / records``, steps), so nothing was accounted
  at a rosier rate than it ran;
- the ledger holds at least one round of DP steps for every round the server
  counted an update from this user, and at least the epsilon the device reported.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from opacus.accountants import PRVAccountant, RDPAccountant

from shared.privacy import HistoryEntry

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
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def recompute(history: Sequence[HistoryEntry], delta: float, accountant: str) -> float:
    if not history:
        return 0.0
    fresh = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    fresh.history = [(float(s), float(q), int(n)) for s, q, n in history]
    if accountant == "rdp":
        return float(fresh.get_epsilon(delta=delta))
    return float(fresh.get_epsilon(delta=delta, eps_error=0.01))


def _same(a: float, b: float) -> bool:
    return abs(a - b) <= REL_TOLERANCE * max(1.0, abs(a), abs(b))


def audit_ledger(raw: dict, *, user_id: str, train_entry: HistoryEntry,
                 extra_entries: Sequence[HistoryEntry] = (), trained_rounds: int = 0,
                 server_epsilon: float | None = None) -> LedgerFinding:
    """``raw``: the ledger's JSON. ``train_entry``: what one round of this run accounts;
    ``extra_entries``: other mechanisms the run may add (the private persona choice)."""
    history = [(float(s), float(q), int(n)) for s, q, n in raw.get("history", [])]
    delta = float(raw["target_delta"])
    budget = math.inf if raw.get("target_epsilon") is None else float(raw["target_epsilon"])
    rdp = recompute(history, delta, "rdp")
    try:
        prv = recompute(history, delta, "prv")
    except (ValueError, RuntimeError, OverflowError):
        prv = None  # PRV's numerical grid does not cover every (sigma, q); RDP decides
    train_entries = sum(1 for entry in history if _matches(entry, train_entry))
    finding = LedgerFinding(
        user_id=user_id, stored_epsilon=raw.get("epsilon"), rdp_epsilon=rdp, prv_epsilon=prv,
        target_epsilon=budget, delta=delta, rounds=int(raw.get("rounds", 0)),
        train_entries=train_entries, trained_rounds=trained_rounds,
        server_epsilon=server_epsilon)
    stored = raw.get("epsilon")
    if stored is None or not _same(float(stored), rdp):
        finding.problems.append(f"stored epsilon {stored} but the history gives {rdp:.6f}")
    if rdp > budget * (1 + REL_TOLERANCE):
        finding.problems.append(f"over budget: epsilon {rdp:.4f} > {budget:g}")
    for entry in history:
        if not any(_matches(entry, allowed) for allowed in (train_entry, *extra_entries)):
            finding.problems.append(
                f"entry {entry} is not what this run accounts (expected {train_entry}"
                + (f" or {', '.join(map(str, extra_entries))}" if extra_entries else "") + ")")
    if train_entries < trained_rounds:
        finding.problems.append(f"the server counted {trained_rounds} updates, the ledger "
                                f"accounts {train_entries} rounds of DP steps")
    if server_epsilon is not None and server_epsilon > rdp * (1 + REL_TOLERANCE) + 1e-12:
        finding.problems.append(f"the device reported epsilon {server_epsilon:.4f}, more than "
                                f"its ledger holds ({rdp:.4f})")
    return finding


def _matches(entry: HistoryEntry, expected: HistoryEntry) -> bool:
    return (_same(entry[0], expected[0]) and _same(entry[1], expected[1])
            and int(entry[2]) == int(expected[2]))
