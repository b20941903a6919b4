"""Fault injection (simulations/faults.py): who misbehaves and how, that the server rejects
each fault with a reason naming it, that robust aggregation bounds an accepted extreme
update, and (integration) that a simulation with 20% faulty clients ends with the same
adapters as one without them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from flwr.app import MessageType
from helpers import (
    PERSONAS,
    RANK,
    initial_server_state,
    node_context,
    round_message,
    text_records,
)

from client.client_app import make_client_app
from server.checkpoint import load_checkpoint
from server.report import render_markdown
from server.strategy import apply_round, parse_reply, sent_part
from shared.config import FAULT_KINDS, RunConfig
from shared.data.userdata import Profile, UserData, write_population
from shared.model.runtime import get_runtime
from shared.protocol.records import record_to_state
from shared.protocol.validation import UpdateRejected
from shared.protocol.wire import KEY_GLOBAL
from simulations.faults import (
    NORM_FACTOR,
    InjectedCrash,
    fault_schedule,
    faulty_users,
    inject_faults,
)

USERS = tuple(f"u{i:02d}" for i in range(10))
# What the server says about each kind (the integration test holds the report to it)
REASONS = {
    "nan": r"global adapter: \S+ holds NaN or Inf values \(1 NaN, 0 Inf\)",
    "inf": r"global adapter: \S+ holds NaN or Inf values \(0 NaN, 1 Inf\)",
    "shape": r"global adapter: \S+ has shape \(33, 4\), expected \(32, 4\)",
    "names": r"global adapter: unexpected key \S+no_such_module\S+",
    "norm": r"adapter: update norm \S+ exceeds the bound 5",
    "crash": r"client error: .*injected crash: user u\d\d stopped mid-training in round \d",
}


def _user(user_id: str) -> UserData:
    """The same data for a user in every population it is written into."""
    index = int(user_id[1:])
    return UserData(Profile(user_id, PERSONAS[index % 2]), text_records(12, offset=3 * index),
                    text_records(2, offset=3 * index + 1))


def _population(root: Path, user_ids) -> Path:
    write_population(root, [("train", _user(u)) for u in user_ids],
                     {"personas": list(PERSONAS)})
    return root


def _config(data_dir: Path, run_dir: Path, **changes) -> RunConfig:
    settings = {"model": "tiny", "data_dir": str(data_dir), "run_dir": str(run_dir), "max_users": 0,
                    "local_steps": 1, "user_steps": 0, "batch_size": 4, "seq_len": 16, "device": "cpu",
                    "lora_rank": RANK, "lora_alpha": 2.0 * RANK, "eval_max_records": 1,
                    "target_epsilon": 50.0}
    settings.update(changes)
    return RunConfig(**settings)


def _train(app, cfg: RunConfig, state, user: str, server_round: int = 1, context=None):
    """``user``'s train reply to the message the server would send in ``server_round``."""
    persona = PERSONAS[int(user[1:]) % 2]
    msg = round_message(cfg, state, persona, MessageType.TRAIN, server_round=server_round)
    # users are sorted by id: u03 is partition 3 of a u00.. population
    return msg, app(msg, context or node_context(int(user[1:])))


def _parse(cfg: RunConfig, state, reply, user: str, **changes):
    expected = {k: tuple(v.shape) for k, v in sent_part(get_runtime(cfg).initial["global"],
                                                          cfg.lora_scheme).items()}
    settings = {"persona": PERSONAS[int(user[1:]) % 2], "expected": expected, "current": state,
                    "scheme": cfg.lora_scheme, "max_update_norm": cfg.max_update_norm}
    settings.update(changes)
    return parse_reply(reply, **settings)


# -- who misbehaves ----------------------------------------------------------------------------

def test_faulty_users_are_a_rounded_fraction_chosen_by_hash():
    assert faulty_users(USERS, seed=0, fraction=0.2) == ["u06", "u05"]
    assert faulty_users(USERS, seed=1, fraction=0.2) != ["u06", "u05"]
    assert len(faulty_users(USERS, seed=0, fraction=0.25)) == 3  # 2.5 rounds up
    assert faulty_users(USERS, seed=0, fraction=0.0) == []
    # the choice is per user, not per list position
    assert faulty_users(list(reversed(USERS)), seed=0, fraction=0.2) == ["u06", "u05"]


