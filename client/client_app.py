"""The ClientApp: translate Flower messages to on-device calls and back.

Which user a node serves: ``--node-config user-dir=...`` on a real SuperNode;
in a simulation, ``partition-id`` indexes the run's training users.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.store import DeviceStore
from client.trainer import DPSettings, sample_rate, train_released, train_user
from shared.adapters import RELEASED_LEVELS, activate, level_state, load_level
from shared.config import RunConfig
from shared.federation import load_run_population, training_users
from shared.lm import encode_records, evaluate_stats
from shared.records import record_to_state, state_to_record
from shared.runtime import Runtime, get_runtime
from shared.userdata import UserData, load_user
from shared.wire import (
    EVAL_LEVELS,
    KEY_CONFIG,
    KEY_GLOBAL,
    KEY_METRICS,
    KEY_PERSONA,
    KEY_ROUND,
    read_run_config,
)

log = logging.getLogger("fedpersona.client")
app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Report this user's persona index (public per the threat model) and example count."""
    cfg, info = _setup(msg)
    user_dir, user_index = resolve_user(context, cfg)
    user = load_user(user_dir)
    metrics = {"persona-index": _persona_index(user, info), "num-examples": len(user.train),
               "user-index": user_index}
    return Message(RecordDict({KEY_METRICS: MetricRecord(metrics)}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, info = _setup(msg)
    runtime = get_runtime(cfg)
    user_dir, user_index = resolve_user(context, cfg)
    user = load_user(user_dir)
    store = DeviceStore(user_dir, cfg.federation_key)
    ledger = store.load_ledger(target_epsilon=cfg.target_epsilon, target_delta=cfg.target_delta)
    persona_index = _persona_index(user, info)
    data = encode_records(user.train, runtime.tokenizer, cfg.seq_len)
    metrics = {"num-examples": len(user.train), "persona-index": persona_index,
               "user-index": user_index, "dp": int(cfg.dp), "declined": 0}

    if cfg.dp:
        entry = (cfg.noise_multiplier, sample_rate(cfg.batch_size, len(data)), cfg.local_steps)
        if not ledger.can_afford(entry):
            # Declining is itself public; what it reveals is the budget, not the data.
            metrics.update({"declined": 1, "epsilon": ledger.epsilon})
            return Message(RecordDict({KEY_METRICS: MetricRecord(metrics)}), reply_to=msg)

    _load_levels(runtime, msg.content, persona_index, store)
    generator = torch.Generator().manual_seed(_seed(cfg, int(info["server-round"]), user))
    result = train_released(
        runtime.model, data, steps=cfg.local_steps, batch_size=cfg.batch_size,
        lr=cfg.learning_rate, scheme=cfg.lora_scheme, generator=generator,
        dp=DPSettings(cfg.dp, cfg.noise_multiplier, cfg.max_grad_norm))
    if result.accountant_entry is not None:
        ledger.record(result.accountant_entry)
    else:
        ledger.rounds += 1
    store.save_ledger(ledger)  # spent before anything leaves the device

    reply = RecordDict({KEY_GLOBAL: state_to_record(
        level_state(runtime.model, "global", scheme=cfg.lora_scheme))})
    if persona_index >= 0:
        reply[KEY_PERSONA] = state_to_record(
            level_state(runtime.model, "persona", scheme=cfg.lora_scheme))
    user_loss = train_user(runtime.model, data, steps=cfg.user_steps, batch_size=cfg.batch_size,
                           lr=cfg.user_learning_rate, scheme=cfg.lora_scheme,
                           generator=generator)
    if cfg.user_steps:
        store.save_user_adapter(level_state(runtime.model, "user"), runtime.lora)
    # Only public or accounted numbers leave: the losses were computed on raw
    # batches (and the user loss without DP), so they stay in the device's log.
    log.info("user %s round %s: DP train loss %.4f, user loss %.4f", user.profile.user_id,
             info["server-round"], result.train_loss, user_loss)
    metrics.update({"steps": result.steps, "epsilon": ledger.epsilon if cfg.dp else -1.0})
    reply[KEY_METRICS] = MetricRecord(metrics)
    return Message(reply, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Per-user test metrics at each level: base, global, global+persona, +user."""
    cfg, info = _setup(msg)
    runtime = get_runtime(cfg)
    user_dir, user_index = resolve_user(context, cfg)
    user = load_user(user_dir)
    store = DeviceStore(user_dir, cfg.federation_key)
    persona_index = _persona_index(user, info)
    _load_levels(runtime, msg.content, persona_index, store)
    records = user.test[:cfg.eval_max_records] if cfg.eval_max_records else user.test
    data = encode_records(records, runtime.tokenizer, cfg.seq_len)
    metrics: dict[str, float | int] = {"user-index": user_index, "persona-index": persona_index,
                                        "num-examples": len(records)}
    for name, levels in EVAL_LEVELS.items():
        if levels:
            activate(runtime.model, levels)
            stats = evaluate_stats(runtime.model, data)
        else:
            with runtime.model.disable_adapter():
                stats = evaluate_stats(runtime.model, data)
        metrics.update({f"{name}/nll-sum": stats.nll_sum, f"{name}/correct": stats.correct,
                        f"{name}/tokens": stats.tokens})
    activate(runtime.model, RELEASED_LEVELS)
    return Message(RecordDict({KEY_METRICS: MetricRecord(metrics)}), reply_to=msg)


# -- helpers --------------------------------------------------------------------------------

def _setup(msg: Message) -> tuple[RunConfig, ConfigRecord]:
    return read_run_config(msg.content[KEY_CONFIG]), msg.content[KEY_ROUND]


def resolve_user(context: Context, cfg: RunConfig) -> tuple[Path, int]:
    """The user directory this node serves, and its index among simulated users (-1 if real)."""
    if "user-dir" in context.node_config:
        return Path(str(context.node_config["user-dir"])).expanduser(), -1
    partition = int(context.node_config["partition-id"])
    population = load_run_population(cfg)
    users = training_users(population, cfg)
    if partition >= len(users):
        raise ValueError(f"partition-id {partition} but the run has {len(users)} users: set "
                         f"num-supernodes to {len(users)}")
    return population.user_dir(users[partition].user_id), partition


def _persona_index(user: UserData, info: ConfigRecord) -> int:
    names = list(info["persona-names"])
    return names.index(user.profile.persona) if user.profile.persona in names else -1


def _load_levels(runtime: Runtime, content: RecordDict, persona_index: int,
                 store: DeviceStore) -> None:
    """Received global (+ persona) tensors into their slots; the user adapter from disk."""
    model = runtime.model
    for level in ("global", "persona", "user"):
        load_level(model, level, runtime.initial[level])  # a clean slot, then overwrite
    load_level(model, "global", record_to_state(content[KEY_GLOBAL]))
    if persona_index >= 0 and KEY_PERSONA in content:
        load_level(model, "persona", record_to_state(content[KEY_PERSONA]))
    user_state = store.load_user_adapter()
    if user_state is not None:
        load_level(model, "user", user_state)


def _seed(cfg: RunConfig, server_round: int, user: UserData) -> int:
    digest = hashlib.sha256(f"{cfg.seed}:{server_round}:{user.profile.user_id}".encode())
    return int.from_bytes(digest.digest()[:8], "big") >> 1

