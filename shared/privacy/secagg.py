"""Secure aggregation's input vector and its precision (pure: numpy, no Flower).

Under ``secagg = true`` each client's contribution to Flower's SecAgg+ protocol is
one flat list of arrays, the same layout on every client::

    [global change]  +  [persona slot 0]  + ... +  [persona slot K-1]

Each part is the adapter's tensors in sorted-name order; a "change" is what the
client released minus what the server sent (smaller than the adapter itself, so a
small clipping range quantizes it finely). A client fills only the slot of the
persona it trained and zeros elsewhere, so one SecAgg+ run over all sampled
clients yields the global sum and every persona's sum at once: the server learns
sums per slot, never a client's vector. The price is upload: K + 1 adapters per
client instead of 2.

Flower's client mod weights a vector by ``q / R`` with ``q = round(n / W * R)``
(``n`` examples, ``W`` the max weight, ``R`` the quantization range) and the server
divides the sum by the total ``Q``: the global part comes out as the
example-weighted mean. A persona slot comes out as its members' weighted sum over
``Q``; multiplying by ``Q / Q_k`` (``Q_k``: the members' total, from the public
example counts) gives the persona's mean, as plain aggregation computes it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

MODULUS_RANGE = 2**32  # Flower's default modulus for the masks (a power of two)


def quantized_weight(num_examples: int, *, max_weight: int, quantization_range: int) -> int:
    """The integer weight Flower's ``secaggplus_mod`` gives a client (``q_ratio``)."""
    return round(num_examples / max_weight * quantization_range)


def error_bound(vectors: int, weight_total: int, *, clipping_range: float,
                quantization_range: int) -> float:
    """The largest per-coordinate difference between a SecAgg+ mean and the exact mean.

    Each of the ``vectors`` summed is stochastically rounded to a multiple of the
    quantum ``2c / R``, off by less than one quantum; the mean divides the weighted
    sum by ``weight_total / R`` (the quantized weights of the mean's members)."""
    if weight_total <= 0:
        raise ValueError(f"weight_total must be > 0, got {weight_total}")
    quantum = 2.0 * clipping_range / quantization_range
    return vectors * quantum / (weight_total / quantization_range)


def clip_change(change: Mapping[str, np.ndarray], *, max_norm: float,
                clipping_range: float) -> tuple[dict[str, np.ndarray], bool]:
    """The change scaled to L2 norm <= ``max_norm`` (0 = no bound), then each coordinate
    clipped to the quantizer's range; and whether anything was cut.

    The server cannot check a masked update, so an honest client bounds its own; the
    quantizer would clip silently anyway."""
    norm = math.sqrt(sum(float(np.square(v, dtype=np.float64).sum()) for v in change.values()))
    scale = max_norm / norm if max_norm and norm > max_norm else 1.0
    out = {k: np.clip(v * scale, -clipping_range, clipping_range).astype(np.float32)
           for k, v in change.items()}
    clipped = scale < 1.0 or any(np.abs(v).max(initial=0.0) * scale > clipping_range
                                 for v in change.values())
    return out, clipped


def pack(global_change: Mapping[str, np.ndarray], persona_change: Mapping[str, np.ndarray] | None,
         slot: int, num_slots: int) -> list[np.ndarray]:
    """The SecAgg+ input: global, then ``num_slots`` persona slots (``slot`` filled; -1: none)."""
    if not -1 <= slot < num_slots:
        raise ValueError(f"persona slot {slot} is not in [-1, {num_slots})")
    if (slot >= 0) != (persona_change is not None):
        raise ValueError("a persona change needs a slot and a slot needs a persona change")
    keys = sorted(global_change)
    if persona_change is not None and sorted(persona_change) != keys:
        raise ValueError("the persona change has other tensors than the global one")
    out = [np.asarray(global_change[k], dtype=np.float32) for k in keys]
    for index in range(num_slots):
        source = persona_change if index == slot else None
        out += [np.asarray(source[k], dtype=np.float32) if source is not None
                else np.zeros_like(global_change[k], dtype=np.float32) for k in keys]
    return out


def unpack(vector: Sequence[np.ndarray], shapes: Mapping[str, tuple[int, ...]],
           num_slots: int) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    """``(global part, [slot parts])`` of a vector laid out by :func:`pack`."""
    keys = sorted(shapes)
    check_layout([tuple(np.shape(a)) for a in vector], shapes, num_slots)
    parts = [dict(zip(keys, vector[i * len(keys):(i + 1) * len(keys)]))
             for i in range(num_slots + 1)]
    return parts[0], parts[1:]


def check_layout(got: Sequence[tuple[int, ...]], shapes: Mapping[str, tuple[int, ...]],
                 num_slots: int) -> None:
    """Raise ValueError naming the first difference from the :func:`pack` layout."""
    want = [tuple(shapes[k]) for k in sorted(shapes)] * (num_slots + 1)
    if len(got) != len(want):
        raise ValueError(f"{len(got)} arrays, expected {len(want)} (global + {num_slots} "
                         "persona slots)")
    for index, (have, need) in enumerate(zip(got, want)):
        if tuple(have) != need:
            raise ValueError(f"array {index} has shape {list(have)}, expected {list(need)}")
