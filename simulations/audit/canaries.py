"""Audit canaries and the membership split: which secret goes into whose data, and which
records an attacker must tell apart. Pure planning from a seed; the files are
written by :mod:`simulations.audit.plant`.

A canary is a record ``"my secret number is 4 1 8 0 9 3"`` with random digits
(the Secret Sharer's format). Two kinds:

- one-run canaries: a single copy each, included in their user's data with
  probability 1/2, independently (Steinke et al. 2023). The excluded half is
  also the null distribution of exposure: secrets the model never saw.
- repeated canaries: always included, ``copies`` times, to show how
  memorisation grows with repetition (record-level DP bounds one copy; ``c``
  copies only get the group bound of about ``c * epsilon``).

Membership: each of a user's training records is held out with probability
``holdout_fraction`` (1/2 by default), independently; the rest stay on the device
(members). Non-members so come from the same distribution (the user's
chronological test split would confound membership with drift), and every
natural record is also an example of the one-run audit.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from shared.config import ConfigError

CANARY_PREFIX = "my secret number is"
SECRET_DIGITS = 6


@dataclass(frozen=True)
class Canary:
    canary_id: str
    secret: str  # "4 1 8 0 9 3"
    user_id: str  # whose data it goes into (or would have, when excluded)
    copies: int  # 0 = excluded
    kind: str  # "one-run" or "repeated"

    @property
    def text(self) -> str:
        return canary_text(self.secret)

    @property
    def included(self) -> bool:
        return self.copies > 0


@dataclass(frozen=True)
class AuditPlan:
    seed: int
    canaries: tuple[Canary, ...]
    holdout: Mapping[str, tuple[int, ...]]  # user -> indices of held-out training records

    def to_json(self) -> dict:
        return {"seed": self.seed, "secret_digits": SECRET_DIGITS, "prefix": CANARY_PREFIX,
                "canaries": [asdict(c) for c in self.canaries],
                "holdout": {u: list(i) for u, i in sorted(self.holdout.items())}}

    @classmethod
    def from_json(cls, raw: dict) -> AuditPlan:
        return cls(seed=int(raw["seed"]),
                   canaries=tuple(Canary(**c) for c in raw["canaries"]),
                   holdout={u: tuple(int(i) for i in idx) for u, idx in raw["holdout"].items()})

    def of_kind(self, kind: str) -> tuple[Canary, ...]:
        return tuple(c for c in self.canaries if c.kind == kind)


def canary_text(secret: str) -> str:
    return f"{CANARY_PREFIX} {secret}"


def random_secret(rng: random.Random, digits: int = SECRET_DIGITS) -> str:
    return " ".join(str(rng.randrange(10)) for _ in range(digits))


def secret_space_bits(digits: int = SECRET_DIGITS) -> float:
    return digits * math.log2(10)


def candidate_secrets(n: int, *, exclude: Sequence[str], seed: int) -> list[str]:
    """``n`` distinct random secrets of the canary format, none of them a planted one."""
    if n >= 10 ** SECRET_DIGITS - len(exclude):
        raise ConfigError(f"{n} candidates do not fit a space of 10^{SECRET_DIGITS}")
    rng = random.Random(f"candidates:{seed}")
    taken, out = set(exclude), []
    while len(out) < n:
        secret = random_secret(rng)
        if secret not in taken:
            taken.add(secret)
            out.append(secret)
    return out


def plan_audit(train_counts: Mapping[str, int], *, one_run: int, repeated: int, copies: int,
               holdout_fraction: float, seed: int) -> AuditPlan:
    """Place ``one_run`` Bernoulli(1/2) canaries and ``repeated`` canaries of ``copies``
    copies on random users; hold out each record with probability ``holdout_fraction``."""
    if not train_counts:
        raise ConfigError("an audit needs at least one user")
    if not 0 <= holdout_fraction < 1:
        raise ConfigError(f"holdout fraction {holdout_fraction} is not in [0, 1)")
    if repeated and copies < 1:
        raise ConfigError(f"repeated canaries need copies >= 1, not {copies}")
    rng = random.Random(f"audit:{seed}")
    users = sorted(train_counts)
    secrets: set[str] = set()

    def fresh_secret() -> str:
        while True:
            secret = random_secret(rng)
            if secret not in secrets:
                secrets.add(secret)
                return secret

    canaries = [Canary(f"one-run-{i:04d}", fresh_secret(), rng.choice(users),
                       rng.randrange(2), "one-run") for i in range(one_run)]
    canaries += [Canary(f"repeated-{i:03d}", fresh_secret(), rng.choice(users), copies,
                        "repeated") for i in range(repeated)]
    holdout = {}
    for user in users:  # independent coins: the one-run audit counts these records too
        n = train_counts[user]
        held = tuple(i for i in range(n) if rng.random() < holdout_fraction)
        if len(held) == n:
            raise ConfigError(f"user {user} has {n} training records: none would stay")
        holdout[user] = held
    return AuditPlan(seed=seed, canaries=tuple(canaries), holdout=holdout)
