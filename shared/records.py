"""Adapter states <-> Flower records. Transport is float32: exact for float32 states."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from flwr.app import ArrayRecord


def state_to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: v.detach().to("cpu", torch.float32).contiguous()
                        for k, v in state.items()})


def record_to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return record.to_torch_state_dict()


def record_spec(record: ArrayRecord) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``key -> (dtype, shape)`` read from the record's headers, before any conversion."""
    return {key: (array.dtype, tuple(array.shape)) for key, array in record.items()}
