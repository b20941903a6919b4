"""User-level DP on the server's aggregates: DP-FedAvg with a fixed denominator.

Each aggregate (the global adapter, and each persona adapter) is released as

    mean change = (sum_i clip(delta_i, C) + N(0, (z C)^2 I)) / m

(then stepped like any mean change: ``sent + lr * mean change``), where ``delta_i``
is client i's change of that adapter from what the server sent, ``clip`` scales it to
L2 norm at most ``C`` over the whole adapter (:mod:`server.aggregation.clip`), and
``m`` is the *expected* number of clients of that aggregate per round, a
public constant (McMahan, Ramage, Talwar & Zhang, "Learning Differentially
Private Recurrent Language Models", ICLR 2018: the fixed-denominator
estimator). Weights are uniform: example-weighting would let one user's
weight, and so the sum's sensitivity, grow without bound. One user changes the
sum by at most ``C``, so each release is a sampled Gaussian mechanism with
noise multiplier ``z`` (Mironov, Talwar & Zhang, "Renyi Differential Privacy
of the Sampled Gaussian Mechanism", 2019), accounted with Opacus's
``RDPAccountant`` over every round it was released.

Sampling. The server samples exactly ``k`` clients per round, without
replacement; the accountant treats it as Poisson sampling with
``q = k / N`` (as McMahan et al. and TFF's DP-FedAvg do). That is an
approximation, stated in the report. A persona ``p`` with ``N_p`` members gets
``m_p = q N_p`` expected members per round: the noise on its *mean* is
``z C / m_p`` per coordinate, so a persona with few members gets a noisy
adapter for the same epsilon. A persona with ``m_p`` below
``central-min-clients`` is not released at all: its members train and count
towards the global adapter only, decided once from the (public) persona
counts before round 1, so the accounting is fixed in advance.

Every released level is released every round, members or not (the sum of no
one plus noise): skipping a persona's release when none of its members was
sampled would reveal whether one was, which depends on who is in the data.

A user's total: the global and their persona release come from the *same*
sampling draw, so composing two independent sampled Gaussians would
understate it. The pair is one sampled Gaussian on the concatenated update
(sensitivity ``C`` per block), i.e. noise multiplier
``(z_g^-2 + z_p^-2)^-1/2`` with the same ``q``.

Trust model: the server is trusted with individual updates (central DP); this
bounds what the *released adapters* reveal about any one user, on top of the
record-level DP-SGD each device runs. Per-round diagnostics the server logs
(train loss, mean update norm) are not covered by it.

Why not Flower's wrappers. ``flwr.serverapp.strategy.DifferentialPrivacy
ServerSideFixedClipping`` wraps a ``Strategy`` that aggregates *one* ArrayRecord
over every reply, divides by ``num_sampled_clients`` and, to account, demands
FedAvg with equal weights, no-amplification sampling and Google's
``dp-accounting`` package (not installed here). Our server aggregates several
adapters over different client subsets (global over all, a persona over its
members) with no Strategy object, and each subset needs its own denominator
and its own account. Flower's helper functions
(``flwr.supercore.differential_privacy``) do the same clip and noise on numpy
lists, but their noise comes from numpy's unseeded global generator; here
noise comes from an injected torch generator (tests pin it; the server seeds
one from the OS's entropy, never from the public run seed, or anyone could
subtract the noise), and the adapters stay torch tensors (bfloat16 has no numpy
dtype). A test checks our clip against Flower's.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from server.aggregation.clip import clip_update
from server.aggregation.mean import (
    GLOBAL,
    PERSONA_PREFIX,
    Changes,
    ClientUpdate,
    State,
    level_name,
    weighted_sum,
)
from shared.privacy.accounting import epsilon as rdp_epsilon

# -- the mechanism --------------------------------------------------------------------------

def noise_std(*, noise_multiplier: float, clipping_norm: float, expected_clients: float) -> float:
    """Per-coordinate std of the noise on the released *mean*: ``z C / m``."""
    return noise_multiplier * clipping_norm / expected_clients


def private_mean_change(changes: Sequence[Mapping[str, torch.Tensor]],
                        like: Mapping[str, torch.Tensor], *, clipping_norm: float,
                        noise_multiplier: float, expected_clients: float,
                        generator: torch.Generator) -> State:
    """The noised fixed-denominator mean of the clipped changes, in float64.

    Parameters
    ----------
    changes : the clients' changes of one adapter (key -> tensor); may be empty (the
        release is then noise alone).
    like : the adapter the server sent: the keys and shapes of the release.
    clipping_norm : ``C``, bound on each client's L2 change over all keys.
    noise_multiplier : ``z``; the noise on the sum has std ``z C`` per coordinate.
    expected_clients : ``m``, the public fixed denominator (> 0).
    generator : source of the Gaussian noise.

    Returns ``(sum_i clip(change_i, C) + N(0, (z C)^2 I)) / m`` with the keys and shapes
    of ``like``.
    """
    if not expected_clients > 0:
        raise ValueError(f"expected_clients must be > 0, got {expected_clients}")
    if any(set(c) != set(like) for c in changes):
        raise ValueError("a client's adapter has different keys from the one sent")
    # uniform weights: example-weighting would let one user's weight, and so the sum's
    # sensitivity, grow without bound
    total = weighted_sum([clip_update(c, clipping_norm) for c in changes],
                         [1.0] * len(changes), like=like)
    sigma = noise_multiplier * clipping_norm
    out = {}
    for k in sorted(like):  # a fixed order, so a pinned generator gives pinned noise
        noise = torch.randn(total[k].shape, generator=generator, dtype=torch.float64) * sigma
        out[k] = (total[k] + noise) / expected_clients
    return out


def secret_generator() -> torch.Generator:
    """A generator seeded from the OS's entropy: the noise must not be derivable from
    anything public (the run seed is in the run config every client receives)."""
    return torch.Generator().manual_seed(secrets.randbits(63))


# -- the plan and the account -----------------------------------------------------------------

@dataclass(frozen=True)
class LevelPlan:
    """One released aggregate: who feeds it and how much noise it gets."""

    population: int  # users whose updates count towards this level
    expected_clients: float  # m = q * population: the fixed denominator
    noise_multiplier: float  # z: noise std on the sum is z * C


@dataclass
class CentralLedger:
    """The server's user-level account; plain data, saved with each checkpoint.

    ``levels`` are the released aggregates (``"global"``, ``"persona/<p>"``),
    ``merged`` the personas not released (persona -> expected members per round),
    ``releases`` how many rounds each level was released.
    """

    clipping_norm: float
    delta: float
    sample_rate: float
    population: int
    min_clients: float
    levels: dict[str, LevelPlan]
    merged: dict[str, float] = field(default_factory=dict)
    releases: dict[str, int] = field(default_factory=dict)

    def history(self, level: str) -> list[tuple[float, float, int]]:
        """Opacus's history format for one level: ``[(z, q, rounds)]``."""
        rounds = self.releases.get(level, 0)
        plan = self.levels[level]
        return [(plan.noise_multiplier, self.sample_rate, rounds)] if rounds else []

    def epsilon(self, level: str) -> float:
        """Epsilon at ``delta`` of ``level``'s releases so far."""
        return rdp_epsilon(self.history(level), delta=self.delta)

    def user_history(self, persona: str | None) -> list[tuple[float, float, int]]:
        """What a user of ``persona`` (None: no persona, or a merged one) is exposed to.

        Rounds in which global and persona were both released are one sampled
        Gaussian on the pair (one sampling draw): noise multiplier
        ``(z_g^-2 + z_p^-2)^-1/2``. Rounds with only one of them count alone."""
        name = level_name(persona) if persona is not None else None
        if name not in self.levels:
            return self.history(GLOBAL)
        g, p = self.levels[GLOBAL], self.levels[name]
        rg, rp = self.releases.get(GLOBAL, 0), self.releases.get(name, 0)
        both = min(rg, rp)
        joint = (g.noise_multiplier ** -2 + p.noise_multiplier ** -2) ** -0.5
        entries = [(joint, self.sample_rate, both), (g.noise_multiplier, self.sample_rate,
                                                     rg - both),
                   (p.noise_multiplier, self.sample_rate, rp - both)]
        return [e for e in entries if e[2]]

    def user_epsilon(self, persona: str | None) -> float:
        return rdp_epsilon(self.user_history(persona), delta=self.delta)

    def record_release(self, levels: Sequence[str]) -> None:
        """Count one round's releases (before the adapters leave the server)."""
        for level in levels:
            if level not in self.levels:
                raise ValueError(f"{level} is not a released level")
            self.releases[level] = self.releases.get(level, 0) + 1

    def summary(self) -> dict:
        """The report's ``user_level_privacy`` section."""
        levels = {}
        for name, plan in self.levels.items():
            levels[name] = {
                "population": plan.population, "expected_clients": plan.expected_clients,
                "noise_multiplier": plan.noise_multiplier,
                "noise_std_on_mean": noise_std(noise_multiplier=plan.noise_multiplier,
                                               clipping_norm=self.clipping_norm,
                                               expected_clients=plan.expected_clients),
                "rounds_released": self.releases.get(name, 0),
                "epsilon": self.epsilon(name)}
        personas = [n.removeprefix(PERSONA_PREFIX) for n in self.levels if n != GLOBAL]
        per_user = {"(global only)": self.user_epsilon(None),
                    **{p: self.user_epsilon(p) for p in personas}}
        return {"central_dp": True, "delta": self.delta, "clipping_norm": self.clipping_norm,
                "sample_rate": self.sample_rate, "population": self.population,
                "min_clients": self.min_clients,
                "sampling": "fixed-size without replacement, accounted as Poisson with "
                            "q = clients per round / population",
                "levels": levels,
                "user_epsilon": per_user,
                "merged_into_global": {
                    p: (f"merged into global: expected {m:.2f} members per round < min "
                        f"{self.min_clients:g}") for p, m in self.merged.items()}}

    def to_json(self) -> dict:
        return {"clipping_norm": self.clipping_norm, "delta": self.delta,
                "sample_rate": self.sample_rate, "population": self.population,
                "min_clients": self.min_clients,
                "levels": {n: {"population": p.population,
                               "expected_clients": p.expected_clients,
                               "noise_multiplier": p.noise_multiplier}
                           for n, p in self.levels.items()},
                "merged": dict(self.merged), "releases": dict(self.releases)}

    @classmethod
    def from_json(cls, raw: Mapping) -> CentralLedger:
        return cls(clipping_norm=float(raw["clipping_norm"]), delta=float(raw["delta"]),
                   sample_rate=float(raw["sample_rate"]), population=int(raw["population"]),
                   min_clients=float(raw["min_clients"]),
                   levels={n: LevelPlan(int(p["population"]), float(p["expected_clients"]),
                                        float(p["noise_multiplier"]))
                           for n, p in raw["levels"].items()},
                   merged={p: float(m) for p, m in raw.get("merged", {}).items()},
                   releases={n: int(r) for n, r in raw.get("releases", {}).items()})


