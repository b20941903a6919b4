"""Record-level privacy accounting over all rounds, with Opacus's accountants.

The ledger is plain data: Opacus's own history format,
``[(noise_multiplier, sample_rate, steps), ...]``, one entry per mechanism,
composed across rounds and restarts. Never a per-round epsilon. Two accountants:

- ``"rdp"``: Renyi DP (Mironov, "Renyi Differential Privacy", 2017; Opacus
  ``RDPAccountant``), a valid upper bound that is loose at small delta;
- ``"prv"``: numerical composition of privacy loss random variables (Gopi, Lee
  and Wutschitz, "Numerical Composition of Differential Privacy", NeurIPS 2021;
  Opacus ``PRVAccountant``), whose *upper* error bound is used, so it is sound
  and tighter: the same history costs less epsilon (e.g. 7.08 where RDP says 7.98).

The ledger records which accountant it is enforced with; RDP is always kept
beside it as a cross-check (a ledger's PRV figure is never above its RDP one by
more than PRV's stated error).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from opacus.accountants import PRVAccountant, RDPAccountant

from shared.config import ACCOUNTANTS

HistoryEntry = tuple[float, float, int]
PRV_EPS_ERROR = 0.01  # PRV's discretisation error on epsilon; its upper bound is returned


def epsilon(history: Sequence[HistoryEntry], *, delta: float, accountant: str = "rdp") -> float:
    """Epsilon at ``delta`` of everything in ``history``; 0 for an empty history.

    ``accountant="prv"`` returns the PRV accountant's upper bound (estimate plus its
    error), so it is a guarantee, not an estimate."""
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    history = [(float(s), float(q), int(n)) for s, q, n in history if int(n) > 0]
    if not history:
        return 0.0
    if accountant == "rdp":
        fresh = RDPAccountant()
        fresh.history = history
        with warnings.catch_warnings():  # "optimal order is the largest alpha": still an upper bound
            warnings.simplefilter("ignore", UserWarning)
            return float(fresh.get_epsilon(delta=delta))
    fresh = PRVAccountant()
    fresh.history = history
    with warnings.catch_warnings():  # log(1 - q) at q = 1 is -inf, which PRV handles
        warnings.simplefilter("ignore", RuntimeWarning)
        # PRV sizes its domain with an RDP tail bound, which warns like the RDP branch
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(fresh.get_epsilon(delta=delta, eps_error=PRV_EPS_ERROR))


def round_entries(*, noise_multiplier: float, sample_rate: float, steps: int,
                  loss_noise_multiplier: float, selection_noise: float = 0.0
                  ) -> list[HistoryEntry]:
    """What one training round releases, as accountant entries: ``steps`` DP-SGD steps,
    the noisy train-loss release (one more subsampled Gaussian, possibly with more
    noise) and, with discovered personas, the private choice (a full-batch Gaussian)."""
    return released_entries(
        (noise_multiplier, sample_rate, steps), (loss_noise_multiplier, sample_rate, 1),
        (selection_noise, 1.0, 1) if selection_noise > 0 else None)


def released_entries(step: HistoryEntry | None, loss: HistoryEntry | None,
                     selection: HistoryEntry | None = None) -> list[HistoryEntry]:
    """One round's ledger entries from its mechanisms' own entries (``None``: it did not
    run, or ran without DP). The loss release at the step's noise and rate is the same
    subsampled Gaussian once more, so it is counted as one more step."""
    entries: list[HistoryEntry] = []
    if step is not None and loss is not None and loss[:2] == step[:2]:
        entries.append((step[0], step[1], step[2] + loss[2]))
    else:
        entries.extend(entry for entry in (step, loss) if entry is not None)
    if selection is not None:
        entries.append(selection)
    return entries


def calibrate_noise(spent: Sequence[HistoryEntry], per_round: Callable[[float], list[HistoryEntry]],
                    *, rounds_left: int, target_epsilon: float, delta: float,
                    accountant: str = "rdp", low: float = 0.3, high: float = 50.0,
                    tolerance: float = 0.005) -> float | None:
    """The smallest noise multiplier with which ``rounds_left`` more rounds of
    ``per_round(sigma)`` fit in the budget after ``spent`` (within ``tolerance``,
    rounded up, so the result always fits); ``None`` if even ``high`` does not fit.

    Every input is public (the device's participation history and the run's
    settings), so the chosen multiplier reveals nothing about the records. A device
    then spends its budget over the rounds it plans for, instead of spending a fixed
    noise multiplier's worth in its first round whatever its budget allows.
    """
    if rounds_left < 1:
        raise ValueError(f"rounds_left must be >= 1, got {rounds_left}")

    def fits(sigma: float) -> bool:
        planned = [(s, q, n * rounds_left) for s, q, n in per_round(sigma)]
        return epsilon([*spent, *planned], delta=delta, accountant=accountant) <= target_epsilon

    if not fits(high):
        return None
    if fits(low):
        return low
    while high - low > tolerance:  # epsilon falls as sigma grows: bisection
        middle = (low + high) / 2
        low, high = (middle, high) if not fits(middle) else (low, middle)
    return high


@dataclass
class PrivacyLedger:
    """One user's privacy spending; persisted on the device after every round."""

    target_epsilon: float
    target_delta: float
    history: list[HistoryEntry] = field(default_factory=list)
    rounds: int = 0
    accountant: str = "rdp"  # the one the budget is enforced with
    # The round accounted last whose reply has not yet been released: (server round,
    # instruction digest, history length and rounds before it); see :meth:`reopen`.
    open_round: tuple[int, str, int, int] | None = None

    @property
    def epsilon(self) -> float:
        return epsilon(self.history, delta=self.target_delta, accountant=self.accountant)

    @property
    def rdp_epsilon(self) -> float:
        """The RDP figure, kept beside a PRV ledger as a cross-check."""
        return epsilon(self.history, delta=self.target_delta, accountant="rdp")

    def epsilon_after(self, *entries: HistoryEntry) -> float:
        return epsilon([*self.history, *entries], delta=self.target_delta,
                       accountant=self.accountant)

    def can_afford(self, *entries: HistoryEntry) -> bool:
        return self.epsilon_after(*entries) <= self.target_epsilon

    def record(self, *entries: HistoryEntry, opening: tuple[int, str] | None = None) -> None:
        """Add one round's mechanisms (called before their results may leave the device).
        ``opening`` (server round, instruction digest) marks the round open until
        :meth:`close`."""
        for entry in entries:
            sigma, q, steps = entry
            if not (sigma > 0 and 0 < q <= 1 and steps >= 0 and math.isfinite(sigma)):
                raise ValueError(f"invalid accountant entry {entry}")
        before = (len(self.history), self.rounds)
        for sigma, q, steps in entries:
            if steps:
                self.history.append((float(sigma), float(q), int(steps)))
        self.rounds += 1
        if opening is not None:
            self.open_round = (*opening, *before)

    def close(self) -> None:
        """The open round's reply is kept and may now leave: it can no longer be reopened."""
        self.open_round = None

    def reopen(self, server_round: int, instruction: str) -> bool:
        """Take back the entries of an attempt at this very round that never released
        anything (the device stopped between accounting and keeping its reply), so that
        the retry is accounted once, as the uninterrupted run was: an output that never
        left costs no privacy. Only in memory; the file keeps them until the retry's own
        identical entries are recorded. True if something was taken back."""
        if self.open_round is None or self.open_round[:2] != (server_round, instruction):
            return False
        history_len, rounds = self.open_round[2:]
        self.history, self.rounds, self.open_round = self.history[:history_len], rounds, None
        return True

    def to_json(self) -> dict:
        # JSON has no Infinity: an unlimited budget is written as null
        budget = self.target_epsilon if math.isfinite(self.target_epsilon) else None
        return {"target_epsilon": budget, "target_delta": self.target_delta,
                "history": [list(e) for e in self.history], "rounds": self.rounds,
                "epsilon": self.epsilon, "accountant": self.accountant,
                "rdp_epsilon": self.rdp_epsilon,
                "open_round": list(self.open_round) if self.open_round else None}

    @classmethod
    def from_json(cls, raw: dict) -> PrivacyLedger:
        budget = raw["target_epsilon"]
        return cls(target_epsilon=math.inf if budget is None else float(budget),
                   target_delta=float(raw["target_delta"]),
                   history=[(float(s), float(q), int(n)) for s, q, n in raw["history"]],
                   rounds=int(raw.get("rounds", 0)),
                   accountant=_known_accountant(raw.get("accountant", "rdp")),
                   open_round=_open_round(raw.get("open_round")))


def _open_round(raw) -> tuple[int, str, int, int] | None:
    if raw is None:
        return None
    server_round, instruction, history_len, rounds = raw
    return int(server_round), str(instruction), int(history_len), int(rounds)


def _known_accountant(name) -> str:
    if name not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {name!r}")
    return name
