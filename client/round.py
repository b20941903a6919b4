"""One device round, start to finish: what a train or evaluate message asks of a device.

A train round runs in this order, and the order is the guarantee:

1. a resent instruction gets the reply already released (:mod:`client.replay`);
2. the budget (:mod:`client.budget`) chooses the round's noise from public inputs,
   or the device declines;
3. every private draw is seeded from the device's secret and the instruction;
4. the mechanisms run (the private persona choice, DP-SGD on the released levels,
   the noisy train loss), each returning its own accountant entry;
5. what ran is checked against what the budget planned and written to the ledger,
   before anything may leave;
6. the user adapter trains under the received levels, and the round is committed
   (replay, user adapter, ledger closed).

The handlers in :mod:`client.client_app` only decode a message, call here and wrap
the reply.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from client import breaks
from client.budget import RoundBudget, loss_noise, released_lr, round_mechanisms
from client.discovery import choose_cluster, cluster_states, selection_entry
from client.node import node_store, resolve_user
from client.replay import NOT_TRAINING_INPUTS, Replay, content_digest
from client.store import DeviceStore, device_secret
from client.trainer import (
    DPSettings,
    DPTrainingError,
    GradientCanaries,
    LocalResult,
    UserRound,
    private_mean_loss,
    sample_rate,
    train_released,
    train_user_checked,
)
from shared.config import RunConfig
from shared.data.userdata import UserData, load_user
from shared.model.adapters import RELEASED_LEVELS, activate, level_state, load_level
from shared.model.lm import encode_records, evaluate_stats
from shared.model.runtime import Runtime, get_runtime
from shared.privacy.accounting import PrivacyLedger, released_entries
from shared.protocol.records import record_to_state, state_to_record
from shared.protocol.wire import EVAL_LEVELS, KEY_FINAL, KEY_GLOBAL, KEY_METRICS, KEY_PERSONA

log = logging.getLogger("fedpersona.client")


@dataclass(frozen=True)
class Device:
    """The user a node serves, with its data, its store and the loaded model."""

    cfg: RunConfig
    runtime: Runtime | None  # None where the round needs no model (a query)
    user_dir: Path
    user_index: int
    user: UserData
    store: DeviceStore
    # the device owner's own cap on its lifetime epsilon (``--node-config
    # epsilon-budget=...``); every run's target can only tighten it
    epsilon_budget: float = math.inf

    @classmethod
    def open(cls, cfg: RunConfig, context, *, with_model: bool = True) -> Device:
        user_dir, user_index = resolve_user(context, cfg)
        breaks.refuse_on_real_device(cfg, simulated=user_index >= 0)
        runtime = get_runtime(cfg) if with_model else None
        return cls(cfg, runtime, user_dir, user_index, load_user(user_dir),
                   node_store(cfg, user_dir, user_index),
                   device_epsilon_budget(context.node_config))

    @property
    def target_epsilon(self) -> float:
        return min(self.cfg.target_epsilon, self.epsilon_budget)

    def persona_index(self, info: ConfigRecord) -> int:
        """The user's declared persona among the run's (public per the threat model), or -1."""
        names = list(info["persona-names"])
        persona = self.user.profile.persona
        return names.index(persona) if persona in names else -1

    def seed(self, server_round: int, *, secret: bytes = b"") -> int:
        """A per-round seed. With the device's ``secret`` it is private (DP noise); without
        it, public (the random cluster start, which anyone may know)."""
        return round_seed(self.cfg, self.user.profile.user_id, server_round, secret=secret)


def round_seed(cfg: RunConfig, user_id: str, server_round: int, *, secret: bytes = b"") -> int:
    digest = hashlib.sha256(secret + f"{cfg.seed}:{server_round}:{user_id}".encode())
    return int.from_bytes(digest.digest()[:8], "big") >> 1


def dp_generator(cfg: RunConfig, user_id: str, server_round: int, private_inputs: bytes
                 ) -> torch.Generator:
    """The generator of a round's private draws (Poisson batches, DP noise): seeded from
    the device's secret and the instruction (``private_inputs``); from public values
    only under the audits' ``public-seed`` break."""
    secret = b"" if breaks.seeds_from_public_values(cfg) else private_inputs
    return torch.Generator().manual_seed(round_seed(cfg, user_id, server_round, secret=secret))


