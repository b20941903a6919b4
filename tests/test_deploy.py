"""Flower's Deployment Engine for real, on loopback: a SuperLink and three SuperNodes as
separate processes, TLS and SuperNode authentication on, the tiny model.

Every process runs in its own session and is killed (with its children) when the
module ends; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import write_small_population

from client.mods.wire_log import WIRE_LOG, read_wire_log
from server.strategy import sent_part
from shared.config import RunConfig
from shared.model.adapters import load_adapter_state
from shared.model.runtime import get_runtime
from shared.protocol.wire_check import check_entries
from simulations.deploy.certs import write_credentials
from simulations.deploy.command import run_config_argument

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
USERS = ("u1", "u2", "u3")
SETTINGS = ["model=tiny", "persona-names=a,b", "min-clients=3", "clients-per-round=3",
            "local-steps=2", "user-steps=1", "batch-size=4", "seq-len=32",
            "eval-max-records=4", "target-epsilon=50", "lora-rank=4", "lora-alpha=8",
            # a fixed noise multiplier: every run below spends from the same device budget
            # (about 2.2 a round), where a calibrated plan would spend it all in the first
            "planned-rounds=0"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Deployment:
    def __init__(self, root: Path):
        self.root = root
        self.env = {**os.environ, "FLWR_HOME": str(root / "flwr_home"),
                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.processes: dict[str, subprocess.Popen] = {}
        self.node_ports = {u: _free_port() for u in USERS}

    def fedpersona(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "simulations.cli", *args], cwd=REPO,
                              env=self.env, capture_output=True, text=True, timeout=timeout,
                              check=False)

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        process = subprocess.Popen([sys.executable, "-m", "simulations.cli", *args], cwd=REPO,
                                   env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        self.processes[name] = process
        return process

    def start_supernode(self, user: str, *, name: str | None = None, key: str | None = None,
                        ca: Path | None = None, port: int | None = None,
                        rejoin_wait: float = 120) -> subprocess.Popen:
        certs = self.root / "certs"
        return self.start(name or f"node-{user}", "deploy", "supernode",
                          "--user-dir", str(self.root / "pop" / "users" / user),
                          "--superlink", self.address,
                          "--port", str(port or self.node_ports[user]),
                          "--ca", str(ca or certs / "ca.crt"),
                          "--key", str(certs / "supernodes" / (key or user)),
                          "--max-wait", "30", "--rejoin-wait", str(rejoin_wait))

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        process = self.processes.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        process.wait(timeout=30)

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text()

    def stop(self) -> None:
        for name in list(self.processes):
            self.kill(name, signal.SIGTERM if name == "superlink" else signal.SIGKILL)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    write_small_population(root / "pop")
    write_credentials(root / "certs", supernodes=[*USERS, "stranger"])
    write_credentials(root / "other-ca", supernodes=[])
    d = Deployment(root)
    try:
        d.start("superlink", "deploy", "superlink", "--certs", str(root / "certs"),
                "--port", str(d.port))
        _wait_for(lambda: "running on https" in d.log("superlink").lower(), 60,
                  lambda: d.log("superlink"))
        connect = d.fedpersona("deploy", "connect", "--address", d.address, "--ca",
                               str(root / "certs" / "ca.crt"))
        assert connect.returncode == 0, connect.stderr
        for user in USERS:
            registered = d.fedpersona("deploy", "register",
                                      str(root / "certs" / "supernodes" / f"{user}.pub"))
            assert registered.returncode == 0, registered.stdout + registered.stderr
            d.start_supernode(user)
        yield d
    finally:
        d.stop()


def _wait_for(condition, seconds: float, explain=lambda: "") -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds}s\n{explain()[-3000:]}")
        time.sleep(0.5)


def _config(run_dir: Path, rounds: int, *extra: str) -> tuple[RunConfig, list[str]]:
    settings = [*SETTINGS, f"num-rounds={rounds}", f"run-dir={run_dir}", *extra]
    run_config_argument(settings)  # what 'deploy run' sends must parse
    from simulations.run.simulate import resolve_config

    return resolve_config(None, settings, pyproject=Path("/nonexistent")), settings


def test_two_rounds_over_tls_with_authenticated_supernodes(deployment):
    run_dir = deployment.root / "run"
    cfg, settings = _config(run_dir, 2, "round-timeout=120")

    done = deployment.fedpersona("deploy", "run", *settings, timeout=420)

    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((run_dir / "report.json").read_text())
    assert [r["accepted"] for r in report["rounds"]] == [3, 3]
    assert report["rejected_updates"] == []
    assert report["levels"]["global+persona+user"]["users"] == 3
    assert 0 < report["privacy"]["epsilon_max"] <= 50
    expected = {k: tuple(v.shape) for k, v in sent_part(get_runtime(cfg).initial["global"],
                                                          cfg.lora_scheme).items()}
    global_state = load_adapter_state(run_dir / "adapters" / "global")
    assert {k: tuple(v.shape) for k, v in sent_part(global_state, "ffa").items()} == expected
    assert sorted(p.name for p in (run_dir / "adapters" / "persona").iterdir()) == ["a", "b"]
    # what left each device: adapter tensors of the expected names and shapes, numbers
    for user in USERS:
        state = deployment.root / "pop" / "users" / user / ".fedpersona"
        log = read_wire_log(state / cfg.federation_key / WIRE_LOG)
        # each round's training, then its measurement on the fixed users (all three
        # here: round-eval-users = 8), then the final evaluation
        assert [e["message_type"] for e in log] == ["query", "train", "evaluate", "train",
                                                    "evaluate", "evaluate"]
        assert check_entries(log, expected) == []
        ledger = json.loads((state / "ledger.json").read_text())
        assert ledger["federation_rounds"] == {cfg.federation_key: 2}


def test_unregistered_key_and_untrusted_ca_are_refused(deployment):
    # room for one retry after a first try that takes longer on a busy machine (a try
    # starts only if it can begin before the rejoin window closes)
    stranger = deployment.start_supernode("u1", name="stranger", key="stranger",
                                          port=_free_port(), rejoin_wait=25)
    assert stranger.wait(timeout=90) != 0
    log = deployment.log("stranger")
    assert log.count("Failed to activate SuperNode") >= 2  # refused, retried, refused
    assert "Exit Code: 305" in log

    wrong_ca = deployment.start_supernode("u2", name="wrong-ca", port=_free_port(),
                                          ca=deployment.root / "other-ca" / "ca.crt",
                                          rejoin_wait=0)
    assert wrong_ca.wait(timeout=60) != 0
    assert "CERTIFICATE_VERIFY_FAILED" in deployment.log("wrong-ca")


def test_a_killed_supernode_misses_a_round_and_rejoins(deployment):
    run_dir = deployment.root / "run-kill"
    # a fixed noise multiplier: with the default budget plan (2 rounds) every device would
    # decline from round 3 on, and the rejoin could not be seen in the last round
    cfg, settings = _config(run_dir, 5, "round-timeout=45", "planned-rounds=0")
    latest = run_dir / "checkpoint" / "LATEST"

    def at_round(n: int) -> bool:
        return latest.is_file() and latest.read_text().strip() == f"round-{n:04d}"

    run = deployment.start("run-kill", "deploy", "run", *settings)
    _wait_for(lambda: at_round(1), 240, lambda: deployment.log("run-kill"))
    deployment.kill("node-u3")  # SIGKILL: no goodbye to the SuperLink
    _wait_for(lambda: at_round(2), 240, lambda: deployment.log("run-kill"))
    # Restarted with the same key (so the same node id). The SuperLink holds the dead
    # session until its heartbeat expires (~60 s); the SuperNode retries until then.
    deployment.start_supernode("u3")
    assert run.wait(timeout=400) == 0, deployment.log("run-kill")[-3000:]

    report = json.loads((run_dir / "report.json").read_text())
    rounds = report["rounds"]
    assert [r["accepted"] for r in rounds[:2]] == [3, 2]
    missing = [r for r in report["rejected_updates"] if r["round"] == 2]
    assert len(missing) == 1 and missing[0]["reason"].startswith("no reply")
    killed = missing[0]["client"]
    assert killed in rounds[-1]["trained_users"] and rounds[-1]["accepted"] == 3  # back
    assert all(r["client"] == killed for r in report["rejected_updates"])
    ledgers = {u: json.loads((deployment.root / "pop" / "users" / u / ".fedpersona" /
                              "ledger.json").read_text()) for u in USERS}
    assert ledgers["u3"]["federation_rounds"][cfg.federation_key] >= 2  # went on where it was
    # One budget per device: this run is the second these devices joined (in file order,
    # test_two_rounds_... ran first); its rounds add to the same ledgers, and its report
    # says what they compose
    first = _config(deployment.root / "run", 2)[0]
    if (deployment.root / "run" / "report.json").is_file():
        for ledger in ledgers.values():
            assert ledger["federation_rounds"][first.federation_key] == 2
            assert ledger["rounds"] == 2 + ledger["federation_rounds"][cfg.federation_key]
    assert report["privacy"]["epsilon_max"] == pytest.approx(
        max(ledger["epsilon"] for ledger in ledgers.values()), rel=1e-9)
