"""``fedpersona audit`` end to end on the tiny model: plant, train without and with DP
on Flower's Simulation Engine, run every check; and a run whose clients leak fails."""

from __future__ import annotations

import json

import pytest
from flwr.app import ConfigRecord

from client.client_app import make_client_app
from shared.data.shakespeare import ShakespeareSettings, write_shakespeare_population
from simulations.cli import main
from simulations.run.simulate import resolve_config, simulate

pytestmark = pytest.mark.integration

SETTINGS = ["model=tiny", "max-users=4", "clients-per-round=4", "num-rounds=2",
            "local-steps=2", "user-steps=2", "batch-size=4", "seq-len=32",
            "eval-max-records=4"]


@pytest.fixture(scope="module")
def population(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "pop"
    write_shakespeare_population(out, ShakespeareSettings(min_records=150))
    return out


def test_audit_all_plants_trains_both_runs_and_passes(population, tmp_path, capsys):
    out = tmp_path / "audit"
    args = ["--out", str(out), "--candidates", "100", "--one-run-canaries", "40",
            *SETTINGS, f"data-dir={population}"]

    assert main(["audit", "all", *args]) == 0

    printed = capsys.readouterr().out
    results = json.loads((out / "audit-all.json").read_text())
    assert set(results) == {"ledger", "wire", "canary", "mia", "one-run"}
    assert set(results["ledger"]) == {"no-dp", "dp"}
    dp_ledger = results["ledger"]["dp"]
    assert dp_ledger["passed"] and 0 < dp_ledger["epsilon_max"] <= 8
    assert results["ledger"]["no-dp"]["epsilon_max"] == 0
    assert all(r["passed"] and r["replies"] > 0 for r in results["wire"].values())
    assert results["one-run"]["dp"]["accounted_epsilon"] == dp_ledger["epsilon_max"]
    assert results["one-run"]["dp"]["passed"]
    assert results["canary"]["dp"]["by_copies"]["4"]["canaries"] == 8
    assert results["mia"]["no-dp"]["members"] > 0 and results["mia"]["no-dp"]["non_members"] > 0
    assert "ledger: PASS" in printed and "### One-run audit" in printed
    assert (out / "audit-all.png").stat().st_size > 0
    assert (out / "audit-all.md").read_text().startswith("### Ledger")

    # a second check reuses the finished runs and their scores
    report_time = (out / "dp" / "report.json").stat().st_mtime
    assert main(["audit", "mia", "--out", str(out), *SETTINGS,
                 f"data-dir={population}"]) == 0
    assert (out / "dp" / "report.json").stat().st_mtime == report_time


def _leak_string(msg, context, call_next):
    reply = call_next(msg, context)
    reply.content["note"] = ConfigRecord({"text": "a line of the user's data"})
    return reply


def test_wire_audit_fails_a_run_whose_clients_send_a_string(population, tmp_path, capsys):
    cfg = resolve_config(tmp_path / "run", [*SETTINGS, "num-rounds=1",
                                            f"data-dir={population}"])
    simulate(cfg, final_evaluation=False, client_app=make_client_app(_leak_string))

    assert main(["audit", "wire", "--run", str(tmp_path / "run")]) == 1

    captured = capsys.readouterr()
    assert "audit FAILED: wire on run" in captured.err
    assert "record 'note' is a config record (it can carry strings: text: str)" in captured.out


def test_attack_checks_refuse_a_run_without_canaries(population, tmp_path, capsys):
    cfg = resolve_config(tmp_path / "plain", [*SETTINGS, "num-rounds=1",
                                              f"data-dir={population}"])
    simulate(cfg, final_evaluation=False)

    assert main(["audit", "ledger", "--run", str(tmp_path / "plain")]) == 0
    assert main(["audit", "canary", "--run", str(tmp_path / "plain")]) == 1
    assert "has no audit plan" in capsys.readouterr().err
