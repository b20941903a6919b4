"""Fault injection for simulations: a client mod that makes chosen users misbehave.

With ``fault-fraction = f`` > 0, ``round(f n)`` of the ``n`` simulated training users
(half rounds up) are faulty: the users ranked first by SHA-256 of ``"seed:user-id"``, so
a test knows exactly which. Faulty user ``j`` (in that rank) of ``m`` misbehaves in
round ``r`` in the way ``fault-kinds[(j + (r - 1) m) % K]``: in round 1 the j-th faulty
user gets the j-th kind, and each round moves every faulty user on by ``m`` kinds, so a
small run (2 faulty users, 3 rounds) meets all six kinds. Each kind, on a train reply:

- ``nan`` / ``inf``: one element of the global adapter becomes NaN / +Inf;
- ``shape``: one global tensor gains a row;
- ``names``: the global adapter gains a key no adapter has (:data:`UNKNOWN_KEY`);
- ``norm``: every released tensor moves to ``sent + 1000 (trained - sent)``, an update
  1000x the real one. It is finite and well formed, so only ``max-update-norm``
  rejects it; ``clip-update-norm`` or ``aggregation = trimmed-mean`` bound it (under
  ``transport-dtype = float16`` a large one may overflow to Inf, rejected as such);
- ``crash``: the client trains (its ledger pays for it), then raises before replying.

Every corruption is a function of the DP-released reply and of what the server sent,
so it costs no privacy beyond the round's accounted spend.

Why the mod is always in the ClientApp: Flower builds the ClientApp at import, before
any run config exists, and hands the config over with each message. So the mod reads
``fault-fraction`` from every message and, at 0 (the default), only passes it on. Only
simulated nodes (``partition-id``) misbehave: a real device (``user-dir``) ignores the
setting, so no server can order deployed devices to misbehave.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Sequence

import torch
from flwr.app import Context, Message, MessageType

from shared.config import RunConfig
from shared.data.federation import load_run_population, training_users
from shared.protocol.records import record_to_state, state_to_record
from shared.protocol.wire import KEY_CONFIG, KEY_GLOBAL, KEY_PERSONA, KEY_ROUND, read_run_config

log = logging.getLogger("fedpersona.faults")
NORM_FACTOR = 1000.0
UNKNOWN_KEY = "base_model.model.model.layers.0.self_attn.no_such_module.lora_B.weight"


class InjectedCrash(RuntimeError):
    """The ``crash`` fault: raised after training, before the reply leaves."""


def faulty_users(user_ids: Sequence[str], *, seed: int, fraction: float) -> list[str]:
    """The faulty users, in rank order: the first ``round(fraction n)`` by SHA-256."""
    count = math.floor(fraction * len(user_ids) + 0.5)
    ranked = sorted(user_ids, key=lambda u: hashlib.sha256(f"{seed}:{u}".encode()).digest())
    return ranked[:count]


def fault_schedule(user_ids: Sequence[str], *, seed: int, fraction: float,
                   kinds: Sequence[str], server_round: int) -> dict[str, str]:
    """``user -> fault kind`` in ``server_round`` (1-based), for every faulty user."""
    faulty = faulty_users(user_ids, seed=seed, fraction=fraction)
    shift = (server_round - 1) * len(faulty)
    return {user: kinds[(j + shift) % len(kinds)] for j, user in enumerate(faulty)}


def inject_faults(msg: Message, context: Context,
                  call_next: Callable[[Message, Context], Message]) -> Message:
    """Flower client mod: corrupt a faulty user's train reply (or crash); else a no-op."""
    config = msg.content.config_records.get(KEY_CONFIG)
    if (msg.metadata.message_type != MessageType.TRAIN or config is None
            or "partition-id" not in context.node_config or "user-dir" in context.node_config):
        return call_next(msg, context)
    cfg = read_run_config(config)
    if cfg.fault_fraction == 0:
        return call_next(msg, context)
    server_round = int(msg.content[KEY_ROUND]["server-round"])
    users = [u.user_id for u in training_users(load_run_population(cfg), cfg)]
    partition = int(context.node_config["partition-id"])
    if not 0 <= partition < len(users):
        return call_next(msg, context)  # the handler names the bad partition
    user = users[partition]
    kind = fault_schedule(users, seed=cfg.seed, fraction=cfg.fault_fraction,
                          kinds=cfg.fault_kind_list, server_round=server_round).get(user)
    reply = call_next(msg, context)
    if kind is None:
        return reply
    log.warning("fault injection: user %s misbehaves in round %d: %s", user, server_round,
                kind)
    if kind == "crash":
        raise InjectedCrash(f"injected crash: user {user} stopped mid-training in round "
                            f"{server_round}")
    if reply.has_error() or KEY_GLOBAL not in reply.content.array_records:
        return reply  # declined: nothing to corrupt
    corrupt(reply, msg, kind, cfg)
    return reply


def corrupt(reply: Message, sent: Message, kind: str, cfg: RunConfig) -> None:
    """Apply one data fault to ``reply`` in place (``sent``: the server's message)."""
    arrays, sent_arrays = reply.content.array_records, sent.content.array_records
    if kind == "norm":
        for name in (KEY_GLOBAL, KEY_PERSONA):
            if name in arrays and name in sent_arrays:
                before = record_to_state(sent_arrays[name])
                after = record_to_state(arrays[name])
                reply.content[name] = state_to_record(
                    {k: before[k] + NORM_FACTOR * (v - before[k]) for k, v in after.items()},
                    cfg.transport_dtype)
        return
    state = record_to_state(arrays[KEY_GLOBAL])
    key = min(state)
    tensor = state[key].clone()
    if kind in ("nan", "inf"):
        tensor.view(-1)[0] = math.nan if kind == "nan" else math.inf
        state[key] = tensor
    elif kind == "shape":
        state[key] = torch.cat([tensor, tensor[-1:]])  # one row too many
    elif kind == "names":
        state[UNKNOWN_KEY] = torch.zeros_like(tensor)
    else:
        raise ValueError(f"unknown fault kind {kind!r}")
    reply.content[KEY_GLOBAL] = state_to_record(state, cfg.transport_dtype)