def plan_levels(persona_counts: Mapping[str, int], *, population: int, clients_per_round: int,
                clipping_norm: float, noise_multiplier: float, delta: float,
                min_clients: float,
                persona_noise: Mapping[str, float] | None = None) -> CentralLedger:
    """Fix the levels, denominators and noise before round 1, from public counts.

    ``population`` is N, every user who may be sampled (with or without a
    persona); ``persona_counts`` gives N_p. The server samples
    ``min(clients_per_round, N)`` per round, so ``q = that / N``. A persona with
    ``q N_p < min_clients`` is merged into global. ``persona_noise`` overrides the
    noise multiplier of single personas.
    """
    if population < 1:
        raise ValueError(f"central DP needs a population of at least 1 user, got {population}")
    if sum(persona_counts.values()) > population:
        raise ValueError(f"persona counts {dict(persona_counts)} exceed the population "
                         f"{population}")
    q = min(clients_per_round, population) / population
    levels = {GLOBAL: LevelPlan(population, q * population, noise_multiplier)}
    merged = {}
    for persona, count in sorted(persona_counts.items()):
        expected = q * count
        if expected < min_clients or count == 0:
            merged[persona] = expected
            continue
        z = (persona_noise or {}).get(persona, noise_multiplier)
        levels[level_name(persona)] = LevelPlan(count, expected, z)
    return CentralLedger(clipping_norm=clipping_norm, delta=delta, sample_rate=q,
                         population=population, min_clients=min_clients, levels=levels,
                         merged=merged)


def private_changes(changes: Sequence[ClientUpdate],
                    like: Mapping[str, Mapping[str, torch.Tensor]], ledger: CentralLedger,
                    generator: torch.Generator) -> Changes:
    """One round of every released level: ``level -> mean change`` (see
    :func:`private_mean_change`); the released levels are its keys, to be counted.

    ``changes`` are :func:`server.aggregation.mean.client_change` results; ``like`` maps
    each level in ``ledger.levels`` to the tensors the server sent. Global aggregates every
    change; ``persona/<p>`` its members' persona changes only. Every level is released,
    with or without members. Does not touch the ledger.
    """
    members: dict[str, list] = {name: [] for name in ledger.levels}
    for update in changes:
        members[GLOBAL].append(update.global_state)
        if update.persona and level_name(update.persona) in members:
            members[level_name(update.persona)].append(update.persona_state)
    return {name: private_mean_change(members[name], like[name],
                                      clipping_norm=ledger.clipping_norm,
                                      noise_multiplier=plan.noise_multiplier,
                                      expected_clients=plan.expected_clients,
                                      generator=generator)
            for name, plan in sorted(ledger.levels.items())}
