"""Crash and resume: the client's replay of a resent round (client.replay, DeviceStore),
crash-safe ledger writes, and a real SIGKILL of a simulation mid-round, resumed."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, MessageType, RecordDict
from helpers import (
    FIXED_NOISE,
    initial_server_state,
    node_context,
    randomize_level,
    round_message,
    sim_store,
    small_config,
    tiny_peft,
    write_small_population,
)

from client import client_app
from client import round as device_round
from client.client_app import train
from client.mods.wire_log import WIRE_LOG, read_wire_log
from client.replay import ReplayError, content_digest, unpack
from client.store import STATE_DIR, DeviceStore, device_secret
from server.checkpoint import load_checkpoint, states_equal
from server.rounds import weighted_loss
from shared.data.federation import load_run_population
from shared.model.adapters import load_adapter_state
from shared.protocol.records import state_to_record
from shared.protocol.wire import KEY_GLOBAL, KEY_METRICS
from shared.util import atomic
from simulations.run.simulate import resolve_config

REPO = Path(__file__).resolve().parents[1]


def _store(cfg, user_id: str = "u1") -> DeviceStore:
    return sim_store(cfg, load_run_population(cfg).user_dir(user_id))


def _twin(tmp_path: Path, cfg):
    """A config for a second run in which u1's device holds its device secret in ``cfg``,
    so its private draws are the same: an uninterrupted reference for the same device."""
    reference = small_config(tmp_path / "ref")
    twin = load_run_population(reference).user_dir("u1")
    device_secret(twin)  # (creates the directories)
    (twin / STATE_DIR / "device-secret").write_bytes(
        device_secret(load_run_population(cfg).user_dir("u1")))
    return reference


def _files(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (or the file itself) by relative name, with its bytes."""
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file()}


def _arrays(reply) -> dict[str, dict[str, bytes]]:
    return {name: {k: (a.dtype, tuple(a.shape), a.data) for k, a in record.items()}
            for name, record in reply.content.array_records.items()}


def _message(cfg, state=None, *, server_round: int = 1):
    return round_message(cfg, state or initial_server_state(cfg), "a", MessageType.TRAIN,
                         server_round=server_round)


# -- the replay of a resent round --------------------------------------------------------------

def test_a_resent_round_replays_the_released_reply_without_training_or_spending(tmp_path):
    # Arrange: user u1 answers round 1 once
    cfg = small_config(tmp_path)
    store = _store(cfg)
    msg = _message(cfg)
    first = train(msg, node_context(0))
    ledger, user = _files(store.ledger_path), _files(store.user_adapter_path)

    # Act: the same round, same content, arrives again (a resumed server resends it)
    second = train(_message(cfg), node_context(0))

    # Assert: the identical reply, and nothing on the device changed
    assert _arrays(second) == _arrays(first) and _arrays(first)
    assert dict(second.content.metric_records[KEY_METRICS]) == \
        dict(first.content.metric_records[KEY_METRICS])
    assert _files(store.ledger_path) == ledger
    assert json.loads(store.ledger_path.read_text())["rounds"] == 1
    assert _files(store.user_adapter_path) == user
    assert second.metadata.reply_to_message_id == msg.metadata.message_id


def test_a_changed_instruction_is_trained_and_spent_again(tmp_path):
    # Arrange
    cfg = small_config(tmp_path, **FIXED_NOISE)
    store = _store(cfg)
    first = train(_message(cfg), node_context(0))
    user = _files(store.user_adapter_path)
    changed = initial_server_state(cfg)  # the server's global adapter is not the same
    changed.global_state = randomize_level(tiny_peft(), "global", scale=0.01, seed=7)

    # Act
    second = train(_message(cfg, changed), node_context(0))

    # Assert: trained on the new content, accounted a second time, user adapter moved on
    assert _arrays(second)[KEY_GLOBAL] != _arrays(first)[KEY_GLOBAL]
    history = json.loads(store.ledger_path.read_text())["history"]
    assert history == [[cfg.noise_multiplier, 0.2, cfg.local_steps + 1]] * 2
    assert second.content.metric_records[KEY_METRICS]["epsilon"] > \
        first.content.metric_records[KEY_METRICS]["epsilon"]
    assert _files(store.user_adapter_path) != user


