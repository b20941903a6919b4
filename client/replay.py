"""Idempotent train rounds: the released reply, kept on the device to be sent again.

A server killed mid-round resumes from its last checkpoint and sends the same
round again, with the same content. A client that already answered it must not
train a second time: its ledger would count the round twice (never unsafe, but
it can exhaust the budget earlier than an uninterrupted run would) and its user
adapter would be trained twice. So each train round ends by keeping, atomically,
the reply it released together with the SHA-256 of the instruction it answered
(:func:`content_digest`) and the user adapter that round produced. When the same
round arrives with the same digest, the device sends that reply again and
trains nothing.

Re-sending it costs no privacy: the reply is a fixed, already released output,
accounted in the ledger before it first left; sending the identical bytes again
is post-processing of that output (Dwork & Roth 2014, Prop. 2.1), so the ledger
rightly records nothing more. An instruction that differs in any byte (the
server's state changed) is a new question and is trained and accounted afresh.

This module only turns records into bytes and back; :class:`client.store.DeviceStore`
decides when to keep and when to replay. File format: one safetensors file,
every Flower array kept as its raw bytes (``uint8``) with its dtype, shape and
stype in the header, so the re-sent reply is byte-identical whatever the
transport dtype; metrics as JSON in the header; the header also holds the
round, the instruction digest and the reply's own digest, which is checked on
load.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from safetensors import safe_open
from safetensors.torch import save

from shared.config import RunConfig
from shared.protocol.wire import KEY_CONFIG
from shared.protocol.wire_check import SECAGG_RECORD

FORMAT = "fedpersona-replay-1"


class ReplayError(ValueError):
    """A replay file that cannot be trusted, or a reply that cannot be kept."""


@dataclass
class Replay:
    server_round: int
    instruction: str  # content_digest of the message that was answered
    reply: RecordDict
    user_state: dict[str, torch.Tensor] | None  # the user adapter after that round


# Flower's SecAgg+ keys, ciphertexts and peer ids: fresh in every protocol run, and not
# an input of the training (the mod masks the handler's reply after it is computed).

# Run settings that do not enter what a device computes for a train reply: those of the
# sections that are no training input (shared.config.SECTIONS: where the run lives,
# which users a simulation runs, what the server does with the replies, the user
# adapter). Two instructions that differ only in these get the same output from the
# same draws; so runs that compare user-adapter settings release identical shared
# adapters. A new setting is hashed or not by its section, never by a list kept here.
NOT_TRAINING_INPUTS = RunConfig.section_keys(training_input=False)


def content_digest(content: RecordDict, *, config_ignore: frozenset[str] = frozenset()
                   ) -> str:
    """SHA-256 of a RecordDict's names, kinds and values (array bytes included), without
    the SecAgg+ protocol record and without the ``config`` record's ``config_ignore`` keys.

    Records are taken in name order, array entries in record order, config and
    metric entries in key order with their types; every header is JSON and every
    array's byte count is hashed before its bytes, so no two contents collide by
    concatenation."""
    digest = hashlib.sha256()
    for name in sorted(content):
        if name == SECAGG_RECORD:
            continue
        record = content[name]
        if isinstance(record, ArrayRecord):
            digest.update(json.dumps(["arrays", name, len(record)]).encode())
            for key, array in record.items():
                digest.update(json.dumps([key, array.dtype, list(array.shape), array.stype,
                                          len(array.data)]).encode())
                digest.update(array.data)
        else:
            values = [[key, type(value).__name__, repr(value)]
                      for key, value in sorted(record.items())
                      if not (name == KEY_CONFIG and key in config_ignore)]
            digest.update(json.dumps([type(record).__name__, name, values]).encode())
    return digest.hexdigest()


def pack(replay: Replay) -> bytes:
    """The replay as safetensors bytes; :class:`ReplayError` for a reply it cannot hold."""
    tensors: dict[str, torch.Tensor] = {}
    manifest = []
    for name, record in replay.reply.items():
        if isinstance(record, ArrayRecord):
            entries = []
            for key, array in record.items():
                blob = f"a{len(tensors)}"
                tensors[blob] = (torch.frombuffer(bytearray(array.data), dtype=torch.uint8)
                                 if array.data else torch.empty(0, dtype=torch.uint8))
                entries.append([key, array.dtype, list(array.shape), array.stype, blob])
            manifest.append({"name": name, "kind": "arrays", "arrays": entries})
        elif isinstance(record, MetricRecord | ConfigRecord):
            values = dict(record)
            if any(isinstance(v, bytes) for v in values.values()):
                raise ReplayError(f"record {name!r} holds bytes; the replay file keeps none")
            kind = "metrics" if isinstance(record, MetricRecord) else "config"
            manifest.append({"name": name, "kind": kind, "values": values})
        else:
            raise ReplayError(f"record {name!r} of type {type(record).__name__} cannot be kept")
    user_keys = []
    for key, tensor in (replay.user_state or {}).items():
        blob = f"u{len(user_keys)}"
        tensors[blob] = tensor.detach().cpu().contiguous()
        user_keys.append([key, blob])
    metadata = {"format": FORMAT, "server-round": str(replay.server_round),
                "instruction-sha256": replay.instruction,
                "reply-sha256": content_digest(replay.reply),
                "manifest": json.dumps(manifest),
                "user-adapter": json.dumps(user_keys if replay.user_state is not None else None)}
    return save(tensors, metadata=metadata)


def unpack(path: Path) -> Replay:
    """Read a replay file; :class:`ReplayError` when it is torn, corrupt or not one."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ReplayError(f"{path}: not a replay file")
            reply = RecordDict()
            for entry in json.loads(meta["manifest"]):
                if entry["kind"] == "arrays":
                    reply[entry["name"]] = ArrayRecord({
                        key: Array(dtype=dtype, shape=tuple(shape), stype=stype,
                                   data=fh.get_tensor(blob).numpy().tobytes())
                        for key, dtype, shape, stype, blob in entry["arrays"]})
                elif entry["kind"] == "metrics":
                    reply[entry["name"]] = MetricRecord(entry["values"])
                else:
                    reply[entry["name"]] = ConfigRecord(entry["values"])
            user_keys = json.loads(meta["user-adapter"])
            user_state = (None if user_keys is None else
                          {key: fh.get_tensor(blob) for key, blob in user_keys})
            replay = Replay(int(meta["server-round"]), meta["instruction-sha256"], reply,
                            user_state)
            expected = meta["reply-sha256"]
    except ReplayError:
        raise
    except Exception as err:
        raise ReplayError(f"{path}: unreadable replay file ({type(err).__name__}: {err})") \
            from None
    if content_digest(replay.reply) != expected:
        raise ReplayError(f"{path}: the kept reply does not match its digest")
    return replay


def states_equal(a: Mapping[str, torch.Tensor] | None,
                 b: Mapping[str, torch.Tensor] | None) -> bool:
    if a is None or b is None:
        return a is b
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
