"""Shared builders for the unit tests: a tiny three-level model, records, a small
population on disk, and Flower messages built by hand (no SuperLink, no Grid)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from flwr.app import Context, Message, Metadata, RecordDict
from peft import PeftModel

from server.checkpoint import ServerState
from server.strategy import train_content
from shared.config import RunConfig
from shared.data.userdata import Population, Profile, Record, UserData, write_population
from shared.model.adapters import attach_levels, level_state, lora_config
from shared.model.base import load_base_model, tiny_tokenizer
from shared.model.runtime import get_runtime
from shared.privacy.secagg import error_bound, quantized_weight
from shared.protocol.wire import KEY_CONFIG, KEY_ROUND, round_record, run_config_record

TARGETS = ("q_proj", "v_proj")
RANK = 4
PERSONAS = ("a", "b")

# Records of clearly different lengths (and one with a prompt), so padding and the
# per-record token mean are exercised.
RECORDS = (
    Record("hello there"),
    Record("a much longer record with many more words in it than the others"),
    Record("bye now", prompt="say goodbye:"),
    Record("xyz abc def"),
)

_WORDS = [
    "the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "the", "king",
    "and", "queen", "speak", "of", "love", "war", "and", "fortune"]


def tiny_peft(seed: int = 0) -> PeftModel:
    """The tiny Llama with the three frozen LoRA levels attached (B = 0 everywhere)."""
    return attach_levels(load_base_model("tiny", seed=seed), tiny_lora(), seed=seed)


def tiny_lora():
    """The LoRA config of :func:`tiny_peft` (and of :func:`small_config` runs)."""
    return lora_config(rank=RANK, alpha=2.0 * RANK, targets=TARGETS, base_model_name="tiny")


def tokenizer():
    return tiny_tokenizer()


def randomize_level(model: PeftModel, level: str, *, scale: float, seed: int) -> dict:
    """A state for ``level`` with every tensor drawn at random (A and B)."""
    generator = torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn(v.shape, generator=generator)
            for k, v in level_state(model, level).items()}


def text_records(n: int, offset: int = 0) -> tuple[Record, ...]:
    """``n`` short text records of varying length (3 to 9 words)."""
    return tuple(Record(" ".join(_WORDS[(offset + i + j) % len(_WORDS)]
                                 for j in range(3 + (i % 7))))
                 for i in range(n))


SMALL_USERS = (("u1", "a"), ("u2", "b"), ("u3", "a"))


def write_small_population(root: Path, *, num_train: int = 20, num_test: int = 4,
                           users: Sequence[tuple[str, str]] = SMALL_USERS) -> Population:
    """Training users (``users``: id, persona). By default three: u1 and u3 in persona
    ``a``, u2 in ``b``."""
    written = []
    for index, (user_id, persona) in enumerate(users):
        train = text_records(num_train, offset=5 * index)
        test = text_records(num_test, offset=5 * index + 1)
        written.append(("train", UserData(Profile(user_id, persona), train, test)))
    return write_population(root, written, {"personas": list(PERSONAS)})


# The recipe before 2026-12-01 (before on-device calibration became the default): Adam on
# small Poisson batches at rate batch / records, a fixed noise multiplier, the train loss
# released at the same noise, RDP. Tests that pin exact ledger entries of that mechanism,
# or that need every device in every round, ask for it explicitly.
FIXED_NOISE = dict(planned_rounds=0, dp_sample_rate=0.0, loss_noise_multiplier=0.0,
                   accountant="rdp", local_optimizer="adam", learning_rate=0.02)


def small_config(tmp_path: Path, **changes) -> RunConfig:
    """A fast tiny-model run over :func:`write_small_population` at ``tmp_path / 'pop'``."""
    data_dir = tmp_path / "pop"
    if not data_dir.exists():
        write_small_population(data_dir)
    settings = dict(model="tiny", data_dir=str(data_dir), max_users=0, local_steps=2,
                    user_steps=1, batch_size=4, seq_len=32, run_dir=str(tmp_path / "run"),
                    device="cpu", lora_rank=RANK, lora_alpha=2.0 * RANK)
    settings.update(changes)
    return RunConfig(**settings)


def initial_server_state(cfg: RunConfig) -> ServerState:
    initial = get_runtime(cfg).initial
    return ServerState(round=0, global_state=dict(initial["global"]),
                       persona_states={p: dict(initial["persona"]) for p in PERSONAS})


def instruction(content: RecordDict, message_type: str, *, dst_node_id: int = 1,
                src_node_id: int = 0, message_id: str = "msg-1") -> Message:
    """A server -> client message with explicit metadata (what the SuperLink would stamp)."""
    metadata = Metadata(run_id=1, message_id=message_id, src_node_id=src_node_id,
                        dst_node_id=dst_node_id, reply_to_message_id="", group_id="",
                        created_at=time.time(), ttl=3600.0, message_type=message_type)
    return Message(content, metadata=metadata)


def round_message(cfg: RunConfig, state: ServerState, persona: str | None, message_type: str,
                  *, server_round: int = 1,
                  personas: Sequence[str] = PERSONAS) -> Message:
    """What the ServerApp sends a client: adapters, run config and round info."""
    content = train_content(state, persona, cfg.lora_scheme, cfg.transport_dtype)
    content[KEY_CONFIG] = run_config_record(cfg)
    content[KEY_ROUND] = round_record(server_round, tuple(personas))
    return instruction(content, message_type)


def node_context(partition_id: int = 0) -> Context:
    return Context(run_id=1, node_id=1, node_config={"partition-id": partition_id},
                   state=RecordDict(), run_config={})


def fit_persona(model: PeftModel, records, start: dict, *, steps: int = 10, lr: float = 0.1,
                seq_len: int = 24) -> dict:
    """Non-private Adam steps on the persona slot (B only) from ``start``; its new state."""
    from shared.model.adapters import activate, load_level
    from shared.model.lm import encode_records, per_record_loss

    load_level(model, "persona", start)
    data = encode_records(records, tokenizer(), seq_len)
    optimizer = torch.optim.Adam(activate(model, ("global", "persona"), train=("persona",),
                                          scheme="ffa"), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        per_record_loss(model, data.select(torch.arange(len(data)))).mean().backward()
        optimizer.step()
    activate(model, ("global", "persona"))
    return level_state(model, "persona")


def write_finished_run(tmp: Path, *, trained_personas=("a", "b"), untrained_personas=(),
                       report: dict | None = None):
    """A finished tiny run written by hand over :func:`small_config`'s population: random
    global and ``trained_personas`` adapters, ``untrained_personas`` at their initial
    (all-zero B) state, ``report.json`` (the config plus ``report``), and user u1's own
    adapter on its device. Returns ``(cfg, run_dir)``."""
    import json

    from shared.data.federation import load_run_population
    from shared.model.adapters import save_adapter

    cfg = small_config(tmp)
    runtime = get_runtime(cfg)
    run = tmp / "run"
    save_adapter(run / "adapters" / "global",
                 randomize_level(runtime.model, "global", scale=0.05, seed=1), tiny_lora())
    for seed, persona in enumerate(trained_personas, start=2):
        save_adapter(run / "adapters" / "persona" / persona,
                     randomize_level(runtime.model, "persona", scale=0.05, seed=seed),
                     tiny_lora())
    for persona in untrained_personas:
        save_adapter(run / "adapters" / "persona" / persona, runtime.initial["persona"],
                     tiny_lora())
    (run / "report.json").write_text(json.dumps({"config": cfg.to_flower(), **(report or {})}))
    sim_store(cfg, load_run_population(cfg).user_dir("u1")).save_user_adapter(
        randomize_level(runtime.model, "user", scale=0.05, seed=9), tiny_lora())
    return cfg, run


def sim_store(cfg: RunConfig, user_dir: Path):
    """The store of the simulated device serving ``user_dir`` (its name is the user id) in
    the run ``cfg``: where a simulation keeps that device's ledger and adapters."""
    from client.store import DeviceStore

    return DeviceStore.simulated(cfg, Path(user_dir).name, Path(user_dir))


def secagg_tolerance(cfg: RunConfig, vectors: int, examples: int, values: dict) -> float:
    """How far a SecAgg+ mean over ``vectors`` clients and ``examples`` records may lie
    from the plain mean: the quantization bound, plus float32 rounding of ``values``."""
    weight = quantized_weight(examples, max_weight=cfg.secagg_max_weight,
                              quantization_range=cfg.secagg_quantization_range)
    scale = max(float(v.abs().max()) for v in values.values())
    return error_bound(vectors, weight, clipping_range=cfg.secagg_clipping_range,
                       quantization_range=cfg.secagg_quantization_range) \
        + 4 * float(np.finfo(np.float32).eps) * scale