def test_two_faulty_users_meet_every_kind_in_three_rounds():
    schedules = [fault_schedule(USERS, seed=0, fraction=0.2, kinds=FAULT_KINDS,
                                server_round=r) for r in (1, 2, 3)]

    assert schedules[0] == {"u06": "nan", "u05": "inf"}
    assert sorted(k for s in schedules for k in s.values()) == sorted(FAULT_KINDS)
    assert all(set(s) == {"u05", "u06"} for s in schedules)


# -- each fault, on a real client reply, against the server's checks ---------------------------

@pytest.fixture(scope="module")
def five_users(tmp_path_factory) -> Path:
    return _population(tmp_path_factory.mktemp("faults") / "pop", USERS[:5])


def _faulty_in(cfg: RunConfig) -> str:
    (user,) = faulty_users(USERS[:5], seed=cfg.seed, fraction=cfg.fault_fraction)
    return user


@pytest.mark.parametrize("kind", ["nan", "inf", "shape", "names"])
def test_each_malformed_fault_is_rejected_with_its_reason(five_users, tmp_path, kind):
    cfg = _config(five_users, tmp_path / "run", fault_fraction=0.2, fault_kinds=kind)
    state = initial_server_state(cfg)
    user = _faulty_in(cfg)

    _, reply = _train(make_client_app(inject_faults), cfg, state, user)

    with pytest.raises(UpdateRejected, match=REASONS[kind]):
        _parse(cfg, state, reply, user)


def test_an_honest_user_is_untouched_and_accepted(five_users, tmp_path):
    faulty = _config(five_users, tmp_path / "run", fault_fraction=0.2, fault_kinds="nan")
    clean = faulty.replace(fault_fraction=0.0)
    state = initial_server_state(faulty)
    honest = next(u for u in USERS[:5] if u != _faulty_in(faulty))

    _, with_faults = _train(make_client_app(inject_faults), faulty, state, honest)
    _, without = _train(make_client_app(inject_faults), clean, state, honest)

    update, _ = _parse(faulty, state, with_faults, honest)
    a = record_to_state(with_faults.content[KEY_GLOBAL])
    b = record_to_state(without.content[KEY_GLOBAL])
    assert all(torch.equal(a[k], b[k]) for k in b)
    # accepted as exactly what it sent
    assert update.persona == PERSONAS[int(honest[1:]) % 2]
    assert all(torch.equal(update.global_state[k], b[k]) for k in b)


def test_a_crash_reaches_the_server_as_an_error(five_users, tmp_path):
    cfg = _config(five_users, tmp_path / "run", fault_fraction=0.2, fault_kinds="crash")
    state = initial_server_state(cfg)

    with pytest.raises(Exception, match="injected crash: user u0\\d stopped mid-training "
                                        "in round 1") as caught:
        _train(make_client_app(inject_faults), cfg, state, _faulty_in(cfg))

    assert isinstance(caught.value, InjectedCrash) or isinstance(
        caught.value.__cause__, InjectedCrash)


def test_a_real_device_ignores_fault_injection(five_users, tmp_path):
    from flwr.app import Context, RecordDict

    cfg = _config(five_users, tmp_path / "run", fault_fraction=0.2, fault_kinds="nan")
    state = initial_server_state(cfg)
    user = _faulty_in(cfg)
    device = Context(run_id=1, node_id=1, node_config={"user-dir": str(five_users / "users"
                                                                        / user)},
                     state=RecordDict(), run_config={})

    _, reply = _train(make_client_app(inject_faults), cfg, state, user, context=device)

    update, _ = _parse(cfg, state, reply, user)
    # accepted, finite (no NaN fault), and exactly the tensors the device sent
    sent = record_to_state(reply.content[KEY_GLOBAL])
    assert all(torch.equal(update.global_state[k], sent[k]) for k in sent)
    assert all(bool(torch.isfinite(v).all()) for v in update.global_state.values())


# -- the norm fault: rejected by max-update-norm, else bounded by robust aggregation ---------

