"""Which user a node serves.

On a real SuperNode: ``--node-config user-dir=...``. In a simulation:
``partition-id`` indexes the run's training users, the same list the server uses.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context

from client.store import DeviceStore
from shared.config import RunConfig
from shared.data.federation import load_run_population, training_users
from shared.data.userdata import load_profile


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


def node_store(cfg: RunConfig, user_dir: Path, user_index: int) -> DeviceStore:
    """Where this node keeps its ledger and state: with the run for a simulated device
    (``user_index >= 0``), on the device itself otherwise (:mod:`client.store`)."""
    if user_index >= 0:
        return DeviceStore.simulated(cfg, load_profile(user_dir).user_id, user_dir)
    return DeviceStore.on_device(user_dir, cfg.federation_key)
