"""Flower's simulation on a two-node Ray cluster on this machine (loopback), tiny model.

The test starts the cluster it uses (`ray start`, a head and a second node, each one
CPU and its own label) and stops it by its own processes (never `ray stop`, which
would stop every Ray on the machine).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from helpers import small_config

from simulations.run.ray_cluster import PLACEMENT_LOG
from simulations.run.simulate import simulate

pytestmark = pytest.mark.integration

HOST = "127.0.0.2"  # loopback; Ray rewrites 127.0.0.1 to the outward address (see module)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray(*args: str) -> subprocess.CompletedProcess:
    ray = str(Path(sys.executable).parent / "ray")
    return subprocess.run([ray, "start", *args, "--disable-usage-stats"], capture_output=True,
                          text=True, timeout=120, check=False,
                          env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})


def _stop(temp_dir: str) -> None:
    """Every process of this cluster names its temp dir on its command line."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and temp_dir.encode() in (proc / "cmdline").read_bytes():
                    os.kill(int(proc.name), sig)
            except (OSError, ProcessLookupError):
                continue
        time.sleep(1)


@pytest.fixture
def cluster():
    temp_dir = tempfile.mkdtemp(prefix="/tmp/fpray-")  # short: Ray's socket paths must fit
    address = f"{HOST}:{_free_port()}"
    try:
        head = _ray("--head", "--node-ip-address", HOST, "--port", address.split(":")[1],
                    "--num-cpus", "1", "--resources", '{"node-a": 1}', "--temp-dir", temp_dir,
                    "--include-dashboard", "false")
        assert head.returncode == 0, head.stdout + head.stderr
        second = _ray("--address", address, "--node-ip-address", HOST, "--num-cpus", "1",
                      "--resources", '{"node-b": 1}')
        assert second.returncode == 0, second.stdout + second.stderr
        yield address
    finally:
        _stop(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_a_simulation_runs_its_clients_on_both_nodes_of_a_ray_cluster(cluster, tmp_path):
    cfg = small_config(tmp_path, num_rounds=2, clients_per_round=3, target_epsilon=50.0)
    said = []

    report = simulate(cfg, final_evaluation=False, ray_address=cluster, progress=said.append)

    placement = report["ray_placement"]
    assert sorted(row["labels"] for row in placement) == ["node-a", "node-b"]
    assert all(row["messages"] > 0 and row["address"] == HOST for row in placement)
    # 3 queries, 2 x 3 trains, 2 x 3 round evaluations, 3 final evaluations
    assert sum(row["messages"] for row in placement) == len(
        (tmp_path / "run" / PLACEMENT_LOG).read_text().splitlines()) == 18
    assert [r["accepted"] for r in report["rounds"]] == [3, 3]
    assert f"Ray cluster at {cluster}: 2 nodes, 2 CPUs" in said
