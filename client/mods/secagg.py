"""Client side of secure aggregation: Flower's own ``secaggplus_mod`` around our handler.

The server's SecAgg+ rounds (:mod:`server.secagg`) send four TRAIN messages per
round, each with Flower's ``secaggplus_configs`` record. :func:`secagg_mod` hands
those to :func:`flwr.client.mod.secaggplus_mod` (key agreement, Shamir shares,
masking: none of it is reimplemented here); any other message goes straight on.
In the masking stage Flower's mod calls the inner handler, expecting a FitRes-style
reply; :func:`_secagg_input` turns our train reply into one: the packed vector of
:mod:`shared.privacy.secagg` (changes from what the server sent, clipped here because the
server can no longer check them) and the example count as the weight. Flower's mod
then masks it and empties every array record: the adapters never leave in clear.

Flower's mod rounds the vector stochastically with numpy's global generator,
unseeded: the same vector would sum to a slightly different mean each time, so a
resumed run's next instruction (and with it every later DP draw) would differ from
an uninterrupted run's. :func:`secagg_mod` seeds that generator from the device
secret and the digest of the training inputs, as the DP draws are seeded
(:mod:`client.client_app`), and restores it afterwards: the server cannot predict
the rounding, and the same instruction gets the same quantized vector.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable

import numpy as np
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from client.budget import released_lr, slot_noise_std
from client.node import resolve_user
from client.replay import NOT_TRAINING_INPUTS, content_digest
from client.store import device_secret
from shared.config import RunConfig
from shared.privacy.secagg import clip_change, pack
from shared.protocol.records import record_to_state
from shared.protocol.wire import (
    KEY_CONFIG,
    KEY_GLOBAL,
    KEY_METRICS,
    KEY_PERSONA,
    KEY_ROUND,
    read_run_config,
)

log = logging.getLogger("fedpersona.secagg")


def secagg_mod(msg: Message, context: Context,
               call_next: Callable[[Message, Context], Message]) -> Message:
    """Run a SecAgg+ stage through Flower's mod; pass everything else through."""
    if (msg.metadata.message_type != MessageType.TRAIN
            or RECORD_KEY_CONFIGS not in msg.content.config_records):
        return call_next(msg, context)
    saved = np.random.get_state()  # the handler seeds it for Flower's rounding
    try:
        return secaggplus_mod(msg, context, _secagg_input(call_next))
    finally:
        np.random.set_state(saved)


def _secagg_input(call_next: Callable[[Message, Context], Message]
                  ) -> Callable[[Message, Context], Message]:
    def handler(msg: Message, context: Context) -> Message:
        reply = call_next(msg, context)
        if reply.has_error():  # Flower's mod turns this into an error reply: a dropout
            raise RuntimeError(f"training failed: {reply.error.reason}")
        cfg = read_run_config(msg.content[KEY_CONFIG])
        metrics = dict(reply.content.metric_records[KEY_METRICS])
        num_slots = len(list(msg.content[KEY_ROUND]["persona-names"]))
        vector, weight = secagg_input(
            msg.content, reply.content, metrics, cfg, num_slots,
            noise=np.random.default_rng(slot_noise_seed(msg, context, cfg)))
        np.random.seed(rounding_seed(msg, context, cfg))  # Flower quantizes after we return
        fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(vector), weight, metrics)
        return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)
    return handler


def rounding_seed(msg: Message, context: Context, cfg: RunConfig) -> np.ndarray:
    """256 bits for Flower's stochastic rounding: secret to the device, the same for the
    same training inputs (a resent round, or the same round of an uninterrupted run)."""
    return _private_seed(b"secagg-rounding:", msg, context, cfg)


def slot_noise_seed(msg: Message, context: Context, cfg: RunConfig) -> np.ndarray:
    """256 bits for the distributed-DP noise on the persona slots the device did not
    train: secret to the device (the server must not regenerate and subtract it)."""
    return _private_seed(b"secagg-slot-noise:", msg, context, cfg)


def _private_seed(purpose: bytes, msg: Message, context: Context, cfg: RunConfig) -> np.ndarray:
    inputs = content_digest(msg.content, config_ignore=NOT_TRAINING_INPUTS)
    secret = device_secret(resolve_user(context, cfg)[0])
    digest = hashlib.sha256(purpose + secret + inputs.encode()).digest()
    return np.frombuffer(digest, dtype=np.uint32)


