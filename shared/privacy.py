"""Record-level privacy accounting over all rounds, with Opacus's accountants.

The ledger is plain data: Opacus's own history format,
``[(noise_multiplier, sample_rate, steps), ...]``, one entry per local training
run, composed across rounds and restarts (Mironov, "Renyi Differential
Privacy", 2017; Opacus ``RDPAccountant``). Never a per-round epsilon.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from opacus.accountants import RDPAccountant

HistoryEntry = tuple[float, float, int]


def epsilon(history: Sequence[HistoryEntry], *, delta: float) -> float:
    """Epsilon at ``delta`` of everything in ``history``; 0 for an empty history."""
    if not history:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return float(accountant.get_epsilon(delta=delta))


@dataclass
class PrivacyLedger:
    """One user's privacy spending; persisted on the device after every round."""

    target_epsilon: float
    target_delta: float
    history: list[HistoryEntry] = field(default_factory=list)
    rounds: int = 0

    @property
    def epsilon(self) -> float:
        return epsilon(self.history, delta=self.target_delta)

    def epsilon_after(self, *entries: HistoryEntry) -> float:
        return epsilon([*self.history, *entries], delta=self.target_delta)

    def can_afford(self, *entries: HistoryEntry) -> bool:
        return self.epsilon_after(*entries) <= self.target_epsilon

    def record(self, *entries: HistoryEntry) -> None:
        """Add one round's mechanisms (called before their results may leave the device)."""
        for entry in entries:
            sigma, q, steps = entry
            if not (sigma > 0 and 0 < q <= 1 and steps >= 0 and math.isfinite(sigma)):
                raise ValueError(f"invalid accountant entry {entry}")
        for sigma, q, steps in entries:
            if steps:
                self.history.append((float(sigma), float(q), int(steps)))
        self.rounds += 1

    def to_json(self) -> dict:
        # JSON has no Infinity: an unlimited budget is written as null
        budget = self.target_epsilon if math.isfinite(self.target_epsilon) else None
        return {"target_epsilon": budget, "target_delta": self.target_delta,
                "history": [list(e) for e in self.history], "rounds": self.rounds,
                "epsilon": self.epsilon, "accountant": "rdp"}

    @classmethod
    def from_json(cls, raw: dict) -> PrivacyLedger:
        budget = raw["target_epsilon"]
        return cls(target_epsilon=math.inf if budget is None else float(budget),
                   target_delta=float(raw["target_delta"]),
                   history=[(float(s), float(q), int(n)) for s, q, n in raw["history"]],
                   rounds=int(raw.get("rounds", 0)))
