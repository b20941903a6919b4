"""The device's wire log: a Flower client mod that records every reply leaving the device.

It is the outermost mod, so it sees exactly what Flower sends. Each reply becomes
one JSON line in ``USER_DIR/.fedpersona/<federation>/wire.jsonl``: the record
names and kinds, every array's name, dtype, shape and SHA-256, whether it equals
a tensor of the on-device user adapter, and every metric's name and value. Config
records are logged by value type and length only (``details``); in Flower's SecAgg+
record the masked vector's arrays by dtype, shape and byte counts, read from their
headers. A SecAgg+ stage message (:mod:`client.mods.secagg`) also logs its stage and the
sizes the server's message fixes for the reply (``secagg``). The log holds no array
contents, so keeping it costs the device nothing in privacy; ``fedpersona audit
wire`` (:mod:`shared.protocol.wire_check`) holds it to what may leave.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord

from client.node import node_store, resolve_user
from client.store import DeviceStore
from shared.protocol.records import npy_header
from shared.protocol.wire import KEY_CONFIG, KEY_ROUND, read_run_config
from shared.protocol.wire_check import (
    SECAGG_MASKED,
    SECAGG_RECORD,
    SECAGG_STAGE,
    SECAGG_STAGES,
)

WIRE_LOG = "wire.jsonl"
log = logging.getLogger("fedpersona.wire")


def record_wire(msg: Message, context: Context,
                call_next: Callable[[Message, Context], Message]) -> Message:
    try:  # before the call: Flower's secaggplus_mod pops the stage from the message
        secagg = describe_secagg_request(msg)
    except Exception as err:
        secagg = {"stage": None, "unreadable": str(err)}
    reply = call_next(msg, context)
    try:
        cfg = read_run_config(msg.content[KEY_CONFIG])
        store = node_store(cfg, *resolve_user(context, cfg))
        # the user adapter is read only for replies that carry tensors (train replies)
        carries_arrays = not reply.has_error() and bool(reply.content.array_records)
        entry = describe_reply(msg, reply,
                               private=_private_tensors(store) if carries_arrays else [],
                               secagg=secagg)
        append_line(store.root / WIRE_LOG, entry)
    except Exception as err:
        # audit then finds the round missing from the log and says so
        log.warning("wire log: could not record a %s reply: %s", msg.metadata.message_type, err)
    return reply


def describe_secagg_request(msg: Message) -> dict | None:
    """The SecAgg+ stage of a request and what it fixes about the reply; None if not one.

    ``peers``: the public-key pairs sent in ``share_keys`` (the client's own included);
    ``nodes``: the node ids named in ``unmask``; ``persona_slots``: the personas of the
    round, which fix the masked vector's layout (:mod:`shared.privacy.secagg`)."""
    configs = msg.content.config_records.get(SECAGG_RECORD)
    if configs is None:
        return None
    stage = configs.get(SECAGG_STAGE)
    out: dict = {"stage": stage if stage in SECAGG_STAGES else None}
    if stage == "share_keys":
        out["peers"] = sum(key != SECAGG_STAGE for key in configs)
    elif stage == "collect_masked_vectors" and KEY_ROUND in msg.content.config_records:
        out["persona_slots"] = len(list(msg.content[KEY_ROUND]["persona-names"]))
    elif stage == "unmask":
        out["nodes"] = len(list(configs.get("active_nids", []))) + len(
            list(configs.get("dead_nids", [])))
    return out


def describe_reply(msg: Message, reply: Message, *, private: list[torch.Tensor],
                   secagg: dict | None = None) -> dict:
    round_info = msg.content.config_records.get(KEY_ROUND)
    entry: dict = {"time": time.time(), "message_type": msg.metadata.message_type,
                   "server_round": int(round_info["server-round"]) if round_info else None,
                   "error": reply.has_error(), "records": {}}
    if secagg is not None:
        entry["secagg"] = secagg
    if reply.has_error():
        return entry
    for name, record in reply.content.items():
        if isinstance(record, ArrayRecord):
            entry["records"][name] = {"kind": "arrays", "arrays": {
                key: _describe_array(array.numpy(), private) for key, array in record.items()}}
        elif isinstance(record, MetricRecord):
            entry["records"][name] = {"kind": "metrics", "values": dict(record)}
        elif isinstance(record, ConfigRecord):  # values may be strings: types only
            entry["records"][name] = {"kind": "config", "values": {
                key: type(value).__name__ for key, value in record.items()}, "details": {
                key: _describe_value(value, arrays=name == SECAGG_RECORD and key == SECAGG_MASKED)
                for key, value in record.items()}}
        else:
            entry["records"][name] = {"kind": type(record).__name__}
    return entry


def _describe_array(values: np.ndarray, private: list[torch.Tensor]) -> dict:
    tensor = torch.from_numpy(np.ascontiguousarray(values))
    matches = tensor.is_floating_point() and bool(tensor.abs().sum() > 0) and any(
        p.shape == tensor.shape and torch.allclose(p, tensor.float(), rtol=1e-3, atol=1e-6)
        for p in private)
    return {"dtype": str(values.dtype), "shape": list(values.shape),
            "sha256": hashlib.sha256(values.tobytes()).hexdigest(),
            "matches_user_adapter": matches}


def _describe_value(value: object, *, arrays: bool) -> dict:
    """A config value's type and length, never its content; with ``arrays``, each list
    item's numpy header (dtype, shape) and byte counts."""
    out: dict = {"type": type(value).__name__}
    if isinstance(value, str | bytes):
        out["len"] = len(value)
    elif isinstance(value, list):
        out["len"] = len(value)
        out["items"] = sorted({type(item).__name__ for item in value})
        sized = [len(item) for item in value if isinstance(item, str | bytes)]
        out["max_item_len"] = max(sized, default=0)
        out["total_len"] = sum(sized)
        if arrays:
            out["arrays"] = [_array_header(item) if isinstance(item, bytes) else None
                             for item in value]
    return out


def _array_header(data: bytes) -> dict | None:
    """dtype, shape, header and payload bytes of an ``np.save`` blob (None: not one).
    Only the header is parsed; the payload size lets the audit see trailing bytes."""
    try:
        dtype, shape, header_bytes = npy_header(data)
    except ValueError:
        return None
    return {"dtype": dtype, "shape": list(shape), "header_bytes": header_bytes,
            "data_bytes": len(data) - header_bytes}


def _private_tensors(store: DeviceStore) -> list[torch.Tensor]:
    state = store.load_user_adapter()
    return [] if state is None else [t.float() for t in state.values() if t.abs().sum() > 0]


def append_line(path: Path, entry: dict) -> None:
    """One whole line per write (``O_APPEND``), synced: a crash loses at most this line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(entry, allow_nan=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_wire_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    entries = []
    for number, line in enumerate(path.read_bytes().splitlines(), 1):
        try:
            entries.append(json.loads(line))
        except ValueError:  # not JSON, or not UTF-8: a finding of the audit, not a crash
            entries.append({"unreadable": f"{path}:{number}"})
    return entries
