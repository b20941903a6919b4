"""`flwr run . local`: the app runs under Flower's own CLI and local SuperLink."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from shared.data.shakespeare import ShakespeareSettings, write_shakespeare_population

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]


def _kill_local_superlinks(flwr_home: Path) -> None:
    """`flwr run` starts a local SuperLink in the background; stop the one this test made."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if b"flower-superlink" in cmdline and f"FLWR_HOME={flwr_home}".encode() in environ:
            os.kill(int(proc.name), signal.SIGTERM)


def test_flwr_run_local_simulation(tmp_path):
    flwr_home = tmp_path / "flwr"
    flwr_home.mkdir()
    (flwr_home / "config.toml").write_text(
        '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n'
        'options.num-supernodes = 3\noptions.backend.client-resources.num-cpus = 1\n')
    population = tmp_path / "pop"
    write_shakespeare_population(population, ShakespeareSettings(min_records=150))
    run_dir = tmp_path / "run"
    overrides = (f"model='tiny' data-dir='{population}' run-dir='{run_dir}' max-users=3 "
                 "num-rounds=1 clients-per-round=2 seq-len=32 local-steps=1 user-steps=1 "
                 "eval-max-records=2")
    venv_bin = str(Path(sys.executable).parent)  # flwr starts flower-superlink from PATH
    env = {**os.environ, "FLWR_HOME": str(flwr_home), "PATH": venv_bin + os.pathsep +
           os.environ.get("PATH", ""), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}

    try:
        result = subprocess.run([str(Path(venv_bin) / "flwr"), "run", ".", "local", "--stream",
                                 "--run-config", overrides], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=300)
    finally:
        _kill_local_superlinks(flwr_home)

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["config"]["model"] == "tiny" and report["num_users"] == 3
    assert report["rounds"][0]["accepted"] == 2
    assert (run_dir / "adapters" / "global" / "adapter_config.json").is_file()
