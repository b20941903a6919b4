"""Who takes part: the population a run uses and the users its simulation trains.

Both the ServerApp and the simulated ClientApps call these, so a simulated
node's ``partition-id`` names the same user on both sides.
"""

from __future__ import annotations

import functools
import random
from pathlib import Path

from shared.config import RunConfig, expand_path
from shared.data.shakespeare import ensure_population, settings_from_config
from shared.data.userdata import (
    MANIFEST_FILE,
    ROLE_TRAIN,
    Population,
    PopulationEntry,
    load_population,
)
from shared.model.base import cache_root


def population_dir(cfg: RunConfig) -> Path:
    """``data-dir``, or the Shakespeare population for these settings (built once)."""
    if cfg.data_dir:
        return expand_path("data-dir", cfg.data_dir)
    return ensure_population(settings_from_config(cfg), cache_root() / "data")


def training_users(population: Population, cfg: RunConfig) -> tuple[PopulationEntry, ...]:
    """Up to ``max-users`` training users, round-robin over groups (seeded), sorted by id.

    Groups are genres where users have one (so ``personas = "play"`` and
    ``"genre"`` select the same users and can be compared), else personas.
    """
    pool = list(population.with_role(ROLE_TRAIN))
    if cfg.max_users == 0 or cfg.max_users >= len(pool):
        return tuple(sorted(pool, key=lambda u: u.user_id))
    rng = random.Random(cfg.seed)
    by_persona: dict[str, list[PopulationEntry]] = {}
    for entry in sorted(pool, key=lambda u: u.user_id):
        group = entry.attributes.get("genre", entry.persona) or ""
        by_persona.setdefault(group, []).append(entry)
    for members in by_persona.values():
        rng.shuffle(members)
    chosen: list[PopulationEntry] = []
    while len(chosen) < cfg.max_users:
        for persona in sorted(by_persona):
            if by_persona[persona] and len(chosen) < cfg.max_users:
                chosen.append(by_persona[persona].pop())
    return tuple(sorted(chosen, key=lambda u: u.user_id))


def load_run_population(cfg: RunConfig) -> Population:
    """The run's population, read once per manifest version: a simulated node's handler
    and each of its client mods ask for it with every message."""
    root = population_dir(cfg)
    try:
        stamp = (root / MANIFEST_FILE).stat().st_mtime_ns
    except OSError:
        return load_population(root)  # which names what is missing
    return _load_population_version(root, stamp)


@functools.lru_cache(maxsize=4)
def _load_population_version(root: Path, stamp: int) -> Population:
    return load_population(root)
