"""What a run directory holds, and whether a run may start or resume in it.

A run writes ``RUN/run.json`` before its first round: the settings it was started
with and a digest of its population. A later start on the same directory resumes
it only when nothing that shaped the run so far would change: a resume may change
the settings in :data:`RESUMABLE` (more rounds, where the run and its population
live, how long a round waits, what is measured), and nothing else. A directory
that holds anything but a run is refused, so a run never writes its report over
someone's files.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from server.checkpoint import checkpoint_round
from shared.config import ConfigError, RunConfig
from shared.model.base import cache_root
from shared.util.atomic import write_json_atomic

RUN_RECORD = "run.json"
FORMAT = "fedpersona-run-1"
# Settings a resume may change, and why it is safe: none changes what the rounds so
# far computed or what the devices were promised.
RESUMABLE = {
    "num-rounds": "more rounds continue the run (never fewer than it has done)",
    "round-timeout": "how long the server waits for a round's replies",
    "min-clients": "how many clients the server waits for before round 1",
    "run-dir": "where the run lives: a moved or copied run resumes",
    "data-dir": "where the population lives, if it is the same population",
    "device": "where the model runs (cpu, cuda)",
    "eval-max-records": "how many test records the evaluation reads",
}
# What a directory may hold before a run starts in it: nothing, or the console's log
# (written before the run starts).
HARMLESS = frozenset({"run.log"})


class RunDirError(ConfigError):
    """A run directory that a run may not start or resume in."""


def population_digest(data_dir: Path | None) -> str | None:
    """SHA-256 of the population's manifest (its users, roles, personas and counts)."""
    if data_dir is None or not (Path(data_dir) / "population.json").is_file():
        return None
    return hashlib.sha256((Path(data_dir) / "population.json").read_bytes()).hexdigest()


def record_of(cfg: RunConfig, data_dir: Path | None) -> dict[str, Any]:
    return {"format": FORMAT, "config": cfg.to_flower(),
            "population_sha256": population_digest(data_dir),
            "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}


def read_record(run_dir: Path) -> dict[str, Any] | None:
    """The run's record; for a run made before records were written, its report's
    settings; ``None`` for a directory that holds no run."""
    path = Path(run_dir) / RUN_RECORD
    if path.is_file():
        try:
            record = json.loads(path.read_text())
            if record.get("format") != FORMAT or not isinstance(record.get("config"), dict):
                raise ValueError("not a fedpersona run record")
        except (ValueError, AttributeError) as err:
            raise RunDirError(f"{path}: unreadable run record ({err})") from None
        return record
    report = Path(run_dir) / "report.json"
    if report.is_file():
        try:
            config = json.loads(report.read_text())["config"]
        except (ValueError, KeyError, TypeError):
            return None
        return {"format": FORMAT, "config": config, "population_sha256": None}
    return None


def holds_run(run_dir: Path) -> bool:
    run_dir = Path(run_dir)
    return read_record(run_dir) is not None or (run_dir / "checkpoint" / "LATEST").is_file()


def resume_conflicts(saved: Mapping[str, Any], current: Mapping[str, Any], *,
                     done_rounds: int = 0, same_population: bool | None = None) -> list[str]:
    """Why a run started with ``saved`` settings cannot resume with ``current`` ones
    (both kebab-case mappings); empty when it can. Settings a version added since the
    run started count at their defaults."""
    before = RunConfig.from_mapping(saved).to_flower()
    after = RunConfig.from_mapping(current).to_flower()
    problems = [f"{key}={before[key]!r} -> {after[key]!r}" for key in sorted(before)
                if key not in RESUMABLE and before[key] != after[key]]
    if after["num-rounds"] < done_rounds:
        problems.append(f"num-rounds={after['num-rounds']} but the run has done "
                        f"{done_rounds} rounds")
    if same_population is False and before["data-dir"] != after["data-dir"]:
        problems.append(f"data-dir={after['data-dir']!r} holds another population than "
                        f"{before['data-dir']!r}")
    return problems


def check_run_dir(run_dir: Path, cfg: RunConfig, *,
                  data_dir: Path | None) -> dict[str, Any] | None:
    """The run's record if ``run_dir`` holds a run that ``cfg`` may resume (from the
    rounds its checkpoint has done), ``None`` if it is new (missing or empty);
    :class:`RunDirError` otherwise, naming every setting that would change."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: is a file, not a run directory")
    if run_dir.is_dir():
        require_writable(run_dir)
    record = read_record(run_dir) if run_dir.is_dir() else None
    if record is None:
        if run_dir.is_dir() and (run_dir / "checkpoint" / "LATEST").is_file():
            return {"format": FORMAT, "config": None}  # an older run: its settings unknown
        others = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
        others = [name for name in others if name not in HARMLESS]
        if others:
            raise RunDirError(f"{run_dir}: exists and is not a fedpersona run (it holds "
                              f"{', '.join(others[:3])}{', ...' if len(others) > 3 else ''});"
                              " choose a new directory")
        return None
    saved_population = record.get("population_sha256")
    now_population = population_digest(data_dir)
    same = None if saved_population is None or now_population is None else \
        saved_population == now_population
    problems = resume_conflicts(record["config"], cfg.to_flower(),
                                done_rounds=checkpoint_round(run_dir), same_population=same)
    if problems:
        raise RunDirError(f"{run_dir}: a resume may change only {', '.join(RESUMABLE)}; "
                          f"this one changes {'; '.join(problems)} (start a new directory "
                          "instead)")
    return record


def require_writable(run_dir: Path) -> None:
    """Refuse, before any work (and before any device spends), a run directory that its
    results could not be written into."""
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise RunDirError(f"{run_dir}: not writable; nothing was run")


def write_record(run_dir: Path, cfg: RunConfig, data_dir: Path | None) -> None:
    """Record a new run's settings (a resumed run keeps the record it started with)."""
    if not (Path(run_dir) / RUN_RECORD).is_file():
        write_json_atomic(Path(run_dir) / RUN_RECORD, record_of(cfg, data_dir),
                          sort_keys=False)


def new_run_dir() -> Path:
    """A fresh directory for a run given none, ``CACHE/runs/<date-time>``, with
    ``CACHE/runs/latest`` pointing at it: two runs never share one."""
    runs = cache_root() / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    for attempt in range(1000):
        path = runs / (stamp if not attempt else f"{stamp}-{attempt}")
        try:
            path.mkdir()
            break
        except FileExistsError:
            continue
    else:
        raise RunDirError(f"{runs}: no free run directory for {stamp}")
    latest = runs / "latest"
    if latest.is_symlink() or not latest.exists():  # a real directory of an older version stays
        link = runs / f".latest-{os.getpid()}"
        link.unlink(missing_ok=True)
        link.symlink_to(path.name)
        os.replace(link, latest)
    return path
