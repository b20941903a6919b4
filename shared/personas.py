"""Persona discovery (IFCA) and how well discovered clusters match known groups.

IFCA (Ghosh et al., "An Efficient Framework for Clustered Federated Learning",
NeurIPS 2020): the server keeps K persona adapters; each client evaluates all K
on its own data and trains the one with the lowest loss. The server learns only
the chosen index.

The choice is itself a release about the data. We make it private with the
Gaussian mechanism on the vector of K mean losses: each record's loss is
clipped to ``[0, clip]`` and the mean is over a fixed number ``m`` of the
user's records, so one record moves each coordinate by at most ``clip / m``
and the vector by at most ``sqrt(K) clip / m`` in L2. Adding
``N(0, (sigma sqrt(K) clip / m)^2)`` to each coordinate is a Gaussian mechanism
with noise multiplier ``sigma``; the argmin is post-processing. The accountant
sees it as one full-batch step: ``(sigma, 1.0, 1)``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence

import torch

from shared.config import DISCOVERED_PREFIX, parse_discovered  # noqa: F401  (re-exported)

SELECTION_CLIP = 8.0  # nats: per-record losses are clipped to [0, 8] before scoring personas


def cluster_names(k: int) -> tuple[str, ...]:
    return tuple(f"cluster-{i}" for i in range(k))


def selection_noise_std(*, sigma: float, k: int, clip: float, m: int) -> float:
    """Per-coordinate noise std of the private IFCA choice (see the module docstring)."""
    return sigma * math.sqrt(k) * clip / m


def noisy_argmin(mean_losses: Sequence[float], *, noise_std: float,
                 generator: torch.Generator) -> int:
    """Index of the smallest noisy loss (ties to the lower index); ``noise_std=0`` is plain."""
    losses = torch.tensor([float(v) for v in mean_losses], dtype=torch.float64)
    if noise_std > 0:
        losses = losses + noise_std * torch.randn(len(losses), generator=generator,
                                                  dtype=torch.float64)
    return int(torch.argmin(losses))


def contingency(truth: Sequence[Hashable], found: Sequence[Hashable]) -> dict:
    """``{true label: {found label: count}}``."""
    table: dict = {}
    for t, f in zip(truth, found):
        table.setdefault(t, Counter())[f] += 1
    return {t: dict(sorted(c.items(), key=lambda kv: str(kv[0]))) for t, c in
            sorted(table.items(), key=lambda kv: str(kv[0]))}


def adjusted_rand_index(truth: Sequence[Hashable], found: Sequence[Hashable]) -> float:
    """Hubert and Arabie's adjusted Rand index: 1 for identical partitions, ~0 for chance."""
    if len(truth) != len(found):
        raise ValueError("label sequences differ in length")
    n = len(truth)
    if n < 2:
        return 1.0
    pairs = Counter(zip(truth, found))
    a = Counter(truth)
    b = Counter(found)
    comb = lambda x: x * (x - 1) / 2  # noqa: E731
    index = sum(comb(v) for v in pairs.values())
    sum_a = sum(comb(v) for v in a.values())
    sum_b = sum(comb(v) for v in b.values())
    expected = sum_a * sum_b / comb(n)
    maximum = (sum_a + sum_b) / 2
    if maximum == expected:
        return 1.0 if index == expected else 0.0
    return (index - expected) / (maximum - expected)


def perturbed_copies(state: dict[str, torch.Tensor], k: int, *, scale: float, seed: int,
                     keys: Sequence[str]) -> list[dict[str, torch.Tensor]]:
    """K copies of ``state`` with seeded Gaussian noise on ``keys``, so the clusters
    start apart and IFCA's first choices are not all ties."""
    copies = []
    for i in range(k):
        generator = torch.Generator().manual_seed(seed * 7919 + i)
        copy = dict(state)
        for key in keys:
            copy[key] = state[key] + scale * torch.randn(state[key].shape, generator=generator,
                                                         dtype=state[key].dtype)
        copies.append(copy)
    return copies