def device_epsilon_budget(node_config) -> float:
    """The ``epsilon-budget`` a device's owner set in its node config (default: none)."""
    raw = node_config.get("epsilon-budget", math.inf)
    try:
        budget = float(raw)
    except (TypeError, ValueError):
        budget = math.nan
    if not budget > 0:
        raise ValueError(f"node config epsilon-budget={raw!r}: must be a positive number")
    return budget


def query_round(device: Device, info: ConfigRecord) -> RecordDict:
    """This user's persona index and example count."""
    metrics = {"persona-index": device.persona_index(info),
               "num-examples": len(device.user.train), "user-index": device.user_index}
    return RecordDict({KEY_METRICS: MetricRecord(metrics)})


def train_round(device: Device, content: RecordDict, info: ConfigRecord) -> RecordDict:
    """One training round (see the module's docstring for its order); the reply. The
    device's ledger is held from the replay check to the commit."""
    with device.store.ledger_lock():
        return _train_round(device, content, info)


def _train_round(device: Device, content: RecordDict, info: ConfigRecord) -> RecordDict:
    cfg, runtime, store, user = device.cfg, device.runtime, device.store, device.user
    server_round = int(info["server-round"])
    instruction = content_digest(content)
    released = store.replayed_reply(server_round, instruction, runtime.lora)
    if released is not None:
        return released
    ledger = store.load_ledger(target_epsilon=device.target_epsilon,
                               target_delta=cfg.target_delta, accountant=cfg.accountant)
    store.reopen_unreleased(ledger, server_round, instruction)
    data = encode_records(user.train, runtime.tokenizer, cfg.seq_len)
    clusters = cluster_states(content)
    persona_index = device.persona_index(info)
    metrics = {"num-examples": len(user.train), "user-index": device.user_index,
               "dp": int(cfg.dp), "declined": 0}
    rate = sample_rate(cfg.batch_size, len(data), cfg.dp_sample_rate)
    # The first discovery round assigns clusters at random (public randomness, like
    # k-means' random-partition start): it costs no privacy and lets the K clusters
    # see different data before anyone chooses by loss.
    random_start = bool(clusters) and server_round == cfg.discovery_warmup + 1
    private_choice = bool(clusters) and not random_start and cfg.dp and cfg.selection_noise > 0
    budget = round_budget(cfg, ledger, rate, private_choice, store.federation)
    if budget.entries is None or (budget.entries and not ledger.can_afford(*budget.entries)):
        # Declining is itself public; what it reveals is the budget, not the data.
        metrics.update({"declined": 1, "persona-index": persona_index,
                        "epsilon": ledger.epsilon})
        return RecordDict({KEY_METRICS: MetricRecord(metrics)})

    # Fresh draws for every distinct question: the same draws for two different
    # instructions would let their difference cancel the noise. (An identical question
    # was answered above by the replay.)
    inputs = content_digest(content, config_ignore=NOT_TRAINING_INPUTS)
    generator = dp_generator(cfg, user.profile.user_id, server_round,
                             device_secret(device.user_dir) + inputs.encode())
    load_levels(device, content, persona_index)
    selection = None
    if clusters:
        if random_start:
            persona_index = device.seed(-1) % len(clusters)
        else:
            persona_index = choose_cluster(runtime, clusters, user, cfg, generator,
                                           private=private_choice)
            selection = selection_entry(cfg, private=private_choice)
        load_level(runtime.model, "persona", clusters[persona_index])
        store.save_state({**store.load_state(), "cluster": persona_index})
        metrics["selection-private"] = int(private_choice or random_start)
    metrics["persona-index"] = persona_index
    levels = RELEASED_LEVELS if persona_index >= 0 else ("global",)
    result = released_step(cfg, runtime.model, data, budget, generator, levels)
    train_loss, loss_entry = private_mean_loss(
        runtime.model, data, rate=rate, generator=generator,
        dp=DPSettings(budget.dp.enabled, loss_noise(cfg, budget.noise_multiplier),
                      cfg.max_grad_norm))
    spent = breaks.claimed_entries(
        cfg, released_entries(result.accountant_entry, loss_entry, selection), rate)
    if spent != budget.entries:
        raise DPTrainingError(f"the round ran {spent} but its budget planned {budget.entries}: "
                              "refusing to release what was not accounted as planned")
    ledger.record(*spent, opening=(server_round, instruction), federation=store.federation)
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
    load_shared(device, content, persona_index, clusters)
    user_round = train_user_checked(
        runtime.model, data, holdout_fraction=cfg.user_holdout_fraction, steps=cfg.user_steps,
        batch_size=cfg.batch_size, lr=cfg.user_learning_rate, scheme=cfg.lora_scheme,
        generator=generator)
    user_state = level_state(runtime.model, "user") if cfg.user_steps else None
    # Only public or accounted numbers leave: the per-step losses were computed on raw
    # batches (and the user loss without DP), so they stay in the device's log; the
    # reported train loss is the noisy release accounted above.
    log.info("user %s round %s: DP-step loss %.4f, user loss %.4f%s", user.profile.user_id,
             server_round, result.train_loss, user_round.train_loss,
             f", held-out loss {user_round.holdout_before:.4f} -> "
             f"{user_round.holdout_after:.4f}, new user adapter "
             f"{'kept' if user_round.kept else 'discarded'}" if user_round.checked else "")
    metrics.update({"steps": result.steps, "train-loss": train_loss,
                    "epsilon": ledger.epsilon if cfg.dp else -1.0,
                    "noise-multiplier": budget.noise_multiplier})
    reply[KEY_METRICS] = MetricRecord(metrics)
    store.commit_round(Replay(server_round, instruction, reply, user_state),
                       runtime.lora)  # the replay, then the user adapter
    ledger.close()
    store.save_ledger(ledger)  # the reply is kept: from here it may leave
    # A tally for the device and a simulation's report, kept after the commit: a kill in
    # between loses one count, nothing else.
    tally_user_check(store, user_round)
    return reply


