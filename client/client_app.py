"""The ClientApp: translate Flower messages to on-device calls and back.

Which user a node serves: ``--node-config user-dir=...`` on a real SuperNode;
in a simulation, ``partition-id`` indexes the run's training users.
"""

from __future__ import annotations

import hashlib
import logging

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.budget import loss_noise, released_lr, round_mechanisms
from client.discovery import choose_cluster, cluster_states
from client.faults import inject_faults
from client.node import resolve_user
from client.replay import NOT_TRAINING_INPUTS, Replay, content_digest
from client.secagg import secagg_mod
from client.store import DeviceStore, device_secret
from client.trainer import (
    DPSettings,
    UserRound,
    private_mean_loss,
    sample_rate,
    train_released,
    train_user_checked,
)
from client.wire_log import record_wire
from shared.adapters import RELEASED_LEVELS, activate, level_state, load_level
from shared.config import RunConfig
from shared.lm import encode_records, evaluate_stats
from shared.records import record_to_state, state_to_record
from shared.runtime import Runtime, get_runtime
from shared.userdata import UserData, load_user
from shared.wire import (
    EVAL_LEVELS,
    KEY_CONFIG,
    KEY_FINAL,
    KEY_GLOBAL,
    KEY_METRICS,
    KEY_PERSONA,
    KEY_ROUND,
    read_run_config,
)

log = logging.getLogger("fedpersona.client")


def query(msg: Message, context: Context) -> Message:
    """Report this user's persona index (public per the threat model) and example count."""
    cfg, info = _setup(msg)
    user_dir, user_index = resolve_user(context, cfg)
    user = load_user(user_dir)
    metrics = {"persona-index": _persona_index(user, info), "num-examples": len(user.train),
               "user-index": user_index}
    return Message(RecordDict({KEY_METRICS: MetricRecord(metrics)}), reply_to=msg)


