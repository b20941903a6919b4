"""Checks on every update before aggregation: names, keys, shapes, dtype, finiteness, norm.

Pure: takes the update's declared spec and tensors, raises :class:`UpdateRejected`
with the reason. A rejected update is logged and dropped; the round goes on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

WIRE_DTYPE = "float32"


class UpdateRejected(ValueError):
    """An update failed validation; the message says why."""


def check_spec(spec: Mapping[str, tuple[str, tuple[int, ...]]],
               expected: Mapping[str, tuple[int, ...]], *, what: str) -> None:
    """Keys, dtypes and shapes of a received record against the expected shapes."""
    missing = sorted(set(expected) - set(spec))
    unexpected = sorted(set(spec) - set(expected))
    if unexpected:
        raise UpdateRejected(f"{what}: unexpected key {unexpected[0]}"
                             + (f" (+{len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    if missing:
        raise UpdateRejected(f"{what}: missing key {missing[0]}"
                             + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))
    for key, (dtype, shape) in spec.items():
        if dtype != WIRE_DTYPE:
            raise UpdateRejected(f"{what}: {key} has dtype {dtype}, expected {WIRE_DTYPE}")
        if tuple(shape) != tuple(expected[key]):
            raise UpdateRejected(f"{what}: {key} has shape {tuple(shape)}, "
                                 f"expected {tuple(expected[key])}")


def check_values(state: Mapping[str, torch.Tensor], *, what: str,
                 reference: Mapping[str, torch.Tensor] | None = None,
                 max_delta_norm: float | None = None) -> float:
    """Finite values, and (optionally) an L2 bound on the change from ``reference``.

    Returns the L2 norm of the change (or of the state when no reference is given).
    """
    squared = 0.0
    for key, tensor in state.items():
        if not torch.isfinite(tensor).all():
            raise UpdateRejected(f"{what}: {key} holds NaN or Inf values")
        delta = tensor - reference[key] if reference is not None else tensor
        squared += float(delta.double().pow(2).sum())
    norm = math.sqrt(squared)
    if max_delta_norm is not None and norm > max_delta_norm:
        raise UpdateRejected(f"{what}: update norm {norm:.4g} exceeds the bound "
                             f"{max_delta_norm:.4g}")
    return norm