def secagg_input(sent: RecordDict, reply: RecordDict, metrics: dict, cfg: RunConfig,
                 num_slots: int, noise: np.random.Generator | None = None
                 ) -> tuple[list[np.ndarray], int]:
    """The vector to mask and its weight (examples; 0 when the client declined).

    Under distributed DP every persona slot the client did not train gets its noise
    share from ``noise`` (:func:`client.budget.slot_noise_std`): a persona's sum then
    carries the noise of every surviving client, not only of its members."""
    sent_global = _numpy(sent.array_records[KEY_GLOBAL])
    zeros = {k: np.zeros_like(v) for k, v in sent_global.items()}
    if int(metrics.get("declined", 0)):
        return pack(zeros, None, -1, num_slots), 0  # adds nothing, weighs nothing
    weight = int(metrics["num-examples"])
    if not 0 < weight <= cfg.secagg_max_weight:
        raise ValueError(f"{weight} examples: secure aggregation weighs at most "
                         f"secagg-max-weight = {cfg.secagg_max_weight}")
    global_change = _change(reply.array_records[KEY_GLOBAL], sent_global, cfg, "global")
    slot, persona_change = -1, None
    if KEY_PERSONA in reply.array_records:
        slot = int(metrics["persona-index"])
        sent_persona = sent.array_records.get(KEY_PERSONA)
        if sent_persona is None:  # discovered personas: the client chose among K
            sent_persona = sent.array_records.get(f"{KEY_PERSONA}-{slot}")
        if sent_persona is None:
            raise ValueError(f"trained persona {slot}, but the server sent no such adapter")
        persona_change = _change(reply.array_records[KEY_PERSONA], _numpy(sent_persona), cfg,
                                 f"persona {slot}")
    vector = pack(global_change, persona_change, slot, num_slots)
    if cfg.distributed_dp:
        _add_slot_noise(vector, len(global_change), slot, cfg, metrics, noise)
    return vector, weight


# a client's noise share stays within the quantizer's range with this many std (per
# coordinate, the chance to exceed it is below 1e-15): clipping it would remove noise
NOISE_RANGE_STDS = 8.0


def _add_slot_noise(vector: list[np.ndarray], per_part: int, slot: int, cfg: RunConfig,
                    metrics: dict, noise: np.random.Generator | None) -> None:
    if noise is None:
        raise ValueError("distributed DP needs a private generator for the slot noise")
    sigma = float(metrics["noise-multiplier"])
    std = slot_noise_std(cfg, sigma, int(metrics["num-examples"]))
    # public values only: the largest signal (one SGD step of a clipped mean) plus the noise
    reach = released_lr(cfg, sigma) * cfg.max_grad_norm + NOISE_RANGE_STDS * std
    if reach > cfg.secagg_clipping_range:
        raise ValueError(f"distributed DP: a change may reach {reach:.3g} per coordinate, "
                         f"beyond secagg-clipping-range {cfg.secagg_clipping_range:g}, whose "
                         "clipping would remove noise; raise the range")
    for index in range(per_part, len(vector)):
        if (index // per_part) - 1 != slot:  # not the global part, not the trained slot
            vector[index] = vector[index] + noise.normal(
                0.0, std, vector[index].shape).astype(np.float32)


def _change(released, sent: dict[str, np.ndarray], cfg: RunConfig,
            what: str) -> dict[str, np.ndarray]:
    after = _numpy(released)
    if sorted(after) != sorted(sent):
        raise ValueError(f"{what} adapter: released tensors differ from those received")
    for k, received in sent.items():  # numpy would broadcast (1, r) over (n, r) silently
        if after[k].shape != received.shape:
            raise ValueError(f"{what} adapter: {k} has shape {list(after[k].shape)}, "
                             f"received {list(received.shape)}")
    change = {k: after[k] - sent[k] for k in sent}
    if not all(np.isfinite(v).all() for v in change.values()):
        raise ValueError(f"{what} adapter: NaN or Inf after training")
    out, clipped = clip_change(change, max_norm=cfg.max_update_norm,
                               clipping_range=cfg.secagg_clipping_range)
    if clipped:  # kept on the device: the fact that it clipped is about its data
        log.warning("%s adapter: change clipped to norm %s / range %s before masking", what,
                    cfg.max_update_norm or "-", cfg.secagg_clipping_range)
    return out


def _numpy(record) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record_to_state(record).items()}
