"""Write an audit population: the run's training users, with canaries planted in their
on-device data and a random half of their records held out as non-members.

Layout (a normal population, plus the ground truth the devices never read)::

    OUT/population.json, OUT/users/<user>/...    what the simulated devices train on
    OUT/audit/plan.json                          canaries, who got them, held-out indices
    OUT/audit/holdout.jsonl                      the held-out records, {"user_id", ...}
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, replace
from pathlib import Path

from shared.config import RunConfig
from shared.data.federation import load_run_population, training_users
from shared.data.userdata import (
    ROLE_TRAIN,
    Population,
    Record,
    load_user,
    parse_record,
    write_population,
)
from simulations.audit.canaries import AuditPlan, plan_audit

PLAN_FILE = "audit/plan.json"
HOLDOUT_FILE = "audit/holdout.jsonl"


class AuditSetupError(ValueError):
    """The audit cannot run as asked (no plan next to the run's data, etc.)."""


@dataclass(frozen=True)
class PlantSettings:
    one_run_canaries: int = 1000
    repeated_canaries: int = 8
    copies: int = 4
    holdout_fraction: float = 0.5


def plant(cfg: RunConfig, out: Path, settings: PlantSettings = PlantSettings(), *,
          force: bool = False) -> tuple[Population, AuditPlan]:
    """The audit population for ``cfg``'s training users (``cfg.data-dir`` or the
    default Shakespeare population)."""
    source = load_run_population(cfg)
    users = {e.user_id: load_user(source.user_dir(e.user_id))
             for e in training_users(source, cfg)}
    plan = plan_audit({u: len(d.train) for u, d in users.items()},
                      one_run=settings.one_run_canaries, repeated=settings.repeated_canaries,
                      copies=settings.copies, holdout_fraction=settings.holdout_fraction,
                      seed=cfg.seed)
    planted, holdout_lines = [], []
    for user_id, data in users.items():
        held = set(plan.holdout[user_id])
        kept = [r for i, r in enumerate(data.train) if i not in held]
        holdout_lines += [json.dumps({"user_id": user_id, **data.train[i].to_json()},
                                     ensure_ascii=False) for i in sorted(held)]
        kept += [Record(c.text) for c in plan.canaries if c.user_id == user_id
                 for _ in range(c.copies)]
        random.Random(f"{plan.seed}:{user_id}").shuffle(kept)  # order is irrelevant to
        # Poisson sampling, but a file that ends in canaries would give them away
        planted.append((ROLE_TRAIN, replace(data, train=tuple(kept))))
    meta = {**source.meta, "audit": {"source": str(source.root), **settings.__dict__}}
    extra = {PLAN_FILE: json.dumps(plan.to_json(), indent=1) + "\n",
             HOLDOUT_FILE: "".join(line + "\n" for line in holdout_lines)}
    population = write_population(out, planted, meta, force=force, extra_files=extra)
    return population, plan


def load_plan(population_root: Path) -> AuditPlan:
    path = Path(population_root) / PLAN_FILE
    if not path.is_file():
        raise AuditSetupError(f"{path}: missing; this run's data has no audit plan (train on a "
                              "population from 'fedpersona audit plant')")
    try:
        return AuditPlan.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (KeyError, TypeError, ValueError) as err:  # ValueError: JSON, UTF-8, numbers
        raise AuditSetupError(f"{path}: not a valid audit plan ({err})") from None


def load_holdout(population_root: Path) -> dict[str, list[Record]]:
    path = Path(population_root) / HOLDOUT_FILE
    out: dict[str, list[Record]] = {}
    for number, line in enumerate(path.read_bytes().splitlines(), 1):
        try:
            raw = json.loads(line)
        except ValueError as err:  # not UTF-8, not JSON
            raise AuditSetupError(f"{path}:{number}: malformed JSON ({err})") from None
        if not isinstance(raw, dict) or not isinstance(raw.get("user_id"), str):
            raise AuditSetupError(f"{path}:{number}: a held-out record needs a 'user_id'")
        out.setdefault(raw.pop("user_id"), []).append(parse_record(raw, f"{path}:{number}"))
    return out


def is_planted(population_root: Path) -> bool:
    return (Path(population_root) / PLAN_FILE).is_file()
