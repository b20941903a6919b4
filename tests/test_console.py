"""The console of ``fedpersona simulate``: our lines on the console (the population, a line
per round with an estimate of what remains, the tables), the libraries' output in the
run's run.log, and -v to see it all."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import write_small_population

ROOT = Path(__file__).resolve().parents[1]
NOISE = ("Loading weights", "DEPRECATED FEATURE", "FutureWarning", "ClientAppActor")


def _simulate(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    write_small_population(tmp_path / "pop")
    env = {**os.environ, "FEDPERSONA_CACHE": str(tmp_path / "cache")}
    return subprocess.run(
        [sys.executable, "-m", "simulations.cli", "simulate", "--out", str(tmp_path / "run"),
         *extra, "model=tiny", f"data-dir={tmp_path / 'pop'}", "max-users=0", "num-rounds=2",
         "clients-per-round=2", "local-steps=1", "user-steps=1", "user-final-steps=1",
         "batch-size=4", "seq-len=16", "lora-rank=4", "lora-alpha=8", "device=cpu",
         "round-eval-users=0", "eval-max-records=2"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.integration
def test_simulate_shows_our_lines_and_logs_the_libraries(tmp_path):
    done = _simulate(tmp_path)

    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    lines = out.splitlines()
    assert lines[0].startswith("fedpersona simulate: run dir") and "run.log" in lines[0]
    assert any(line.startswith("population: 3 training users") for line in lines)
    rounds = [line for line in lines if line.startswith("round ")]
    assert [line.split(":")[0] for line in rounds] == ["round 1/2", "round 2/2"]
    assert "left" in rounds[0] and "left" not in rounds[1]  # an estimate while some remain
    assert "global+persona+user" in out and "epsilon max" in out
    assert not [word for word in NOISE if word in out + done.stderr], out + done.stderr
    log = (tmp_path / "run" / "run.log").read_text()
    assert "round 1/2" in log  # our lines are in the log too, among the libraries'
    assert any(word in log for word in NOISE)


@pytest.mark.integration
def test_verbose_shows_the_libraries_on_the_console(tmp_path):
    done = _simulate(tmp_path, "-v")

    assert done.returncode == 0, done.stderr[-3000:]
    assert any(word in done.stdout + done.stderr for word in NOISE)
    assert not (tmp_path / "run" / "run.log").exists()