def round_budget(cfg: RunConfig, ledger: PrivacyLedger, rate: float, private_choice: bool,
                 federation: str = "") -> RoundBudget:
    """The round's budget at the rate the device claims: its true sampling rate, unless an
    audit's ``understated-rate`` break claims less."""
    return round_mechanisms(cfg, ledger, breaks.claimed_rate(cfg, rate), private_choice,
                            federation)


def released_step(cfg: RunConfig, model, data, budget: RoundBudget,
                  generator: torch.Generator, levels: tuple[str, ...],
                  gradient_canaries: GradientCanaries | None = None) -> LocalResult:
    """The round's DP-SGD on the released ``levels``, as ``budget`` planned it (with an
    audit's break acting where one is set). The server-view audit runs this same step,
    with its ``gradient_canaries``, so that it measures what devices run."""
    return train_released(model, data, steps=cfg.local_steps, batch_size=cfg.batch_size,
                          lr=released_lr(cfg, budget.noise_multiplier),
                          dp=breaks.acting_dp(cfg, budget.dp), scheme=cfg.lora_scheme,
                          generator=generator, levels=levels,
                          grad_sample_mode=cfg.grad_sample_mode,
                          optimizer=cfg.local_optimizer, fixed_rate=cfg.dp_sample_rate,
                          gradient_canaries=gradient_canaries,
                          user_adapter_active=breaks.user_adapter_active(cfg))


