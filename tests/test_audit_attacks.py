"""The attacks over a scores file, on synthetic scores whose leakage is known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from simulations.audit.attacks import (
    canary_exposure,
    membership_inference,
    one_run_audit,
)
from simulations.audit.command import verdict_line


def _scores(*, leak: float, seed: int = 0, n_records: int = 200) -> dict:
    """Candidates ~ N(5, 0.3) under every level; included canaries and member records are
    ``leak`` lower under the release than under the base model."""
    rng = np.random.default_rng(seed)
    candidates = {key: list(rng.normal(5, 0.3, 500)) for key in
                  ("base", "global", "global+persona:p")}
    canaries = []
    for i in range(60):
        copies = (0, 1, 4)[i % 3]
        base = float(rng.normal(5, 0.3))
        drop = leak * min(copies, 2)
        canaries.append({"id": f"c{i}", "kind": "repeated" if copies == 4 else "one-run",
                         "copies": copies, "user": "u", "persona": "p", "base": base,
                         "global": base - drop / 2, "global+persona": base - drop})
    records = []
    for i in range(n_records):
        member = i % 2 == 0
        base = float(rng.normal(4, 0.5))
        drop = 0.2 + (leak if member else 0.0)
        records.append({"kind": "record", "member": member, "user": "u", "persona": "p",
                        "base": base, "global": base - drop / 2, "global+persona": base - drop})
    return {"candidates": candidates, "canaries": canaries, "records": records, "dp": False}


def test_exposure_separates_copies_only_when_the_release_leaks():
    leaky = canary_exposure(_scores(leak=1.5))["by_copies"]
    tight = canary_exposure(_scores(leak=0.0))["by_copies"]

    assert leaky["0"]["global+persona/mean_rank_exposure"] == pytest.approx(
        1 / math.log(2), abs=0.5)
    assert leaky["4"]["global+persona/mean_rank_exposure"] > 7  # near log2(501) = 8.97
    assert leaky["1"]["global+persona/mean_rank_exposure"] > 4
    assert leaky["4"]["global+persona/mean_fitted_exposure"] > \
        leaky["4"]["global+persona/mean_rank_exposure"]  # extrapolates past the sample
    for copies in ("0", "1", "4"):
        assert tight[copies]["global+persona/mean_rank_exposure"] < 2.5
    assert leaky["4"]["canaries"] == 20


def test_membership_inference_finds_members_only_when_they_leak():
    leaky = membership_inference(_scores(leak=1.0))["attacks"]
    tight = membership_inference(_scores(leak=0.0))["attacks"]

    assert leaky["reference/global+persona"]["auc"] > 0.95
    assert leaky["reference/global+persona"]["tpr@0.01fpr"] > 0.5
    assert abs(tight["reference/global+persona"]["auc"] - 0.5) < 0.1
    # the loss attack is blind to the per-record difficulty the reference removes
    assert leaky["loss/global+persona"]["auc"] < leaky["reference/global+persona"]["auc"]


def test_one_run_audit_bounds_a_leaky_release_and_fails_an_understated_epsilon():
    scores = _scores(leak=3.0, n_records=600)

    honest = one_run_audit(scores, accounted_epsilon=math.inf, delta=1e-5)
    understated = one_run_audit(scores, accounted_epsilon=0.5, delta=1e-5)

    assert honest["examples"] == 40 + 600  # one-run canaries (copies 0 or 1) + records
    assert honest["epsilon_lower_bound"] > 2.0 and honest["consistent"]
    assert not understated["consistent"]
    line = verdict_line("one-run", {**understated, "passed": understated["consistent"]})
    assert line.startswith("one-run: FAIL epsilon lower bound")


def test_one_run_audit_of_a_private_release_stays_near_zero():
    result = one_run_audit(_scores(leak=0.0, n_records=600), accounted_epsilon=1.0,
                           delta=1e-5)

    assert result["epsilon_lower_bound"] < 0.5 and result["consistent"]
    # k = 5 ... 200 on each side (500 would need 1,000 examples)
    assert [t["guesses"] for t in result["trials"]] == [10, 20, 40, 100, 200, 400]
