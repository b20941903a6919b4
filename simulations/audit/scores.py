"""Score a finished audit run: the loss of every canary, candidate secret and natural
record under what the run released (the global adapter, and global + persona for
the persona of the record's user) and under the base model (the reference).

This is the attacker's view of the released adapters, plus the ground truth the
attacker lacks (which records were members). The scores go to
``RUN_DIR/audit/scores.json``; the attacks in :mod:`simulations.audit.attacks`
read only that file, so each check re-scores nothing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from client.serving.run_adapters import RunAdapters
from client.store import DeviceStore
from shared.data.federation import load_run_population, training_users
from shared.data.userdata import Record, load_user
from shared.util.atomic import write_json_atomic
from simulations.audit.canaries import canary_text, candidate_secrets
from simulations.audit.plant import AuditSetupError, load_holdout, load_plan
from simulations.run.evaluate import load_run_config

SCORES_FILE = "audit/scores.json"


def scores_path(run_dir: Path) -> Path:
    return Path(run_dir) / SCORES_FILE


def load_or_score(run_dir: Path, *, candidates: int = 1000,
                  progress: Callable[[str], None] = print) -> dict:
    """The run's scores, computed once (and again if asked for more candidates)."""
    path = scores_path(run_dir)
    if path.is_file():
        try:
            scores = json.loads(path.read_text())
            done = len(scores["candidates"]["base"])
        except (KeyError, TypeError, ValueError) as err:  # ValueError: JSON, UTF-8
            raise AuditSetupError(f"{path}: not a valid scores file ({type(err).__name__}: "
                                  f"{err}); delete it to score the run again") from None
        if done >= candidates:
            return scores
    scores = score_run(run_dir, candidates=candidates, progress=progress)
    write_json_atomic(path, scores, sort_keys=False)
    return scores


def score_run(run_dir: Path, *, candidates: int = 1000,
              progress: Callable[[str], None] = print) -> dict:
    started = time.monotonic()
    cfg = load_run_config(run_dir)
    population = load_run_population(cfg)
    plan = load_plan(population.root)
    holdout = load_holdout(population.root)
    ev = RunAdapters(run_dir, cfg)
    persona_of = {e.user_id: _persona(ev, population, e) for e in training_users(population, cfg)}
    canary_texts = {c.text for c in plan.canaries}

    items: list[dict] = []  # everything scored once per level: canaries, then records
    for canary in plan.canaries:
        items.append({"id": canary.canary_id, "kind": canary.kind, "copies": canary.copies,
                      "user": canary.user_id, "persona": persona_of.get(canary.user_id),
                      "text": canary.text})
    for user_id in persona_of:
        kept = [r for r in load_user(population.user_dir(user_id)).train
                if r.response not in canary_texts]
        for member, records in ((True, kept), (False, holdout.get(user_id, []))):
            items += [{"kind": "record", "member": member, "user": user_id,
                       "persona": persona_of[user_id], "record": r} for r in records]
    secrets = candidate_secrets(candidates, exclude=[c.secret for c in plan.canaries],
                                seed=plan.seed)
    candidate_records = [Record(canary_text(s)) for s in secrets]

    def losses(records: Sequence[Record], levels, persona: str | None) -> list[float]:
        ev.load(persona=persona)
        return ev.record_losses(ev.encode(records), levels).tolist()

    def record_of(item: dict) -> Record:
        return item.get("record") or Record(item["text"])

    progress(f"scoring {len(items)} canaries and records, {candidates} candidates: base, "
             f"global")
    out_candidates = {}
    for level, levels in (("base", ()), ("global", ("global",))):
        values = losses([record_of(i) for i in items], levels, None)
        for item, value in zip(items, values):
            item[level] = value
        out_candidates[level] = losses(candidate_records, levels, None)
    for persona in sorted({p for p in persona_of.values() if p}):
        progress(f"scoring under global + persona {persona}")
        members = [i for i in items if i["persona"] == persona]
        values = losses([record_of(i) for i in members], ("global", "persona"), persona)
        for item, value in zip(members, values):
            item["global+persona"] = value
        out_candidates[f"global+persona:{persona}"] = losses(candidate_records,
                                                             ("global", "persona"), persona)
    for item in items:  # a user without a persona is served global only
        item.setdefault("global+persona", item["global"])
        item.pop("record", None)
        item.pop("text", None)
    return {"run_dir": str(run_dir), "dp": cfg.dp, "config": cfg.to_flower(),
            "candidates": out_candidates, "canaries": [i for i in items if i["kind"] != "record"],
            "records": [i for i in items if i["kind"] == "record"],
            "seconds": round(time.monotonic() - started, 1)}


def _persona(ev: RunAdapters, population, entry) -> str | None:
    if ev.cfg.discovered_k:
        cluster = DeviceStore.simulated(ev.cfg, entry.user_id, population.user_dir(
            entry.user_id)).load_state().get("cluster", -1)
        return f"cluster-{cluster}" if cluster >= 0 else None
    return entry.persona if entry.persona in ev.persona_states else None
