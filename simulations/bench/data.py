"""Model and data for the step benchmarks: the run's model and one user's real records."""

from __future__ import annotations

import torch

from shared.config import ConfigError, RunConfig
from shared.data.federation import load_run_population, training_users
from shared.data.userdata import load_user
from shared.model.adapters import RELEASED_LEVELS, load_level
from shared.model.lm import EncodedRecords, encode_records
from shared.model.runtime import Runtime, get_runtime


def bench_records(cfg: RunConfig) -> EncodedRecords:
    """The train records of the first training user with at least a batch of them."""
    population = load_run_population(cfg)
    runtime = get_runtime(cfg)
    for entry in training_users(population, cfg):
        records = load_user(population.user_dir(entry.user_id)).train
        if len(records) >= cfg.batch_size:
            return encode_records(records, runtime.tokenizer, cfg.seq_len)
    raise ConfigError(f"no training user has batch-size = {cfg.batch_size} records")


def fixed_batch(data: EncodedRecords, batch_size: int, seed: int = 0) -> EncodedRecords:
    """The same ``batch_size`` records for every variant (trimmed to the longest)."""
    index = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    return data.select(index[:batch_size])


def reset_released(runtime: Runtime) -> None:
    """Every variant starts from the same (initial) released adapters."""
    for level in RELEASED_LEVELS:
        load_level(runtime.model, level, runtime.initial[level])