@pytest.fixture(scope="module")
def norm_round(five_users, tmp_path_factory):
    """One round of the five users with the faulty one sending a 1000x update; its honest
    reply too. Returns (cfg, state, replies by user, faulty user, its honest reply, sent)."""
    tmp = tmp_path_factory.mktemp("norm")
    cfg = _config(five_users, tmp / "run", fault_fraction=0.2, fault_kinds="norm")
    state = initial_server_state(cfg)
    app = make_client_app(inject_faults)
    replies = {u: _train(app, cfg, state, u)[1] for u in USERS[:5]}
    faulty = _faulty_in(cfg)
    sent, honest = _train(app, cfg.replace(fault_fraction=0.0), state, faulty)
    return cfg, state, replies, faulty, honest, sent


def _change(reply, sent) -> dict:
    after, before = (record_to_state(m.content[KEY_GLOBAL]) for m in (reply, sent))
    return {k: after[k] - before[k] for k in before}


def _norm(state: dict) -> float:
    return float(torch.cat([v.flatten() for v in state.values()]).norm())


def test_the_norm_fault_is_1000_times_the_real_update(norm_round):
    _cfg, _state, replies, faulty, honest, sent = norm_round

    scaled, real = _change(replies[faulty], sent), _change(honest, sent)

    assert _norm(real) > 0
    for key in real:
        assert torch.allclose(scaled[key], NORM_FACTOR * real[key], rtol=1e-4, atol=1e-6)


def test_max_update_norm_rejects_the_norm_fault_and_no_honest_update(norm_round):
    cfg, state, replies, faulty, _, _ = norm_round

    for user, reply in replies.items():
        if user == faulty:
            with pytest.raises(UpdateRejected, match=REASONS["norm"]):
                _parse(cfg, state, reply, user, max_update_norm=5.0)
        else:
            update, _ = _parse(cfg, state, reply, user, max_update_norm=5.0)
            sent = record_to_state(reply.content[KEY_GLOBAL])
            assert all(torch.equal(update.global_state[k], sent[k]) for k in sent)


def test_robust_aggregation_bounds_an_accepted_norm_fault(norm_round):
    """Accepted (no max-update-norm): the plain mean is dragged ~200x past the honest
    updates; the trimmed mean (1 of 5 dropped at each end) keeps every global coordinate
    within the honest clients' range; clipping to C moves the global adapter <= C."""
    cfg, state, replies, faulty, _, sent = norm_round
    updates = {u: _parse(cfg, state, r, u)[0] for u, r in replies.items()}
    ordered = [updates[u] for u in sorted(updates)]
    honest = [_change(replies[u], sent) for u in sorted(replies) if u != faulty]
    before = sent_part(state.global_state, cfg.lora_scheme)
    results = {}
    for name, settings in {"mean": {}, "trimmed": {"aggregation": "trimmed-mean",
                                                   "trim_fraction": 0.2},
                           "clipped": {"clip_update_norm": 0.5}}.items():
        after = initial_server_state(cfg)
        apply_round(after, ordered, cfg.replace(**settings))
        results[name] = {k: after.global_state[k] - before[k] for k in before}

    largest_honest = max(_norm(h) for h in honest)
    assert _norm(results["mean"]) > 50 * largest_honest
    for key in before:
        low = torch.stack([h[key] for h in honest]).min(dim=0).values
        high = torch.stack([h[key] for h in honest]).max(dim=0).values
        assert bool(((results["trimmed"][key] >= low - 1e-6)
                     & (results["trimmed"][key] <= high + 1e-6)).all())
    assert _norm(results["trimmed"]) <= largest_honest + 1e-5
    assert _norm(results["clipped"]) <= 0.5 + 1e-5


# -- the report --------------------------------------------------------------------------------

def test_the_report_lists_rejections_one_row_each_and_notes_fault_injection():
    cfg = RunConfig(fault_fraction=0.2, aggregation="trimmed-mean").to_flower()
    report = {"config": cfg, "rounds": [], "privacy": {"dp": False},
              "rejected_updates": [
                  {"round": 1, "client": "u04", "reason": "client error: a\nb | c"},
                  {"round": 2, "client": "u06", "reason": "global adapter: x holds NaN"}]}

    text = render_markdown(report)

    assert "| round | client | reason" in text
    assert "| 1     | u04    | client error: a b \\| c" in text
    assert "| 2     | u06    | global adapter: x holds NaN" in text
    assert "fault-fraction 0.2 of the users misbehave on purpose (nan,inf,shape,names," in text
    assert "coordinate-wise trimmed mean, 0.1 dropped at each end" in text


