"""IFCA on the device: score the K discovered personas, pick one (privately)."""

from __future__ import annotations

import torch
from flwr.app import RecordDict

from shared.config import RunConfig
from shared.data.userdata import UserData
from shared.model.adapters import RELEASED_LEVELS, activate, load_level
from shared.model.lm import encode_records, per_record_loss
from shared.model.runtime import Runtime
from shared.personas import SELECTION_CLIP, noisy_argmin, selection_noise_std
from shared.privacy.accounting import HistoryEntry
from shared.protocol.records import record_to_state
from shared.protocol.wire import KEY_PERSONA


def choose_cluster(runtime: Runtime, clusters: list[dict], user: UserData, cfg: RunConfig,
                   generator: torch.Generator, *, private: bool) -> int:
    """IFCA's assignment step on the device: the persona with the lowest (noisy) loss.

    Scored on the first ``selection-records`` records (a fixed, data-independent
    choice of rows), per-record losses clipped (see :mod:`shared.personas`)."""
    m = min(cfg.selection_records, len(user.train))
    data = encode_records(user.train[:m], runtime.tokenizer, cfg.seq_len)
    losses = []
    with torch.no_grad():
        activate(runtime.model, RELEASED_LEVELS)
        for state in clusters:
            load_level(runtime.model, "persona", state)
            per_record = per_record_loss(runtime.model, data.select(torch.arange(m)))
            losses.append(float(per_record.clamp(0, SELECTION_CLIP).sum()) / cfg.selection_records)
    std = selection_noise_std(sigma=cfg.selection_noise, k=len(clusters), clip=SELECTION_CLIP,
                              m=cfg.selection_records) if private else 0.0
    return noisy_argmin(losses, noise_std=std, generator=generator)


def selection_entry(cfg: RunConfig, *, private: bool) -> HistoryEntry | None:
    """What :func:`choose_cluster` costs: one full-batch Gaussian at ``selection-noise``
    when private (its sensitivity is folded into :func:`selection_noise_std`), else
    nothing (the public random start, or a run without DP)."""
    return (cfg.selection_noise, 1.0, 1) if private else None


def cluster_states(content: RecordDict) -> list[dict]:
    """All K discovered persona adapters, when the server sent them (``persona-0``, ...)."""
    states = []
    while f"{KEY_PERSONA}-{len(states)}" in content:
        states.append(record_to_state(content[f"{KEY_PERSONA}-{len(states)}"]))
    return states
