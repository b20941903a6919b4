"""Checks on every update before aggregation: names, keys, shapes, dtype, finiteness, norm.

Pure: takes the update's declared spec and tensors, raises :class:`UpdateRejected`
with the reason. A rejected update is logged and dropped; the round goes on.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch

WIRE_DTYPE = "float32"


class UpdateRejected(ValueError):
    """An update failed validation; the message says why."""


def check_spec(spec: Mapping[str, tuple[str, tuple[int, ...]]],
               expected: Mapping[str, tuple[int, ...]], *, what: str,
               dtype: str = WIRE_DTYPE) -> None:
    """Keys, dtypes and shapes of a received record against the expected shapes; ``dtype``
    is the run's transport dtype."""
    missing = sorted(set(expected) - set(spec))
    unexpected = sorted(set(spec) - set(expected))
    if unexpected:
        raise UpdateRejected(f"{what}: unexpected key {shown_name(unexpected[0])}"
                             + (f" (+{len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    if missing:
        raise UpdateRejected(f"{what}: missing key {shown_name(missing[0])}"
                             + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))
    for key, (got, shape) in spec.items():
        if got != dtype:
            raise UpdateRejected(f"{what}: {key} has dtype {shown_name(got)}, expected {dtype}")
        if tuple(shape) != tuple(expected[key]):
            raise UpdateRejected(f"{what}: {key} has shape {tuple(shape)}, "
                                 f"expected {tuple(expected[key])}")


def error_summary(reason: str, limit: int = 300) -> str:
    """A client's error reason as one bounded log line: colour codes dropped and, for a
    traceback (Flower's simulation sends Ray's), its last line, where the message is."""
    lines = [line.strip() for line in _ANSI.sub("", str(reason)).splitlines() if line.strip()]
    if not lines:
        return "(no reason given)"
    text = lines[-1]
    if len(lines) > 1 and lines[0].startswith("<class ") and text.endswith("'>"):
        text = text[:-2]  # the close of Flower's "<class ...>:<'...'>" wrapper
    text = "".join(c if c.isprintable() else " " for c in " ".join(text.split()))
    return text if len(text) <= limit else text[:limit - 3] + "..."


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def shown_name(name: str) -> str:
    """A client-chosen name as written, or quoted when it would break the log line."""
    return name if name.isprintable() else repr(name)


def check_values(state: Mapping[str, torch.Tensor], *, what: str,
                 reference: Mapping[str, torch.Tensor] | None = None,
                 max_delta_norm: float | None = None) -> float:
    """Finite values, and (optionally) an L2 bound on the change from ``reference``.

    Returns the L2 norm of the change (or of the state when no reference is given).
    """
    squared = 0.0
    for key, tensor in state.items():
        if not torch.isfinite(tensor).all():
            nan = int(torch.isnan(tensor).sum())
            raise UpdateRejected(f"{what}: {key} holds NaN or Inf values ({nan} NaN, "
                                 f"{int(torch.isinf(tensor).sum())} Inf)")
        # in float64: two finite float32 (or float16) values can differ by more than their max
        delta = tensor.double() - (reference[key].double() if reference is not None else 0.0)
        squared += float(delta.pow(2).sum())
    norm = math.sqrt(squared)
    if max_delta_norm is not None and norm > max_delta_norm:
        raise UpdateRejected(f"{what}: update norm {norm:.4g} exceeds the bound "
                             f"{max_delta_norm:.4g}")
    return norm