def test_the_same_content_in_another_round_is_trained(tmp_path):
    cfg = small_config(tmp_path)
    store = _store(cfg)
    train(_message(cfg, server_round=1), node_context(0))

    train(_message(cfg, server_round=2), node_context(0))

    assert json.loads(store.ledger_path.read_text())["rounds"] == 2


@pytest.mark.parametrize("damage", ["truncate", "garbage", "flip"])
def test_a_torn_replay_file_counts_as_absent_and_over_counts(tmp_path, damage):
    # Arrange
    cfg = small_config(tmp_path)
    store = _store(cfg)
    first = train(_message(cfg), node_context(0))
    data = store.replay_path.read_bytes()
    damaged = {"truncate": data[:len(data) // 2], "garbage": b"\x00not a replay",
               # one byte of tensor data: the file parses, the reply digest does not match
               "flip": data[:-1] + bytes([data[-1] ^ 0xFF])}[damage]
    store.replay_path.write_bytes(damaged)

    # Act
    second = train(_message(cfg), node_context(0))

    # Assert: trained again, and accounted again (never fewer entries than releases)
    assert json.loads(store.ledger_path.read_text())["rounds"] == 2
    assert second.content.metric_records[KEY_METRICS]["epsilon"] > \
        first.content.metric_records[KEY_METRICS]["epsilon"]


def test_a_kill_between_keeping_the_reply_and_saving_the_user_adapter_is_completed(
        tmp_path, monkeypatch):
    # Arrange: the device dies right after the replay file is written
    cfg = small_config(tmp_path)
    store = _store(cfg)

    def killed(self, state, lora):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(DeviceStore, "save_user_adapter", killed)
    with pytest.raises(KeyboardInterrupt):
        train(_message(cfg), node_context(0))
    monkeypatch.undo()
    assert store.load_user_adapter() is None and store.replay_path.is_file()
    ledger = _files(store.ledger_path)

    # Act: the resent round
    reply = train(_message(cfg), node_context(0))

    # Assert: replayed, and the user adapter is the one that round trained
    assert _files(store.ledger_path) == ledger
    kept = load_adapter_state(store.user_adapter_path)
    reference = _twin(tmp_path, cfg)  # the same round, uninterrupted, same device
    ref_reply = train(_message(reference), node_context(0))
    assert states_equal(kept, _store(reference).load_user_adapter())
    assert _arrays(reply) == _arrays(ref_reply)


def test_the_wire_log_records_the_replayed_reply(tmp_path):
    cfg = small_config(tmp_path)
    app = client_app.make_client_app()
    store = _store(cfg)
    content = _message(cfg).content

    first = app(_message(cfg), node_context(0))
    second = app(_message(cfg), node_context(0))

    entries = read_wire_log(store.root / WIRE_LOG)
    assert [e["server_round"] for e in entries] == [1, 1]
    assert entries[0]["records"] == entries[1]["records"]
    assert _arrays(first) == _arrays(second)
    assert content_digest(content) == content_digest(_message(cfg).content)


def test_content_digest_sees_every_byte_name_and_type():
    def digest(weights=None, **config):
        content = RecordDict({
            KEY_GLOBAL: state_to_record(weights or {"w": torch.zeros(2, 3)}),
            "config": ConfigRecord(config or {"seed": 1, "lr": 0.5})})
        return content_digest(content)

    assert digest() == digest()
    assert digest({"w": torch.zeros(2, 3) + 1e-30}) != digest()  # one tiny value
    assert digest({"v": torch.zeros(2, 3)}) != digest()  # a name
    assert digest({"w": torch.zeros(3, 2)}) != digest()  # a shape
    assert digest(seed=1, lr=0.25) != digest()
    assert digest(seed=1.0, lr=0.5) != digest()  # an int became a float


# -- a client killed mid-round: the ledger ----------------------------------------------------

def test_a_kill_after_the_ledger_is_saved_leaves_the_spend_recorded(tmp_path, monkeypatch):
    # Arrange: the device dies while building its reply, after the ledger was saved
    cfg = small_config(tmp_path, **FIXED_NOISE)
    store = _store(cfg)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(device_round, "state_to_record", killed)

    # Act
    with pytest.raises(KeyboardInterrupt):
        train(_message(cfg), node_context(0))

    # Assert: nothing left the device, yet the round is already accounted, in valid JSON
    raw = json.loads(store.ledger_path.read_text())
    assert raw["history"] == [[cfg.noise_multiplier, 0.2, cfg.local_steps + 1]]
    assert raw["rounds"] == 1 and raw["epsilon"] > 0
    assert not store.replay_path.exists()  # so a resent round is trained again


def test_a_round_retried_after_a_kill_before_its_reply_was_kept_is_accounted_once(
        tmp_path, monkeypatch):
    # Arrange: the device dies after accounting round 1, before keeping its reply
    cfg = small_config(tmp_path)  # the calibrated default: a second entry would change sigma
    store = _store(cfg)
    reference = _twin(tmp_path, cfg)  # the same device, uninterrupted
    with monkeypatch.context() as patch:
        patch.setattr(DeviceStore, "commit_round", _killed)
        with pytest.raises(KeyboardInterrupt):
            train(_message(cfg), node_context(0))
    assert json.loads(store.ledger_path.read_text())["rounds"] == 1  # spent, as it must be

    # Act: the resent round, then the next one
    retried = train(_message(cfg), node_context(0))
    uninterrupted = train(_message(reference), node_context(0))

    # Assert: one round accounted, and the very reply and ledger of the uninterrupted device
    raw, ref = (json.loads(s.ledger_path.read_text()) for s in (store, _store(reference)))
    assert raw["rounds"] == 1 and raw["open_round"] is None
    assert raw["history"] == ref["history"] and raw["epsilon"] == ref["epsilon"]
    assert _arrays(retried) == _arrays(uninterrupted)
    assert dict(retried.content.metric_records[KEY_METRICS]) == \
        dict(uninterrupted.content.metric_records[KEY_METRICS])


def test_an_unreadable_replay_keeps_an_open_round_accounted(tmp_path, monkeypatch):
    # Arrange: killed before the reply was kept, and a replay file no one can read
    cfg = small_config(tmp_path, **FIXED_NOISE)
    store = _store(cfg)
    with monkeypatch.context() as patch:
        patch.setattr(DeviceStore, "commit_round", _killed)
        with pytest.raises(KeyboardInterrupt):
            train(_message(cfg), node_context(0))
    store.replay_path.write_bytes(b"\x00not a replay")  # it might have held the reply

    # Act
    train(_message(cfg), node_context(0))

    # Assert: over-counted, never under-counted
    assert json.loads(store.ledger_path.read_text())["rounds"] == 2


def _killed(*args, **kwargs):
    raise KeyboardInterrupt("killed")


def test_a_kill_inside_the_atomic_write_leaves_the_previous_ledger(tmp_path, monkeypatch):
    # Arrange: one round accounted
    cfg = small_config(tmp_path)
    store = _store(cfg)
    train(_message(cfg, server_round=1), node_context(0))
    before = store.ledger_path.read_bytes()

    def killed(src, dst):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(atomic.os, "replace", killed)

    # Act: round 2 dies in the rename that would publish the new ledger
    with pytest.raises(KeyboardInterrupt):
        train(_message(cfg, server_round=2), node_context(0))

    # Assert: the old ledger, byte for byte, and no staging file left behind
    assert store.ledger_path.read_bytes() == before
    assert sorted(p.name for p in store.root.iterdir() if p.name.startswith(".")) == []


# -- a real SIGKILL of the server mid-round, and the restart -----------------------------------

SETTINGS = ("model=tiny", "num-rounds=4", "max-users=0", "clients-per-round=3", "local-steps=2",
            "user-steps=1", "batch-size=4", "seq-len=32", "lora-rank=4", "lora-alpha=8.0",
            "eval-max-records=4", "device=cpu", "seed=11",
            "planned-rounds=4")  # every device takes part in all 4 rounds: budget for them
USERS = ("u1", "u2", "u3")


def _command(run_dir: Path, population: Path, *, resume: bool = False) -> list[str]:
    return [sys.executable, "-m", "simulations.cli", "simulate", "--out", str(run_dir),
            *(["--resume"] if resume else []), f"data-dir={population}", *SETTINGS]


def _stores(run_dir: Path, population: Path) -> dict[str, DeviceStore]:
    cfg = resolve_config(run_dir, [f"data-dir={population}", *SETTINGS],
                         pyproject=REPO / "pyproject.toml")
    return {u: sim_store(cfg, population / "users" / u) for u in USERS}


def _run(run_dir: Path, population: Path, log: Path, *,
         resume: bool = False) -> subprocess.CompletedProcess:
    with log.open("w") as out:
        result = subprocess.run(_command(run_dir, population, resume=resume), cwd=REPO,
                                stdout=out,
                                stderr=subprocess.STDOUT, timeout=240, check=False)
    assert result.returncode == 0, log.read_text()[-3000:]
    return result


def _answered(store: DeviceStore, server_round: int) -> bool:
    """Whether the device's wire log shows a train reply for ``server_round``."""
    path = store.root / WIRE_LOG
    return path.is_file() and any(
        e.get("server_round") == server_round and "train" in str(e.get("message_type"))
        for e in read_wire_log(path))


def _kept_round(store: DeviceStore) -> int | None:
    try:
        return unpack(store.replay_path).server_round
    except (ReplayError, FileNotFoundError):
        return None


def _latest(run_dir: Path) -> str | None:
    latest = run_dir / "checkpoint" / "LATEST"
    return latest.read_text().strip() if latest.is_file() else None


def _without_timing(history: list[dict]) -> list[dict]:
    """The history without timings and the resumed run's marker of the round it sent
    again (``resumed``)."""
    return [{k: v for k, v in h.items() if not k.endswith("seconds") and k != "resumed"}
            for h in history]


def test_round_train_loss_does_not_depend_on_the_order_replies_arrive_in():
    # A resumed round hears its replayed replies in another order than the straight run
    # (CI once saw the history differ in the last bit); a naive sum of these differs.
    losses = [(0.1, 1), (0.2, 1), (0.3, 1)]
    assert sum(v * n for v, n in losses) != sum(v * n for v, n in reversed(losses))
    assert weighted_loss(losses) == weighted_loss(list(reversed(losses))) == 0.6 / 3


@pytest.mark.integration
def test_a_moved_run_resumes_with_its_devices_spending_and_cannot_understate(tmp_path):
    # Arrange: one round in one directory, then the directory moved and resumed to two
    # rounds; beside it, the same two rounds uninterrupted. Without moving the devices'
    # ledgers with the run, the resumed devices started from nothing: epsilon 5.6 reported
    # for two rounds that cost 7.3, and the user adapters were lost.
    import shutil

    from simulations.audit.command import ledger_check
    from simulations.run.simulate import simulate

    settings = {"clients_per_round": 3, "planned_rounds": 2, "target_epsilon": 8.0, "seed": 4}
    straight = small_config(tmp_path, run_dir=str(tmp_path / "straight"), num_rounds=2,
                            **settings)
    first = small_config(tmp_path, run_dir=str(tmp_path / "first"), num_rounds=1, **settings)
    simulate(straight, final_evaluation=False)
    simulate(first, final_evaluation=False)
    shutil.move(first.run_dir, tmp_path / "moved")
    moved = first.replace(run_dir=str(tmp_path / "moved"), num_rounds=2)

    # Act
    report = simulate(moved, final_evaluation=False)

    # Assert: the moved run is the uninterrupted one, spending and all
    expected = json.loads((tmp_path / "straight" / "report.json").read_text())
    assert report["privacy"]["epsilon_per_user"] == pytest.approx(
        expected["privacy"]["epsilon_per_user"], rel=1e-12)
    for user in USERS:
        ledger = json.loads(_store(moved, user).ledger_path.read_text())
        assert ledger["rounds"] == 2
        assert report["privacy"]["epsilon_per_user"][user] == pytest.approx(ledger["epsilon"])
        assert _store(moved, user).load_user_adapter() is not None
    assert states_equal(load_checkpoint(tmp_path / "moved").global_state,
                        load_checkpoint(tmp_path / "straight").global_state)
    assert ledger_check(tmp_path / "moved")["passed"]
    assert not (tmp_path / "first").exists()


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> tuple[Path, Path]:
    """One population and its uninterrupted run, the reference of the interrupted runs
    below: each keeps its devices in its own run directory, and the devices' secrets
    live in the shared population, so the same rounds draw the same noise."""
    root = tmp_path_factory.mktemp("straight")
    write_small_population(root / "pop")
    _run(root / "straight", root / "pop", root / "straight.log")
    return root / "pop", root / "straight"


@pytest.mark.integration
def test_server_killed_mid_round_resumes_to_the_uninterrupted_result(tmp_path, straight_run):
    # Arrange: one population; each run's device state is apart (each run keeps its
    # devices in its own directory), so both runs start from clean devices.
    population, straight = straight_run
    killed = tmp_path / "killed"
    stores = {"straight": _stores(straight, population), "killed": _stores(killed, population)}
    assert {s.root for s in stores["straight"].values()}.isdisjoint(
        s.root for s in stores["killed"].values())

    # Act 1: SIGKILL the whole process group (server, Ray and its workers) once round 2
    # is checkpointed and a device has answered round 3, before the round completes
    first_log = tmp_path / "killed-1.log"
    started = time.monotonic()
    with first_log.open("w") as out:
        process = subprocess.Popen(_command(killed, population), cwd=REPO, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while not (_latest(killed) == "round-0002" and
                       any(_answered(s, 3) for s in stores["killed"].values())):
                assert process.poll() is None, first_log.read_text()[-3000:]
                assert time.monotonic() - started < 180, "round 3 never began"
                time.sleep(0.02)
        finally:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
    at_kill = {u: {"ledger_rounds": json.loads(s.ledger_path.read_text())["rounds"],
                   "kept": _kept_round(s)} for u, s in stores["killed"].items()}

    # Assert 1: killed mid-round 3, with only complete files on disk
    assert _latest(killed) == "round-0002"
    assert load_checkpoint(killed).round == 2
    assert not (killed / "checkpoint" / "round-0003").exists()
    assert "round 2/4" in first_log.read_text() and "round 3/4" not in first_log.read_text()
    assert any(v["kept"] == 3 for v in at_kill.values())  # some device had answered round 3
    # SIGKILL is delivered at once, but a big process takes a moment to exit
    deadline = time.monotonic() + 20
    while (leftovers := _ray_processes_of(process.pid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert leftovers == [], f"processes of the killed run still alive: {leftovers}"

    # Act 2: the same command, the same run directory, resumed
    _run(killed, population, tmp_path / "killed-2.log", resume=True)

    # Assert 2: resumed after round 2, and the same final result as the straight run
    assert f"resuming {killed} after round 2" in (tmp_path / "killed-2.log").read_text()
    a, b = load_checkpoint(straight), load_checkpoint(killed)
    assert a.round == b.round == 4
    assert states_equal(a.global_state, b.global_state)
    assert set(a.persona_states) == set(b.persona_states)
    assert all(states_equal(a.persona_states[p], b.persona_states[p]) for p in a.persona_states)
    assert states_equal(load_adapter_state(killed / "adapters" / "global"), a.global_state)
    assert _without_timing(a.history) == _without_timing(b.history)
    assert a.rejected == b.rejected == []
    report = {run: json.loads((run / "report.json").read_text()) for run in (straight, killed)}
    assert report[straight]["levels"] == report[killed]["levels"]
    for user in USERS:
        before, after = stores["straight"][user], stores["killed"][user]
        assert states_equal(before.load_user_adapter(), after.load_user_adapter()), user
        # a device killed after accounting round 3 but before keeping its reply takes
        # that unreleased attempt back and retrains it: accounted once, exactly equal
        straight_history = json.loads(before.ledger_path.read_text())["history"]
        killed_history = json.loads(after.ledger_path.read_text())["history"]
        assert killed_history == straight_history, (user, at_kill)
        assert b.epsilon_per_user[user] == a.epsilon_per_user[user]


def _stopped_by(signals: list[int], run_dir: Path, population: Path, log: Path, *,
                when: str, resume: bool, group: bool) -> tuple[int, str]:
    """Start the command, send ``signals`` once ``when`` is printed (to its process group,
    as Ctrl-C in a terminal does, or to the process, as ``kill`` does), wait; its exit
    code and console output."""
    started = time.monotonic()
    with log.open("w") as out:
        process = subprocess.Popen(_command(run_dir, population, resume=resume), cwd=REPO,
                                   stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            while when not in log.read_text():
                assert process.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() - started < 180, f"{when!r} never came"
                time.sleep(0.05)
            for sig in signals:
                (os.killpg if group else os.kill)(process.pid, sig)
                time.sleep(0.2)
            code = process.wait(timeout=180)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
    return code, log.read_text()


@pytest.mark.integration
def test_a_signal_stops_after_the_round_and_a_second_at_once_and_both_resume(tmp_path,
                                                                            straight_run):
    # Arrange: the uninterrupted run
    population, straight = straight_run
    stopped = tmp_path / "stopped"

    # Act 1: SIGTERM once (kill PID), in round 2
    code, first = _stopped_by([signal.SIGTERM], stopped, population, tmp_path / "1.log",
                              when="round 1/4", resume=False, group=False)

    # Assert 1: stopped with round 2 checkpointed, and said how to resume
    assert code == 130, first[-3000:]
    assert f"stopped after round 2's checkpoint; resume with: fedpersona simulate --out " \
           f"{stopped} --resume" in first
    assert _latest(stopped) == "round-0002" and "Traceback" not in first

    # Act 2: resumed, then Ctrl-C twice in round 4: stop at once
    code, second = _stopped_by([signal.SIGINT, signal.SIGINT], stopped, population,
                               tmp_path / "2.log", when="round 3/4", resume=True, group=True)

    # Assert 2: round 4 dropped, round 3's checkpoint intact, nothing of Ray left running
    assert code == 130, second[-3000:]
    assert "stopped at its last checkpoint" in second and "Traceback" not in second
    assert _latest(stopped) == "round-0003"

    # Act 3: resumed to the end
    _run(stopped, population, tmp_path / "3.log", resume=True)

    # Assert 3: the uninterrupted run's result, spending included
    a, b = load_checkpoint(straight), load_checkpoint(stopped)
    assert a.round == b.round == 4
    assert states_equal(a.global_state, b.global_state)
    assert all(states_equal(a.persona_states[p], b.persona_states[p]) for p in a.persona_states)
    assert _without_timing(a.history) == _without_timing(b.history)
    assert a.epsilon_per_user == b.epsilon_per_user
    report = {run: json.loads((run / "report.json").read_text()) for run in (straight, stopped)}
    assert report[straight]["levels"] == report[stopped]["levels"]


def _ray_processes_of(pid: int) -> list[str]:
    """Processes still running in the killed run's session (Ray's GCS, raylet and workers
    are all started in it). Zombies are dead, only not yet reaped by their new parent."""
    result = subprocess.run(["ps", "-eo", "pid,sid,stat,args"], capture_output=True,
                            text=True, check=True)
    rows = [line.split(None, 3) for line in result.stdout.splitlines()[1:]]
    return [" ".join(row) for row in rows
            if len(row) == 4 and row[1] == str(pid) and not row[2].startswith("Z")]
