"""The L2 bound on one client's change, shared by robust aggregation and user-level DP.

Both clip the whole adapter as one vector, so both bound the same quantity: one client
moves a level's sum by at most ``C``. Pure functions; no Flower, no files.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from server.aggregation.mean import State


def l2_norm(state: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of all tensors of ``state`` taken as one vector."""
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in state.values()))


def clip_update(delta: Mapping[str, torch.Tensor], clipping_norm: float) -> State:
    """``delta`` scaled to L2 norm at most ``clipping_norm`` (the whole adapter as one
    vector; Flower's FlatClip), in float64. An update within the bound is unchanged."""
    norm = l2_norm(delta)
    scale = min(1.0, clipping_norm / norm) if norm > 0 else 1.0
    return {k: v.double() * scale for k, v in delta.items()}
