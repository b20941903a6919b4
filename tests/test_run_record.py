"""What a run directory may hold, and which resumes are refused (server.run_record), and
the simulate command's explicit --resume."""

from __future__ import annotations

import json
import os
import stat

import pytest
from helpers import small_config

from server.run_record import (
    RESUMABLE,
    RUN_RECORD,
    RunDirError,
    check_run_dir,
    new_run_dir,
    read_record,
    resume_conflicts,
    write_record,
)
from shared.config import RunConfig
from simulations.cli import main

BASE = RunConfig(model="tiny", run_dir="/runs/a", data_dir="/pop", num_rounds=4).to_flower()


# -- which settings a resume may change (pure) ------------------------------------------------

def test_a_resume_may_add_rounds_and_move_but_change_nothing_that_trained():
    moved = {**BASE, "num-rounds": 9, "run-dir": "/elsewhere", "data-dir": "/pop2",
             "round-timeout": 5.0, "device": "cuda", "eval-max-records": 3}

    assert resume_conflicts(BASE, moved, done_rounds=4) == []
    assert resume_conflicts(BASE, {**BASE, "lora-rank": 4, "target-epsilon": 2.0}) == [
        "lora-rank=8 -> 4", "target-epsilon=8.0 -> 2.0"]
    assert resume_conflicts(BASE, {**BASE, "num-rounds": 2}, done_rounds=3) == [
        "num-rounds=2 but the run has done 3 rounds"]
    assert resume_conflicts(BASE, {**BASE, "data-dir": "/other"}, same_population=False) == [
        "data-dir='/other' holds another population than '/pop'"]
    assert set(RESUMABLE) <= set(BASE)  # the documented list names real settings


def test_a_setting_added_since_the_run_started_counts_at_its_default():
    older = {k: v for k, v in BASE.items() if k != "user-final-steps"}

    assert resume_conflicts(older, BASE) == []
    assert resume_conflicts(older, {**BASE, "user-final-steps": 99}) != []


# -- the directory ------------------------------------------------------------------------------

def _cfg(tmp_path, **changes) -> RunConfig:
    return small_config(tmp_path, run_dir=str(tmp_path / "run"), **changes)


def test_a_new_run_takes_a_missing_or_empty_directory_and_records_itself(tmp_path):
    cfg = _cfg(tmp_path)
    assert check_run_dir(tmp_path / "run", cfg, data_dir=tmp_path / "pop") is None
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.log").write_text("the console's log comes first")
    assert check_run_dir(tmp_path / "run", cfg, data_dir=tmp_path / "pop") is None

    write_record(tmp_path / "run", cfg, tmp_path / "pop")

    record = read_record(tmp_path / "run")
    assert record["config"] == cfg.to_flower() and len(record["population_sha256"]) == 64
    assert check_run_dir(tmp_path / "run", cfg.replace(num_rounds=9),
                         data_dir=tmp_path / "pop")["config"] == cfg.to_flower()


def test_a_directory_that_is_not_a_run_is_refused_and_left_alone(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "report.md").write_text("my notes")

    with pytest.raises(RunDirError, match="exists and is not a fedpersona run .it holds "
                                          "report.md.; choose a new directory"):
        check_run_dir(tmp_path / "run", _cfg(tmp_path), data_dir=tmp_path / "pop")
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirError, match="is a file"):
        check_run_dir(tmp_path / "file", _cfg(tmp_path), data_dir=None)
    assert (tmp_path / "run" / "report.md").read_text() == "my notes"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_directory_is_refused_before_any_work(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run").chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        with pytest.raises(RunDirError, match="not writable"):
            check_run_dir(tmp_path / "run", _cfg(tmp_path), data_dir=None)
    finally:
        (tmp_path / "run").chmod(stat.S_IRWXU)


def test_a_resume_that_changes_a_setting_is_refused_naming_it(tmp_path):
    cfg = _cfg(tmp_path)
    write_record(tmp_path / "run", cfg, tmp_path / "pop")

    with pytest.raises(RunDirError, match=r"this one changes lora-rank=4 -> 8 \(start a new"):
        check_run_dir(tmp_path / "run", cfg.replace(lora_rank=8), data_dir=tmp_path / "pop")
    import shutil

    shutil.copytree(tmp_path / "pop", tmp_path / "moved-pop")  # the same population, moved
    assert check_run_dir(tmp_path / "run", cfg.replace(data_dir=str(tmp_path / "moved-pop")),
                         data_dir=tmp_path / "moved-pop") is not None
    (tmp_path / "other-pop").mkdir()
    (tmp_path / "other-pop" / "population.json").write_text("{}")
    with pytest.raises(RunDirError, match="holds another population"):
        check_run_dir(tmp_path / "run", cfg.replace(data_dir=str(tmp_path / "other-pop")),
                      data_dir=tmp_path / "other-pop")


def test_a_run_made_before_run_records_is_checked_against_its_report(tmp_path):
    cfg = _cfg(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "report.json").write_text(json.dumps({"config": cfg.to_flower()}))

    assert check_run_dir(tmp_path / "run", cfg, data_dir=None) is not None
    with pytest.raises(RunDirError, match="seq-len=32 -> 64"):
        check_run_dir(tmp_path / "run", cfg.replace(seq_len=64), data_dir=None)


def test_runs_given_no_directory_get_their_own(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDPERSONA_CACHE", str(tmp_path / "cache"))

    first, second = new_run_dir(), new_run_dir()

    assert first != second and first.is_dir() and second.is_dir()
    assert (tmp_path / "cache" / "runs" / "latest").resolve() == second.resolve()


# -- the command ----------------------------------------------------------------------------------

def _settings(tmp_path) -> list[str]:
    small_config(tmp_path)  # writes the population
    return ["model=tiny", f"data-dir={tmp_path / 'pop'}", "seq-len=32", "lora-rank=4",
            "lora-alpha=8.0", "num-rounds=2"]


def test_simulate_refuses_a_directory_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "report.md").write_text("mine")

    code = main(["simulate", "--out", str(tmp_path / "notes"), *_settings(tmp_path)])

    assert code == 1
    assert "is not a fedpersona run" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "notes").iterdir()) == ["report.md"]


def test_simulate_resumes_only_when_asked_and_only_what_may_change(tmp_path, capsys):
    # Arrange: a run directory as a run leaves it (its record and its report)
    settings = _settings(tmp_path)
    cfg = RunConfig.from_mapping({**dict(s.split("=", 1) for s in settings),
                                  "run-dir": str((tmp_path / "run").resolve())})
    write_record(tmp_path / "run", cfg, tmp_path / "pop")
    (tmp_path / "run" / "report.json").write_text('{"finished": true}')
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}

    # Act
    again = main(["simulate", "--out", str(tmp_path / "run"), *settings])
    again_err = capsys.readouterr().err
    changed = main(["simulate", "--out", str(tmp_path / "run"), "--resume", *settings,
                    "lora-rank=8"])
    changed_err = capsys.readouterr().err
    nothing = main(["simulate", "--out", str(tmp_path / "new"), "--resume", *settings])
    nothing_err = capsys.readouterr().err

    # Assert: each refused in one line, and nothing in the run was touched
    assert again == changed == nothing == 1
    assert "holds a run (at round 0); add --resume to continue it" in again_err
    assert "this one changes lora-rank=4 -> 8" in changed_err
    assert "no run to resume" in nothing_err
    assert all(len(err.strip().splitlines()) == 1 for err in (again_err, changed_err, nothing_err))
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before
    assert not (tmp_path / "new").exists()
    assert RUN_RECORD in before
