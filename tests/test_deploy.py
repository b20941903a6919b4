"""Flower's Deployment Engine for real, on loopback: a SuperLink and three SuperNodes as
separate processes, TLS and SuperNode authentication on, the tiny model
(:mod:`deployment`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from deployment import deploy_config, free_port, started, wait_for
from helpers import SMALL_USERS

from client.mods.wire_log import WIRE_LOG, read_wire_log
from server.strategy import sent_part
from shared.config import RunConfig
from shared.model.adapters import load_adapter_state
from shared.model.runtime import get_runtime
from shared.protocol.wire_check import check_entries
from simulations.deploy.certs import write_credentials

pytestmark = pytest.mark.integration

USERS = tuple(u for u, _ in SMALL_USERS)
SETTINGS = ["model=tiny", "persona-names=a,b", "min-clients=3", "clients-per-round=3",
            "local-steps=2", "user-steps=1", "batch-size=4", "seq-len=32",
            "eval-max-records=4", "target-epsilon=50", "lora-rank=4", "lora-alpha=8",
            # a fixed noise multiplier: every run below spends from the same device budget
            # (about 2.2 a round), where a calibrated plan would spend it all in the first
            "planned-rounds=0"]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    d = started(tmp_path_factory.mktemp("deploy"), SMALL_USERS, strangers=["stranger"])
    write_credentials(d.root / "other-ca", supernodes=[])
    try:
        yield d
    finally:
        d.stop()


def _config(run_dir: Path, rounds: int, *extra: str) -> tuple[RunConfig, list[str]]:
    settings = [*SETTINGS, f"num-rounds={rounds}", f"run-dir={run_dir}", *extra]
    return deploy_config(settings), settings


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
                                          port=free_port(), rejoin_wait=25)
    assert stranger.wait(timeout=90) != 0
    log = deployment.log("stranger")
    assert log.count("Failed to activate SuperNode") >= 2  # refused, retried, refused
    assert "Exit Code: 305" in log

    wrong_ca = deployment.start_supernode("u2", name="wrong-ca", port=free_port(),
                                          ca=deployment.root / "other-ca" / "ca.crt",
                                          rejoin_wait=0)
    assert wrong_ca.wait(timeout=60) != 0
    assert "CERTIFICATE_VERIFY_FAILED" in deployment.log("wrong-ca")


def test_a_killed_supernode_misses_a_round_and_rejoins(deployment):
    run_dir = deployment.root / "run-kill"
    # a fixed noise multiplier: with the default budget plan (2 rounds) every device would
    # decline from round 3 on, and the rejoin could not be seen in the last round
    cfg, settings = _config(run_dir, 5, "round-timeout=45", "planned-rounds=0",
                            "round-eval-users=0")  # only the training rounds are checked
    latest = run_dir / "checkpoint" / "LATEST"

    def at_round(n: int) -> bool:
        return latest.is_file() and latest.read_text().strip() == f"round-{n:04d}"

    run = deployment.start("run-kill", "deploy", "run", *settings)
    wait_for(lambda: at_round(1), 240, lambda: deployment.log("run-kill"))
    deployment.kill("node-u3")  # SIGKILL: no goodbye to the SuperLink
    wait_for(lambda: at_round(2), 240, lambda: deployment.log("run-kill"))
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
