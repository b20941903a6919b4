"""Planning canaries and the membership split, and planting them on disk."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from helpers import small_config

from shared.config import ConfigError
from shared.data.userdata import load_population, load_user
from simulations.audit.canaries import (
    CANARY_PREFIX,
    AuditPlan,
    candidate_secrets,
    plan_audit,
)
from simulations.audit.plant import PlantSettings, load_holdout, load_plan, plant


def _plan(**changes):
    settings = dict(one_run=200, repeated=6, copies=3, holdout_fraction=0.5, seed=7)
    settings.update(changes)
    return plan_audit({"u1": 40, "u2": 60, "u3": 30}, **settings)


def test_plan_is_reproducible_and_secrets_are_distinct_and_well_formed():
    plan = _plan()
    assert plan == _plan()
    assert plan != _plan(seed=8)
    secrets = [c.secret for c in plan.canaries]
    assert len(set(secrets)) == len(secrets) == 206
    assert all(len(s.split()) == 6 and all(d.isdigit() for d in s.split()) for s in secrets)
    assert all(c.text == f"{CANARY_PREFIX} {c.secret}" for c in plan.canaries)
    assert AuditPlan.from_json(json.loads(json.dumps(plan.to_json()))) == plan


def test_one_run_canaries_are_included_about_half_the_time_repeated_always():
    plan = _plan(one_run=1000)
    included = sum(c.included for c in plan.of_kind("one-run"))
    assert 430 <= included <= 570  # Binomial(1000, 1/2): 4.4 sigma either side
    assert {c.copies for c in plan.of_kind("one-run")} == {0, 1}
    assert {c.copies for c in plan.of_kind("repeated")} == {3}
    assert set(Counter(c.user_id for c in plan.canaries)) == {"u1", "u2", "u3"}


def test_holdout_is_an_independent_coin_per_record():
    plan = _plan(holdout_fraction=0.5)
    held = sum(len(v) for v in plan.holdout.values())
    assert 35 <= held <= 95  # Binomial(130, 1/2)
    assert all(0 <= i < {"u1": 40, "u2": 60, "u3": 30}[u] for u, v in plan.holdout.items()
               for i in v)
    assert all(len(v) == 0 for v in _plan(holdout_fraction=0.0).holdout.values())


def test_bad_plans_are_refused():
    with pytest.raises(ConfigError, match="at least one user"):
        plan_audit({}, one_run=1, repeated=0, copies=1, holdout_fraction=0.5, seed=0)
    with pytest.raises(ConfigError, match="holdout fraction"):
        _plan(holdout_fraction=1.0)
    with pytest.raises(ConfigError, match="copies"):
        _plan(copies=0)


def test_candidates_never_include_a_planted_secret():
    plan = _plan()
    planted = [c.secret for c in plan.canaries]
    candidates = candidate_secrets(3000, exclude=planted, seed=plan.seed)
    assert len(set(candidates)) == 3000 and not set(candidates) & set(planted)


def test_plant_writes_canaries_and_holds_out_records(tmp_path):
    cfg = small_config(tmp_path)
    original = {u: load_user(tmp_path / "pop" / "users" / u).train for u in ("u1", "u2", "u3")}

    population, plan = plant(cfg, tmp_path / "audit-pop",
                             PlantSettings(one_run_canaries=30, repeated_canaries=2, copies=4))

    assert load_plan(population.root) == plan
    holdout = load_holdout(population.root)
    for user_id, before in original.items():
        after = [r.response for r in load_user(population.user_dir(user_id)).train]
        expected_canaries = Counter({c.text: c.copies for c in plan.canaries
                                     if c.user_id == user_id and c.copies})
        assert Counter(t for t in after if t.startswith(CANARY_PREFIX)) == expected_canaries
        kept = [r.response for i, r in enumerate(before) if i not in plan.holdout[user_id]]
        assert sorted(t for t in after if not t.startswith(CANARY_PREFIX)) == sorted(kept)
        assert [r.response for r in holdout.get(user_id, [])] == [
            before[i].response for i in plan.holdout[user_id]]
    # the source population is untouched and planting again needs --force
    assert load_user(tmp_path / "pop" / "users" / "u1").train == original["u1"]
    with pytest.raises(FileExistsError):
        plant(cfg, tmp_path / "audit-pop")
    assert load_population(tmp_path / "audit-pop").meta["audit"]["one_run_canaries"] == 30