def train(msg: Message, context: Context) -> Message:
    cfg, info = _setup(msg)
    runtime = get_runtime(cfg)
    user_dir, user_index = resolve_user(context, cfg)
    user = load_user(user_dir)
    store = DeviceStore(user_dir, cfg.federation_key)
    # A round resent with identical content (a resumed server) gets the reply already
    # released and accounted, byte for byte: no training, no new spend (client/replay.py).
    instruction = content_digest(msg.content)
    released = store.replayed_reply(int(info["server-round"]), instruction, runtime.lora)
    if released is not None:
        return Message(released, reply_to=msg)
    ledger = store.load_ledger(target_epsilon=cfg.target_epsilon, target_delta=cfg.target_delta,
                               accountant=cfg.accountant)
    store.reopen_unreleased(ledger, int(info["server-round"]), instruction)
    data = encode_records(user.train, runtime.tokenizer, cfg.seq_len)
    clusters = cluster_states(msg.content)
    persona_index = _persona_index(user, info)
    metrics = {"num-examples": len(user.train), "user-index": user_index, "dp": int(cfg.dp),
               "declined": 0}
    rate = sample_rate(cfg.batch_size, len(data), cfg.dp_sample_rate)
    # The first discovery round assigns clusters at random (public randomness, like
    # k-means' random-partition start): it costs no privacy and lets the K clusters
    # see different data before anyone chooses by loss.
    random_start = bool(clusters) and int(info["server-round"]) == cfg.discovery_warmup + 1
    private_choice = bool(clusters) and not random_start and cfg.dp and cfg.selection_noise > 0
    budget = round_mechanisms(cfg, ledger, rate, private_choice)
    dp, entries = budget.dp, budget.entries
    if entries is None or (entries and not ledger.can_afford(*entries)):
        # Declining is itself public; what it reveals is the budget, not the data.
        metrics.update({"declined": 1, "persona-index": persona_index,
                        "epsilon": ledger.epsilon})
        return Message(RecordDict({KEY_METRICS: MetricRecord(metrics)}), reply_to=msg)

    # Fresh draws for every distinct question: the same draws for two different
    # instructions would let their difference cancel the noise. (An identical question
    # was answered above by the replay.)
    inputs = content_digest(msg.content, config_ignore=NOT_TRAINING_INPUTS)
    generator = torch.Generator().manual_seed(_seed(
        cfg, int(info["server-round"]), user, secret=device_secret(user_dir) + inputs.encode()))
    _load_levels(runtime, msg.content, persona_index, store)
    if clusters:
        persona_index = (_seed(cfg, -1, user) % len(clusters) if random_start else
                         choose_cluster(runtime, clusters, user, cfg, generator,
                                        private=private_choice))
        load_level(runtime.model, "persona", clusters[persona_index])
        store.save_state({**store.load_state(), "cluster": persona_index})
        metrics["selection-private"] = int(private_choice or random_start)
    metrics["persona-index"] = persona_index
    levels = RELEASED_LEVELS if persona_index >= 0 else ("global",)
    result = train_released(runtime.model, data, steps=cfg.local_steps,
                            batch_size=cfg.batch_size,
                            lr=released_lr(cfg, budget.noise_multiplier), dp=dp,
                            scheme=cfg.lora_scheme, generator=generator, levels=levels,
                            grad_sample_mode=cfg.grad_sample_mode,
                            optimizer=cfg.local_optimizer, fixed_rate=cfg.dp_sample_rate)
    train_loss, _ = private_mean_loss(
        runtime.model, data, rate=rate, generator=generator,
        dp=DPSettings(dp.enabled, loss_noise(cfg, budget.noise_multiplier), cfg.max_grad_norm))
    ledger.record(*entries, opening=(int(info["server-round"]), instruction))
    store.save_ledger(ledger)  # spent before anything leaves the device

    reply = RecordDict({KEY_GLOBAL: state_to_record(
        level_state(runtime.model, "global", scheme=cfg.lora_scheme), cfg.transport_dtype)})
    if persona_index >= 0:
        reply[KEY_PERSONA] = state_to_record(
            level_state(runtime.model, "persona", scheme=cfg.lora_scheme),
            cfg.transport_dtype)
    # The user adapter is fitted under the levels as received, not under this device's
    # own noisy step (which no one else will ever serve it with): it is served on top of
    # the aggregate. The released reply above is final, so this changes nothing in it.
    _load_shared(runtime, msg.content, persona_index, clusters)
    user_round = train_user_checked(
        runtime.model, data, holdout_fraction=cfg.user_holdout_fraction, steps=cfg.user_steps,
        batch_size=cfg.batch_size, lr=cfg.user_learning_rate, scheme=cfg.lora_scheme,
        generator=generator)
    user_state = level_state(runtime.model, "user") if cfg.user_steps else None
    # Only public or accounted numbers leave: the per-step losses were computed on raw
    # batches (and the user loss without DP), so they stay in the device's log; the
    # reported train loss is the noisy release accounted above.
    log.info("user %s round %s: DP-step loss %.4f, user loss %.4f%s", user.profile.user_id,
             info["server-round"], result.train_loss, user_round.train_loss,
             f", held-out loss {user_round.holdout_before:.4f} -> "
             f"{user_round.holdout_after:.4f}, new user adapter "
             f"{'kept' if user_round.kept else 'discarded'}" if user_round.checked else "")
    metrics.update({"steps": result.steps, "train-loss": train_loss,
                    "epsilon": ledger.epsilon if cfg.dp else -1.0,
                    "noise-multiplier": budget.noise_multiplier})
    reply[KEY_METRICS] = MetricRecord(metrics)
    store.commit_round(Replay(int(info["server-round"]), instruction, reply, user_state),
                       runtime.lora)  # the replay, then the user adapter
    ledger.close()
    store.save_ledger(ledger)  # the reply is kept: from here it may leave
    # A tally for the device and a simulation's report, kept after the commit: a kill in
    # between loses one count, nothing else.
    _tally_user_check(store, user_round)
    return Message(reply, reply_to=msg)


def evaluate(msg: Message, context: Context) -> Message:
    """Per-user test metrics at each level: base, global, global+persona, +user.

    These are measurements for simulations: computed on raw test records, not DP."""
    cfg, info = _setup(msg)
    runtime = get_runtime(cfg)
    user_dir, user_index = resolve_user(context, cfg)
    user = load_user(user_dir)
    store = DeviceStore(user_dir, cfg.federation_key)
    device_state = store.load_state()
    persona_index = _persona_index(user, info)
    _load_levels(runtime, msg.content, persona_index, store)
    clusters = cluster_states(msg.content)
    if clusters:  # discovered personas: the user's last choice, else its best fit now
        persona_index = device_state.get("cluster", -1)
        if not 0 <= persona_index < len(clusters):
            persona_index = choose_cluster(runtime, clusters, user, cfg, torch.Generator(),
                                           private=False)
        load_level(runtime.model, "persona", clusters[persona_index])
    if info.get(KEY_FINAL, False) and cfg.user_final_steps:
        # the training inputs only: two runs that differ in where they live fit alike
        _fit_user_to_final(runtime, cfg, user, user_dir, store, content_digest(
            msg.content, config_ignore=NOT_TRAINING_INPUTS))
    records = user.test[:cfg.eval_max_records] if cfg.eval_max_records else user.test
    data = encode_records(records, runtime.tokenizer, cfg.seq_len)
    metrics: dict[str, float | int] = {"user-index": user_index, "persona-index": persona_index,
                                        "num-examples": len(records),
                                        "user-checks": int(device_state.get("user-checks", 0)),
                                        "user-kept": int(device_state.get("user-kept", 0))}
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