def evaluate_round(device: Device, content: RecordDict, info: ConfigRecord) -> RecordDict:
    """Per-user test metrics at each level: base, global, global+persona, +user.

    These are measurements for simulations: computed on raw test records, not DP."""
    cfg, runtime, store, user = device.cfg, device.runtime, device.store, device.user
    device_state = store.load_state()
    persona_index = device.persona_index(info)
    load_levels(device, content, persona_index)
    clusters = cluster_states(content)
    if clusters:  # discovered personas: the user's last choice, else its best fit now
        persona_index = device_state.get("cluster", -1)
        if not 0 <= persona_index < len(clusters):
            persona_index = choose_cluster(runtime, clusters, user, cfg, torch.Generator(),
                                           private=False)
        load_level(runtime.model, "persona", clusters[persona_index])
    if info.get(KEY_FINAL, False) and cfg.user_final_steps:
        # the training inputs only: two runs that differ in where they live fit alike
        fit_user_to_final(device, content_digest(content, config_ignore=NOT_TRAINING_INPUTS))
    records = user.test[:cfg.eval_max_records] if cfg.eval_max_records else user.test
    data = encode_records(records, runtime.tokenizer, cfg.seq_len)
    metrics: dict[str, float | int] = {"user-index": device.user_index,
                                        "persona-index": persona_index,
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
    return RecordDict({KEY_METRICS: MetricRecord(metrics)})


def load_levels(device: Device, content: RecordDict, persona_index: int) -> None:
    """Received global (+ persona) tensors into their slots; the user adapter from disk."""
    runtime = device.runtime
    for level in ("global", "persona", "user"):
        load_level(runtime.model, level, runtime.initial[level])  # a clean slot, then overwrite
    load_shared(device, content, persona_index, [])
    user_state = device.store.load_user_adapter()
    if user_state is not None:
        load_level(runtime.model, "user", user_state)


def load_shared(device: Device, content: RecordDict, persona_index: int,
                clusters: list[dict]) -> None:
    """The received global and the user's persona (a declared one, or the chosen of the
    discovered ``clusters``) into their slots."""
    model = device.runtime.model
    load_level(model, "global", record_to_state(content[KEY_GLOBAL]))
    if clusters and persona_index >= 0:
        load_level(model, "persona", clusters[persona_index])
    elif persona_index >= 0 and KEY_PERSONA in content:
        load_level(model, "persona", record_to_state(content[KEY_PERSONA]))


def fit_user_to_final(device: Device, levels_digest: str) -> None:
    """``user-final-steps`` on the user adapter under the final shared levels, now in
    their slots, with the held-out check; once per final instruction (a repeated final
    evaluation, e.g. of a resumed finished run, trains nothing more). Training rounds fit
    it under the levels of the rounds the device took part in, which the later rounds
    moved on from; here it is fitted to the levels it is served with. Nothing leaves."""
    cfg, runtime, store = device.cfg, device.runtime, device.store
    if store.load_state().get("user-fitted-to") == levels_digest:
        return
    data = encode_records(device.user.train, runtime.tokenizer, cfg.seq_len)
    generator = torch.Generator().manual_seed(
        device.seed(-2, secret=device_secret(device.user_dir) + levels_digest.encode()))
    fitted = train_user_checked(
        runtime.model, data, holdout_fraction=cfg.user_holdout_fraction,
        steps=cfg.user_final_steps, batch_size=cfg.batch_size, lr=cfg.user_learning_rate,
        scheme=cfg.lora_scheme, generator=generator)
    store.save_user_adapter(level_state(runtime.model, "user"), runtime.lora)
    # after the adapter: a kill in between fits it once more on the retry, nothing worse.
    # Not in the per-round check tally: this is no training round.
    store.save_state({**store.load_state(), "user-fitted-to": levels_digest,
                      "user-final-kept": int(fitted.kept)})


def tally_user_check(store: DeviceStore, check: UserRound) -> None:
    """Count a training round's held-out check of a new user adapter (and whether it was
    kept) in the device's state."""
    if check.checked:
        tally = store.load_state()
        store.save_state({**tally, "user-checks": int(tally.get("user-checks", 0)) + 1,
                          "user-kept": int(tally.get("user-kept", 0)) + check.kept})
