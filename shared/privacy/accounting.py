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
    """One device's privacy spending, composed over every federation it joins.

    The budget belongs to the device's data, not to a run: a new run, or a run
    directory copied or moved, adds to the same history. Each entry remembers the
    federation that spent it (``sources``), and each federation its rounds, so a run
    can still read its own share (the device's planned rounds, the ledger audit)
    while the budget is enforced on everything."""

    target_epsilon: float
    target_delta: float
    history: list[HistoryEntry] = field(default_factory=list)
    accountant: str = "rdp"  # the one the budget is enforced with
    sources: list[str] = field(default_factory=list)  # the federation of each history entry
    federation_rounds: dict[str, int] = field(default_factory=dict)
    # The round accounted last whose reply has not yet been released: (server round,
    # instruction digest, history length before it, its federation, that federation's
    # rounds before it); see :meth:`reopen`.
    open_round: tuple[int, str, int, str, int] | None = None

    @property
    def rounds(self) -> int:
        """Rounds accounted over every federation (with or without DP steps)."""
        return sum(self.federation_rounds.values())

    def rounds_in(self, federation: str) -> int:
        return self.federation_rounds.get(federation, 0)

    def history_of(self, federation: str) -> list[HistoryEntry]:
        return [e for e, source in zip(self.history, self.sources) if source == federation]

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

    def record(self, *entries: HistoryEntry, opening: tuple[int, str] | None = None,
               federation: str = "") -> None:
        """Add one round's mechanisms, spent in ``federation`` (called before their
        results may leave the device). ``opening`` (server round, instruction digest)
        marks the round open until :meth:`close`."""
        for entry in entries:
            sigma, q, steps = entry
            if not (sigma > 0 and 0 < q <= 1 and steps >= 0 and math.isfinite(sigma)):
                raise ValueError(f"invalid accountant entry {entry}")
        before = (len(self.history), federation, self.rounds_in(federation))
        for sigma, q, steps in entries:
            if steps:
                self.history.append((float(sigma), float(q), int(steps)))
                self.sources.append(federation)
        self.federation_rounds[federation] = self.rounds_in(federation) + 1
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
        history_len, federation, rounds = self.open_round[2:]
        self.history, self.sources = self.history[:history_len], self.sources[:history_len]
        self.federation_rounds[federation] = rounds
        if not rounds:  # as a ledger that never saw this federation, and its JSON
            del self.federation_rounds[federation]
        self.open_round = None
        return True

    def merge(self, other: PrivacyLedger) -> None:
        """Compose ``other``'s history into this one (an older per-federation ledger
        folded into the device's); the stricter budget holds."""
        if other.target_delta != self.target_delta:
            raise ValueError(f"ledgers at delta {other.target_delta} and {self.target_delta} "
                             "cannot be composed into one budget")
        self.history += other.history
        self.sources += other.sources
        for federation, rounds in other.federation_rounds.items():
            self.federation_rounds[federation] = self.rounds_in(federation) + rounds
        self.target_epsilon = min(self.target_epsilon, other.target_epsilon)

    def to_json(self) -> dict:
        # JSON has no Infinity: an unlimited budget is written as null
        budget = self.target_epsilon if math.isfinite(self.target_epsilon) else None
        return {"target_epsilon": budget, "target_delta": self.target_delta,
                "history": [list(e) for e in self.history], "rounds": self.rounds,
                "epsilon": self.epsilon, "accountant": self.accountant,
                "rdp_epsilon": self.rdp_epsilon, "sources": list(self.sources),
                "federation_rounds": dict(self.federation_rounds),
                "open_round": list(self.open_round) if self.open_round else None}

    @classmethod
    def from_json(cls, raw: dict, *, federation: str = "") -> PrivacyLedger:
        """``federation``: whose spending a ledger written before entries were attributed
        holds (the per-federation ledgers of earlier versions)."""
        budget = raw["target_epsilon"]
        history = [(float(s), float(q), int(n)) for s, q, n in raw["history"]]
        sources = [str(s) for s in raw.get("sources", [federation] * len(history))]
        if len(sources) != len(history):
            raise ValueError(f"{len(history)} history entries but {len(sources)} sources")
        rounds = raw.get("federation_rounds", {federation: int(raw.get("rounds", 0))})
        return cls(target_epsilon=math.inf if budget is None else float(budget),
                   target_delta=float(raw["target_delta"]), history=history,
                   accountant=_known_accountant(raw.get("accountant", "rdp")),
                   sources=sources,
                   federation_rounds={str(k): int(v) for k, v in rounds.items() if int(v)},
                   open_round=_open_round(raw.get("open_round"), federation))


def _open_round(raw, federation: str) -> tuple[int, str, int, str, int] | None:
    if raw is None:
        return None
    if len(raw) == 4:  # written before entries were attributed: (round, digest, len, rounds)
        server_round, instruction, history_len, rounds = raw
        return int(server_round), str(instruction), int(history_len), federation, int(rounds)
    server_round, instruction, history_len, source, rounds = raw
    return int(server_round), str(instruction), int(history_len), str(source), int(rounds)


def _known_accountant(name) -> str:
    if name not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {name!r}")
    return name