def _persona_index(user: UserData, info: ConfigRecord) -> int:
    names = list(info["persona-names"])
    return names.index(user.profile.persona) if user.profile.persona in names else -1


def _load_levels(runtime: Runtime, content: RecordDict, persona_index: int,
                 store: DeviceStore) -> None:
    """Received global (+ persona) tensors into their slots; the user adapter from disk."""
    model = runtime.model
    for level in ("global", "persona", "user"):
        load_level(model, level, runtime.initial[level])  # a clean slot, then overwrite
    _load_shared(runtime, content, persona_index, [])
    user_state = store.load_user_adapter()
    if user_state is not None:
        load_level(model, "user", user_state)


def _load_shared(runtime: Runtime, content: RecordDict, persona_index: int,
                 clusters: list[dict]) -> None:
    """The received global and the user's persona (a declared one, or the chosen of the
    discovered ``clusters``) into their slots."""
    load_level(runtime.model, "global", record_to_state(content[KEY_GLOBAL]))
    if clusters and persona_index >= 0:
        load_level(runtime.model, "persona", clusters[persona_index])
    elif persona_index >= 0 and KEY_PERSONA in content:
        load_level(runtime.model, "persona", record_to_state(content[KEY_PERSONA]))


def _fit_user_to_final(runtime: Runtime, cfg: RunConfig, user: UserData, user_dir,
                       store: DeviceStore, levels_digest: str) -> None:
    """``user-final-steps`` on the user adapter under the final shared levels, now in
    their slots, with the held-out check; once per final instruction (a repeated final
    evaluation, e.g. of a resumed finished run, trains nothing more). Training rounds fit
    it under the levels of the rounds the device took part in, which the later rounds
    moved on from; here it is fitted to the levels it is served with. Nothing leaves."""
    if store.load_state().get("user-fitted-to") == levels_digest:
        return
    data = encode_records(user.train, runtime.tokenizer, cfg.seq_len)
    generator = torch.Generator().manual_seed(
        _seed(cfg, -2, user, secret=device_secret(user_dir) + levels_digest.encode()))
    fitted = train_user_checked(
        runtime.model, data, holdout_fraction=cfg.user_holdout_fraction,
        steps=cfg.user_final_steps, batch_size=cfg.batch_size, lr=cfg.user_learning_rate,
        scheme=cfg.lora_scheme, generator=generator)
    store.save_user_adapter(level_state(runtime.model, "user"), runtime.lora)
    # after the adapter: a kill in between fits it once more on the retry, nothing worse.
    # Not in the per-round check tally: this is no training round.
    store.save_state({**store.load_state(), "user-fitted-to": levels_digest,
                      "user-final-kept": int(fitted.kept)})


def _tally_user_check(store: DeviceStore, check: UserRound) -> None:
    """Count a training round's held-out check of a new user adapter (and whether it was
    kept) in the device's state."""
    if check.checked:
        tally = store.load_state()
        store.save_state({**tally, "user-checks": int(tally.get("user-checks", 0)) + 1,
                          "user-kept": int(tally.get("user-kept", 0)) + check.kept})


def _seed(cfg: RunConfig, server_round: int, user: UserData, *, secret: bytes = b"") -> int:
    """A per-round seed. With the device's ``secret`` it is private (DP noise); without it,
    public (the random cluster start, which anyone may know)."""
    digest = hashlib.sha256(secret + f"{cfg.seed}:{server_round}:{user.profile.user_id}".encode())
    return int.from_bytes(digest.digest()[:8], "big") >> 1


def make_client_app(*extra_mods) -> ClientApp:
    """The ClientApp. The wire log is the outermost mod: it records each reply exactly as
    it leaves; then Flower's SecAgg+ for ``secagg`` rounds (:mod:`client.secagg`), which
    masks what the handler (and ``extra_mods``, which tests use to misbehave on purpose)
    returns; then fault injection, a no-op unless a simulation sets ``fault-fraction``
    (:mod:`client.faults`: always installed, as the config only arrives with messages)."""
    client_app = ClientApp(mods=[record_wire, secagg_mod, inject_faults, *extra_mods])
    client_app.query()(query)
    client_app.train()(train)
    client_app.evaluate()(evaluate)
    return client_app


app = make_client_app()
