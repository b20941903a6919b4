"""Robust aggregation: what one accepted but extreme update can do to the aggregate.

Validation (:mod:`shared.protocol.validation`) rejects what is malformed; these aggregates limit
an update that is well formed but extreme. Both act on each client's change of an
adapter, the whole adapter taken as one vector:

- norm clipping (:func:`server.aggregation.clip.clip_update`, the clip user-level DP
  uses): each change is scaled to L2 norm at most ``C``. An example-weighted mean then
  moves by at most ``C``, and one client with weight ``w_i`` of ``W`` contributes at most
  ``w_i C / W`` of it.
- the coordinate-wise trimmed mean (Yin, Chen, Ramchandran & Bartlett, "Byzantine-Robust
  Distributed Learning: Towards Optimal Statistical Rates", ICML 2018): per coordinate,
  the ``floor(beta n)`` largest and smallest of the ``n`` values are dropped and the rest
  averaged. With at most ``floor(beta n)`` bad clients, every coordinate of the result
  lies between the smallest and largest honest value. It is unweighted, as in the paper:
  example counts are reported by the clients, so weighting by them would let a bad
  client buy back the influence the trimming took away.

Pure functions over ``dict[str, Tensor]``; no Flower, no files.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from server.aggregation.clip import clip_update
from server.aggregation.mean import (
    Changes,
    ClientUpdate,
    State,
    by_level,
    group_by_persona,
    weighted_mean,
)
from shared.config import AGGREGATIONS


def trimmed_count(n: int, trim_fraction: float) -> int:
    """Values dropped at *each* end out of ``n``: ``floor(trim_fraction * n)``.

    The tolerance keeps e.g. ``0.29 * 100 = 28.999999999999996`` at 29."""
    if not 0.0 <= trim_fraction < 0.5:
        raise ValueError(f"trim fraction must be in [0, 0.5), got {trim_fraction}")
    return math.floor(trim_fraction * n + 1e-9)


def trimmed_mean(states: Sequence[Mapping[str, torch.Tensor]], trim_fraction: float) -> State:
    """Coordinate-wise ``trim_fraction``-trimmed mean of ``states`` (Yin et al. 2018).

    Parameters
    ----------
    states : n states with the same keys and shapes.
    trim_fraction : beta in [0, 0.5); ``floor(beta n)`` values are dropped at each end of
        every coordinate, so at least one value always remains. beta = 0 is the plain mean.

    Returns
    -------
    One state, each tensor in the dtype of ``states[0]`` (computed in float64).
    """
    if not states:
        raise ValueError("nothing to aggregate")
    keys = set(states[0])
    if any(set(state) != keys for state in states[1:]):
        raise ValueError("states have different keys")
    k = trimmed_count(len(states), trim_fraction)
    out = {}
    for key, first in states[0].items():
        stacked = torch.stack([state[key].double() for state in states])  # (n, *shape)
        kept = stacked.sort(dim=0).values[k:len(states) - k]  # (n - 2k, *shape)
        out[key] = kept.mean(dim=0).to(first.dtype)
    return out


def robust_mean(changes: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float], *,
                aggregation: str, trim_fraction: float, clip_norm: float) -> State:
    """The robust aggregate of one level's ``changes``.

    Each change is first clipped to L2 norm ``clip_norm`` (0 = no clip; a clipped change is
    float64); the changes are then averaged by ``weights`` (``aggregation = "mean"``) or by
    the unweighted coordinate-wise trimmed mean (``"trimmed-mean"``)."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}; got "
                         f"{aggregation!r}")
    if clip_norm > 0:
        changes = [clip_update(c, clip_norm) for c in changes]
    return (trimmed_mean(changes, trim_fraction) if aggregation == "trimmed-mean"
            else weighted_mean(changes, weights))


def robust_hierarchical_mean(changes: Sequence[ClientUpdate], *, aggregation: str,
                             trim_fraction: float,
                             clip_norm: float) -> tuple[State, dict[str, State]]:
    """:func:`server.aggregation.mean.hierarchical_mean` through :func:`robust_mean`:
    global over every change, each persona over its members (clients without one: global
    only)."""
    def level(states: list[State], weights: list[int]) -> State:
        return robust_mean(states, weights, aggregation=aggregation,
                           trim_fraction=trim_fraction, clip_norm=clip_norm)

    global_change = level([u.global_state for u in changes], [u.num_examples for u in changes])
    persona_changes = {
        persona: level([u.persona_state for u in members], [u.num_examples for u in members])
        for persona, members in group_by_persona(changes).items() if persona}
    return global_change, persona_changes


def robust_changes(changes: Sequence[ClientUpdate], *, aggregation: str, trim_fraction: float,
                   clip_norm: float) -> Changes:
    """The robust mean change of each level with members this round (none: no level)."""
    if not changes:
        return {}
    return by_level(*robust_hierarchical_mean(changes, aggregation=aggregation,
                                              trim_fraction=trim_fraction,
                                              clip_norm=clip_norm))
