"""What travels in Flower messages: record names and the run configuration.

Server -> client: ``config`` (the run settings), ``round`` (round number, persona
names), ``global`` and ``persona`` (the adapters to start from).
Client -> server: ``global`` and ``persona`` (trained tensors; B only under FFA)
and ``metrics`` (numbers only: counts, losses, epsilon, the persona index).
"""

from __future__ import annotations

import functools
from typing import Any

from flwr.app import ConfigRecord

from shared.config import RunConfig

KEY_CONFIG = "config"
KEY_ROUND = "round"
KEY_GLOBAL = "global"
KEY_PERSONA = "persona"
KEY_METRICS = "metrics"
KEY_FINAL = "final-evaluation"  # in the round record of the run's last evaluation only

# Evaluation levels -> the adapters active for each ("base": none).
EVAL_LEVELS: dict[str, tuple[str, ...]] = {
    "base": (),
    "global": ("global",),
    "global+persona": ("global", "persona"),
    "global+persona+user": ("global", "persona", "user"),
}


# What a client may send back, per message type: these records and metric names
# only, every metric a scalar number. The wire audit holds replies to this list.
REPLY_ARRAYS: dict[str, tuple[str, ...]] = {"query": (), "train": (KEY_GLOBAL, KEY_PERSONA),
                                             "evaluate": ()}
STAT_NAMES = ("nll-sum", "correct", "tokens")
REPLY_METRICS: dict[str, frozenset[str]] = {
    "query": frozenset({"persona-index", "num-examples", "user-index"}),
    "train": frozenset({"num-examples", "user-index", "dp", "declined", "persona-index",
                        "epsilon", "steps", "train-loss", "selection-private",
                        "noise-multiplier"}),
    "evaluate": frozenset({"user-index", "persona-index", "num-examples", "user-checks",
                           "user-kept"} | {
        f"{level}/{stat}" for level in EVAL_LEVELS for stat in STAT_NAMES}),
}


def run_config_record(cfg: RunConfig) -> ConfigRecord:
    return ConfigRecord(cfg.to_flower())


def read_run_config(record: ConfigRecord) -> RunConfig:
    """The run settings a message carries, parsed and validated once per distinct record
    (the handler and each client mod read the same one)."""
    try:
        return _parse_settings(tuple(sorted(record.items())))
    except TypeError:  # an unhashable (list) value: from_mapping names it
        return RunConfig.from_mapping(dict(record))


@functools.lru_cache(maxsize=8)
def _parse_settings(items: tuple[tuple[str, Any], ...]) -> RunConfig:
    return RunConfig.from_mapping(dict(items))


def round_record(server_round: int, persona_names: tuple[str, ...], *,
                 final: bool = False) -> ConfigRecord:
    """The round's public facts; ``final`` marks the run's last evaluation, under whose
    levels each device fits its user adapter before serving (``user-final-steps``)."""
    record = ConfigRecord({"server-round": server_round, "persona-names": list(persona_names)})
    if final:  # absent otherwise, so every other message is unchanged
        record[KEY_FINAL] = True
    return record
