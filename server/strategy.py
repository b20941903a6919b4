"""The hierarchical strategy: global over all clients, each persona over its members.

Each sampled client receives the global adapter and *only its own* persona's
adapter. Each reply is validated (record names, keys, dtype, shapes, finite
values) before it counts; a bad reply is rejected with a reason and the round
goes on. Aggregation is the pure :mod:`server.aggregation`: each accepted update
becomes its changes from what was sent, each level gets one mean change (the mean, the
robust aggregate or the central-DP release), and one step applies it.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence

import torch
from flwr.app import Message, RecordDict

from server.aggregation import (
    GLOBAL,
    PERSONA_PREFIX,
    Changes,
    ClientUpdate,
    client_change,
    level_name,
    mean_changes,
    private_changes,
    robust_changes,
    secret_generator,
    step_levels,
)
from server.checkpoint import ServerState
from shared.config import RunConfig
from shared.model.adapters import State, is_trainable_key
from shared.protocol.records import checked_record_to_state, record_spec, state_to_record
from shared.protocol.validation import (
    UpdateRejected,
    check_spec,
    check_values,
    error_summary,
    shown_name,
)
from shared.protocol.wire import KEY_GLOBAL, KEY_METRICS, KEY_PERSONA

ALLOWED_REPLY_KEYS = {KEY_GLOBAL, KEY_PERSONA, KEY_METRICS}


def sample_nodes(node_ids: Iterable[int], k: int, *, seed: int, server_round: int,
                 key=None) -> list[int]:
    """``k`` nodes, reproducible from the seed and round.

    Node ids are random per connection, so the order sampled from is by ``key``
    (a stable name of the node's user) when given: a restarted server then
    samples the same users in the same round."""
    nodes = sorted(node_ids, key=key)
    return sorted(random.Random(seed * 100_003 + server_round).sample(nodes, min(k, len(nodes))))


def sent_part(state: State, scheme: str, dtype: str = "float32") -> State:
    """What travels: B only under FFA (A is public, derived from the seed), as the
    client receives it: rounded through the transport ``dtype`` and back to float32.

    Every change the server takes (norm checks, means, FedAdam's pseudo-gradient) is
    against this, so a float16 run measures the client's training, not the rounding,
    and the plain and SecAgg+ paths (whose clients send changes) agree.
    """
    part = {k: v for k, v in state.items() if is_trainable_key(k, scheme)}
    if dtype == "float32":
        return part
    wire = getattr(torch, dtype)
    return {k: v.to(wire).to(v.dtype) for k, v in part.items()}


def train_content(state: ServerState, persona: str | None, scheme: str,
                  dtype: str = "float32") -> RecordDict:
    content = RecordDict({KEY_GLOBAL: state_to_record(sent_part(state.global_state, scheme),
                                                      dtype)})
    if persona is not None:
        content[KEY_PERSONA] = state_to_record(sent_part(state.persona_states[persona], scheme),
                                               dtype)
    return content


def discovery_content(state: ServerState, personas: tuple[str, ...], scheme: str,
                      dtype: str = "float32") -> RecordDict:
    """Global plus all K discovered personas (``persona-0`` ...): the client picks one."""
    content = RecordDict({KEY_GLOBAL: state_to_record(sent_part(state.global_state, scheme),
                                                      dtype)})
    for i, persona in enumerate(personas):
        content[f"{KEY_PERSONA}-{i}"] = state_to_record(
            sent_part(state.persona_states[persona], scheme), dtype)
    return content


def chosen_persona(reply: Message, personas: tuple[str, ...]) -> str | None:
    """The discovered persona a client says it trained (validated); None if it declined."""
    if reply.has_error() or KEY_METRICS not in reply.content.metric_records:
        return None  # parse_reply names the problem
    index = reply.content.metric_records[KEY_METRICS].get("persona-index")
    if _declined(reply.content.metric_records[KEY_METRICS]):
        return None
    if not isinstance(index, int) or not 0 <= index < len(personas):
        raise UpdateRejected(f"persona-index {index!r} is not one of the {len(personas)} "
                             "discovered personas")
    return personas[index]


def _declined(metrics) -> bool:
    """The client's ``declined`` flag; anything but 0 or 1 (NaN, a list, 2) is refused."""
    declined = metrics.get("declined", 0)
    if declined not in (0, 1):
        raise UpdateRejected(f"declined must be 0 or 1, got {declined!r}")
    return declined == 1


def parse_reply(reply: Message, *, persona: str | None, expected: dict[str, tuple[int, ...]],
                current: ServerState | None = None, scheme: str = "ffa",
                max_update_norm: float = 0.0,
                dtype: str = "float32") -> tuple[ClientUpdate | None, dict]:
    """Validate one training reply; ``(None, metrics)`` when the client declined.

    With ``current`` and ``max_update_norm > 0``, an adapter whose L2 change from
    what the server sent exceeds the bound is rejected. ``metrics`` gains
    ``update-norm``: the L2 norm of the global adapter's change (computed from
    DP-released tensors only). Raises :class:`UpdateRejected` naming the problem.
    """
    if reply.has_error():
        raise UpdateRejected(f"client error: {error_summary(reply.error.reason)}")
    content = reply.content
    unknown = set(content.keys()) - ALLOWED_REPLY_KEYS
    if unknown:
        raise UpdateRejected("unexpected record(s) in reply: "
                             + ", ".join(map(shown_name, sorted(unknown))))
    if KEY_METRICS not in content.metric_records:
        raise UpdateRejected("reply has no metrics record")
    metrics = dict(content.metric_records[KEY_METRICS])
    if _declined(metrics):
        return None, metrics
    num_examples = metrics.get("num-examples")
    if not isinstance(num_examples, int) or num_examples <= 0:
        raise UpdateRejected(f"num-examples must be a positive integer, got {num_examples!r}")
    if KEY_GLOBAL not in content.array_records:
        raise UpdateRejected("reply has no global adapter")
    check_spec(record_spec(content.array_records[KEY_GLOBAL]), expected, what="global adapter",
               dtype=dtype)
    global_state = checked_record_to_state(content.array_records[KEY_GLOBAL],
                                           what="global adapter")
    bound = max_update_norm or None
    metrics["update-norm"] = check_values(
        global_state, what="global adapter", max_delta_norm=bound,
        reference=sent_part(current.global_state, scheme, dtype) if current else None)
    persona_state: State = {}
    if persona is not None:
        if KEY_PERSONA not in content.array_records:
            raise UpdateRejected(f"reply has no adapter for persona {persona}")
        check_spec(record_spec(content.array_records[KEY_PERSONA]), expected,
                   what=f"persona {persona} adapter", dtype=dtype)
        persona_state = checked_record_to_state(content.array_records[KEY_PERSONA],
                                                what=f"persona {persona} adapter")
        check_values(persona_state, what=f"persona {persona} adapter", max_delta_norm=bound,
                     reference=(sent_part(current.persona_states[persona], scheme, dtype)
                                if current else None))
    elif KEY_PERSONA in content.array_records:
        raise UpdateRejected("reply carries a persona adapter but the client has no persona")
    return ClientUpdate(global_state=global_state, persona=persona or "",
                        persona_state=persona_state, num_examples=num_examples), metrics


def sent_levels(state: ServerState, cfg: RunConfig) -> dict[str, State]:
    """Level (``global``, ``persona/<p>``) -> what the server sends of it this round."""
    return {GLOBAL: sent_part(state.global_state, cfg.lora_scheme, cfg.transport_dtype),
            **{level_name(p): sent_part(s, cfg.lora_scheme, cfg.transport_dtype)
               for p, s in state.persona_states.items()}}


def round_changes(state: ServerState, updates: Sequence[ClientUpdate], cfg: RunConfig,
                  generator=None) -> Changes:
    """The round's mean change of each level from the accepted updates: the example-
    weighted mean, the robust aggregate, or (central DP) every planned level's noised
    release, which is counted in the ledger here, before it leaves the server."""
    sent = sent_levels(state, cfg)
    changes = [client_change(u, sent) for u in updates]
    if cfg.central_dp:
        ledger = state.central_dp
        if ledger is None:
            raise RuntimeError("central-dp is on but the server state has no central-DP plan")
        released = private_changes(changes, sent, ledger, generator or secret_generator())
        ledger.record_release(sorted(released))
        return released
    if cfg.aggregation != "mean" or cfg.clip_update_norm > 0:
        return robust_changes(changes, aggregation=cfg.aggregation,
                              trim_fraction=cfg.trim_fraction, clip_norm=cfg.clip_update_norm)
    return mean_changes(changes)


def apply_changes(state: ServerState, changes: Changes, cfg: RunConfig) -> None:
    """Step each level in ``changes`` to ``sent + lr * mean change`` (or FedAdam's step)
    and store it in ``state``; a level without a change this round is unchanged."""
    sent = sent_levels(state, cfg)
    new, moments = step_levels({name: sent[name] for name in changes}, changes,
                               state.optimizer, optimizer=cfg.server_optimizer,
                               lr=cfg.server_learning_rate)
    state.optimizer.update(moments)
    for name, part in new.items():
        if name == GLOBAL:
            state.global_state = {**state.global_state, **part}
        else:
            persona = name.removeprefix(PERSONA_PREFIX)
            state.persona_states[persona] = {**state.persona_states[persona], **part}


def apply_round(state: ServerState, updates: Sequence[ClientUpdate], cfg: RunConfig,
                generator=None) -> None:
    """Aggregate accepted updates into ``state``: global over all, personas over members;
    personas with no member this round are unchanged (under central DP, every planned
    level is released)."""
    apply_changes(state, round_changes(state, updates, cfg, generator), cfg)