# -- a real simulation with 20% faulty clients -------------------------------------------------

def _same_devices(source: Path, target: Path, users) -> None:
    """Give ``target``'s users the device secrets of ``source``'s: they are the same devices,
    so their DP noise (seeded from the secret) is the same."""
    from client.store import STATE_DIR, device_secret
    from shared.data.userdata import load_population

    here, there = load_population(source), load_population(target)
    for user in users:
        path = there.user_dir(user) / STATE_DIR / "device-secret"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(device_secret(here.user_dir(user)))


@pytest.mark.integration
def test_a_simulation_with_20_percent_faulty_clients_ends_as_without_them(tmp_path):
    """10 users, 2 of them faulty, every user sampled every round for 3 rounds: the two
    meet all six kinds; every one of their 6 updates is rejected with its reason; the
    final adapters equal those of a run over the 8 honest users alone."""
    from simulations.run.simulate import simulate

    faulty = faulty_users(USERS, seed=0, fraction=0.2)
    honest = [u for u in USERS if u not in faulty]
    common = {"num_rounds": 3, "clients_per_round": len(USERS), "max_update_norm": 5.0}
    bad_cfg = _config(_population(tmp_path / "all", USERS), tmp_path / "faulty",
                      fault_fraction=0.2, **common)
    clean_cfg = _config(_population(tmp_path / "honest", honest), tmp_path / "clean", **common)
    _same_devices(tmp_path / "all", tmp_path / "honest", honest)

    report = simulate(bad_cfg, final_evaluation=False)
    simulate(clean_cfg, final_evaluation=False)

    expected = {(r, u): kind for r in (1, 2, 3) for u, kind in fault_schedule(
        USERS, seed=0, fraction=0.2, kinds=FAULT_KINDS, server_round=r).items()}
    assert sorted(expected.values()) == sorted(FAULT_KINDS)
    rejected = {(e["round"], e["client"]): e["reason"] for e in report["rejected_updates"]}
    assert set(rejected) == set(expected)
    for where, kind in expected.items():
        assert re.search(REASONS[kind], rejected[where]), (where, kind, rejected[where])
    assert [(r["accepted"], r["rejected"]) for r in report["rounds"]] == [(8, 2)] * 3
    assert all(r["trained_users"] == honest for r in report["rounds"])
    on_disk = json.loads((tmp_path / "faulty" / "report.json").read_text())
    assert on_disk["rejected_updates"] == report["rejected_updates"]
    section = (tmp_path / "faulty" / "report.md").read_text().split("## Rejected updates")[1]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    assert len(rows) == 2 + 6  # header, rule, one row per rejected update
    for r, user in expected:
        assert any(re.match(rf"\| {r} +\| {user} +\| \S", row) for row in rows), (r, user)

    bad, clean = load_checkpoint(tmp_path / "faulty"), load_checkpoint(tmp_path / "clean")
    assert bad.round == clean.round == 3
    for key, value in clean.global_state.items():
        assert torch.allclose(bad.global_state[key], value, atol=1e-6), key
    for persona, adapter in clean.persona_states.items():
        for key, value in adapter.items():
            assert torch.allclose(bad.persona_states[persona][key], value, atol=1e-6), key
    # and training happened: the adapters moved from their start
    start = initial_server_state(clean_cfg).global_state
    assert any(not torch.equal(start[k], v) for k, v in clean.global_state.items())


def test_a_simulated_crash_reason_becomes_its_message_on_one_line():
    from shared.protocol.validation import error_summary

    ray = ("<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'\x1b[36mray::Client"
           "AppActor.run()\x1b[39m (pid=1)\n  File \"faults.py\", line 88\n    raise\nflwr."
           "ClientAppException: \nException ClientAppException occurred. Message: injected "
           "crash: user u05 stopped mid-training in round 3'>")

    assert error_summary(ray) == ("Exception ClientAppException occurred. Message: injected "
                                  "crash: user u05 stopped mid-training in round 3")
    assert error_summary("<class 'KeyError'>:<'x'>") == "<class 'KeyError'>:<'x'>"
    assert error_summary("\n") == "(no reason given)"
    assert len(error_summary("a" * 1000)) == 300
