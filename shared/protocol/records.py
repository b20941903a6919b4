"""Adapter states <-> Flower records.

Transport is float32 by default (exact for float32 states); ``transport-dtype =
float16`` halves the bytes both ways. Received tensors are float32 again on
arrival, so aggregation and training never run in the transport precision."""

from __future__ import annotations

import io
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord

from shared.protocol.validation import UpdateRejected


def state_to_record(state: Mapping[str, torch.Tensor], dtype: str = "float32") -> ArrayRecord:
    wire = getattr(torch, dtype)
    return ArrayRecord({k: v.detach().to("cpu", wire).contiguous() for k, v in state.items()})


def record_to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in record.to_torch_state_dict().items()}


def record_bytes(record: ArrayRecord) -> int:
    """Bytes of the record's serialised arrays (each ``.npy`` data plus its header): what
    dominates a message on the wire."""
    return sum(len(array.data) for array in record.values())


def record_spec(record: ArrayRecord) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``key -> (dtype, shape)`` read from the record's headers, before any conversion."""
    return {key: (array.dtype, tuple(array.shape)) for key, array in record.items()}


def checked_record_to_state(record: ArrayRecord, *, what: str) -> dict[str, torch.Tensor]:
    """:func:`record_to_state` for a record a client sent: each array's ``.npy`` data must
    declare exactly the dtype and shape of the array's header (what ``check_spec`` judged)
    before any of it is read, so forged data can neither slip past the checks nor make
    the server allocate what its header hides. Raises :class:`UpdateRejected`."""
    state = {}
    for key, array in record.items():
        header = (array.dtype, tuple(array.shape))
        try:
            if array.stype != "numpy.ndarray":
                raise ValueError(f"serialisation {array.stype!r}")
            dtype, shape, _ = npy_header(array.data)
            if (dtype, shape) != header:
                raise ValueError(f"data is {dtype} {tuple(shape)}, header says "
                                 f"{header[0]} {header[1]}")
            data = np.load(io.BytesIO(array.data), allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:
            reason = " ".join(str(err).split())[:200]  # one line, even for hostile bytes
            raise UpdateRejected(f"{what}: {key!r} is not a valid array ({reason})") from None
        state[key] = torch.from_numpy(data).float()
    return state


_NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}


def npy_header(data: bytes) -> tuple[str, tuple[int, ...], int]:
    """``(dtype, shape, header bytes)`` of an ``np.save`` blob, read without its payload;
    :class:`ValueError` for anything that is not a version 1 or 2 ``.npy`` header."""
    buffer = io.BytesIO(data)
    try:
        read_header = _NPY_HEADER_READERS.get(np.lib.format.read_magic(buffer))
        if read_header is None:
            raise ValueError("unsupported .npy version")
        shape, _, dtype = read_header(buffer)
    except (OSError, EOFError, SyntaxError) as err:
        raise ValueError(str(err)) from None
    return str(dtype), tuple(shape), buffer.tell()
