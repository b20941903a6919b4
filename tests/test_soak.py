"""The soak's own parts (simulations/deploy/soak.py) without a deployment: its plan's
limits and the checks it runs on what a deployment left. The soak itself is
``make soak``, not a test."""

from __future__ import annotations

import json

import pytest

from simulations.deploy.command import DeployError
from simulations.deploy.soak import SoakPlan, _whole_files, render, run_soak


@pytest.mark.parametrize(("change", "message"), [
    ({"nodes": 2}, "--nodes 2: at least 3"),
    ({"rounds": 2}, "--rounds 2: at least 3"),
    ({"max_minutes": 0}, "--max-minutes 0"),
])
def test_a_plan_it_cannot_carry_out_is_refused(change, message):
    with pytest.raises(DeployError, match=message):
        SoakPlan(**change)


def test_a_soak_starts_only_in_a_new_directory(tmp_path):
    (tmp_path / "something").write_text("kept")

    with pytest.raises(FileExistsError, match="not empty"):
        run_soak(tmp_path, SoakPlan())
    assert (tmp_path / "something").read_text() == "kept"


def test_a_torn_file_fails_and_a_kill_s_temporary_file_is_listed(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoint").mkdir(parents=True)
    (run / "report.json").write_text(json.dumps({"rounds": []}))
    (run / ".report.json.tmp-abc").write_text('{"rou')  # a kill inside an atomic write
    whole = _whole_files([run])
    assert whole["passed"] and "1 temporary files" in whole["detail"]

    (run / "report.json").write_text('{"rounds": [')  # torn where a reader looks
    torn = _whole_files([run])
    assert not torn["passed"] and "report.json" in torn["detail"]
    (run / "report.json").write_text("{}")
    (run / "wire.jsonl").write_text('{"a": 1}\n{"b": \n')
    assert "1 unreadable lines" in _whole_files([run])["detail"]


def test_the_summary_names_what_was_injected_and_each_check():
    result = {"plan": SoakPlan().__dict__, "minutes": 10.6, "passed": False,
              "completed": True,
              "events": [{"t": 1.0, "event": "SuperNode killed", "detail": "u1"},
                         {"t": 2.0, "event": "population", "detail": "6 users"}],
              "checks": [{"check": "audit wire", "passed": False, "detail": "x"}]}
    text = render(result)
    assert "FAIL" in text.splitlines()[0] and "SuperNode killed" in text
    assert "population" not in text and "| audit wire | FAIL" in text
