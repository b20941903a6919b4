"""Server checkpoints: every adapter, the round counter, metrics and optimizer state.

Layout of a run directory::

    RUN_DIR/checkpoint/round-0003/     one complete snapshot per finished round
        global/                        peft format (adapter_config.json + safetensors)
        persona/<id>/
        optimizer.safetensors          FedAdam moments, when used
        state.json                     round, history, epsilons, persona names
    RUN_DIR/checkpoint/LATEST          name of the newest complete snapshot
    RUN_DIR/adapters/global/, adapters/persona/<id>/   the latest adapters, for users

A snapshot directory is written whole and renamed into place; only then is
``LATEST`` replaced (atomically). A server killed at any instant resumes from
the last snapshot that ``LATEST`` names, never from a half-written one.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from server.aggregation import CentralLedger, FedAdamState, State
from shared.model.adapters import load_adapter_state, save_adapter
from shared.util.atomic import replace_dir, write_text_atomic

KEEP_SNAPSHOTS = 2


class CheckpointError(ValueError):
    """A run's checkpoint is damaged: the run cannot resume from it."""


@dataclass
class ServerState:
    """Everything a resumed server needs; plain data."""

    round: int
    global_state: State
    persona_states: dict[str, State]
    optimizer: dict[str, FedAdamState] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    epsilon_per_user: dict[str, float] = field(default_factory=dict)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    assignments: dict[str, str] = field(default_factory=dict)  # user -> discovered persona
    central_dp: CentralLedger | None = None  # user-level DP plan and account (central-dp)


def save_checkpoint(run_dir: Path, state: ServerState, lora: LoraConfig) -> Path:
    root = Path(run_dir) / "checkpoint"
    root.mkdir(parents=True, exist_ok=True)
    name = f"round-{state.round:04d}"
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
    try:
        save_adapter(staging / "global", state.global_state, lora)
        for persona, persona_state in state.persona_states.items():
            save_adapter(staging / "persona" / persona, persona_state, lora)
        moments = {f"{level}|{kind}|{key}": tensor
                   for level, opt in state.optimizer.items()
                   for kind, part in (("m", opt.m), ("v", opt.v))
                   for key, tensor in part.items()}
        if moments:
            save_file({k: v.contiguous() for k, v in moments.items()},
                      str(staging / "optimizer.safetensors"))
        meta = {"round": state.round, "history": state.history,
                "epsilon_per_user": state.epsilon_per_user, "rejected": state.rejected,
                "assignments": state.assignments,
                "central_dp": state.central_dp.to_json() if state.central_dp else None,
                "personas": sorted(state.persona_states),
                "optimizer_levels": sorted(state.optimizer)}
        (staging / "state.json").write_text(json.dumps(meta, indent=1))
        replace_dir(staging, root / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    write_text_atomic(root / "LATEST", name + "\n")
    _publish_adapters(Path(run_dir), state, lora)
    _prune(root, keep=name)
    return root / name


def checkpoint_round(run_dir: Path) -> int:
    """The round of the run's last complete snapshot (0 without one), its adapters unread."""
    latest = Path(run_dir) / "checkpoint" / "LATEST"
    if not latest.is_file():
        return 0
    return _read_meta(Path(run_dir) / "checkpoint" / latest.read_text().strip()
                      / "state.json")["round"]


def load_checkpoint(run_dir: Path) -> ServerState | None:
    """The last complete snapshot, or ``None`` when the run has none."""
    root = Path(run_dir) / "checkpoint"
    latest = root / "LATEST"
    if not latest.is_file():
        return None
    snapshot = root / latest.read_text().strip()
    meta = _read_meta(snapshot / "state.json")
    optimizer: dict[str, FedAdamState] = {level: FedAdamState() for level in
                                          meta.get("optimizer_levels", [])}
    if (snapshot / "optimizer.safetensors").is_file():
        for key, tensor in load_file(str(snapshot / "optimizer.safetensors")).items():
            level, kind, name = key.split("|", 2)
            getattr(optimizer.setdefault(level, FedAdamState()), kind)[name] = tensor
    return ServerState(
        round=meta["round"],
        global_state=load_adapter_state(snapshot / "global"),
        persona_states={p: load_adapter_state(snapshot / "persona" / p)
                        for p in meta["personas"]},
        optimizer=optimizer, history=meta["history"],
        epsilon_per_user=meta["epsilon_per_user"], rejected=meta.get("rejected", []),
        assignments=meta.get("assignments", {}), central_dp=meta["central_dp"])


def _read_meta(path: Path) -> dict[str, Any]:
    """``state.json`` with ``round`` an int and ``central_dp`` a :class:`CentralLedger`
    (or None); :class:`CheckpointError` when it is damaged."""
    try:
        meta = json.loads(path.read_text())
        return {**meta, "round": int(meta["round"]), "central_dp": CentralLedger.from_json(
            meta["central_dp"]) if meta.get("central_dp") else None}
    except (AttributeError, KeyError, TypeError, ValueError) as err:  # ValueError: JSON,
        # UTF-8, numbers; the others: a field missing or of the wrong kind
        raise CheckpointError(f"{path}: damaged checkpoint ({type(err).__name__}: {err}); "
                              "start the run again in a new run-dir") from None


def _publish_adapters(run_dir: Path, state: ServerState, lora: LoraConfig) -> None:
    save_adapter(run_dir / "adapters" / "global", state.global_state, lora)
    for persona, persona_state in state.persona_states.items():
        save_adapter(run_dir / "adapters" / "persona" / persona, persona_state, lora)


def _prune(root: Path, keep: str) -> None:
    snapshots = sorted(p for p in root.glob("round-*") if p.is_dir())
    for old in snapshots[:-KEEP_SNAPSHOTS]:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)


def states_equal(a: State, b: State) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
