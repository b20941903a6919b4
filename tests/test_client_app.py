"""The ClientApp handlers (client.client_app), called directly with a hand-built Context and
Message on the tiny model and a three-user population on disk."""

from __future__ import annotations

import dataclasses
import json
import logging
import math

import pytest
import torch
from flwr.app import MessageType
from helpers import (
    FIXED_NOISE,
    initial_server_state,
    node_context,
    randomize_level,
    round_message,
    sim_store,
    small_config,
    tiny_peft,
)

from client import round as device_round
from client.client_app import evaluate, query, train
from client.store import DeviceStore
from client.trainer import DPTrainingError
from server.strategy import sent_part
from shared.config import ConfigError
from shared.data.federation import load_run_population
from shared.model.adapters import level_state
from shared.model.runtime import get_runtime
from shared.protocol.records import record_to_state
from shared.protocol.wire import (
    EVAL_LEVELS,
    KEY_GLOBAL,
    KEY_METRICS,
    KEY_PERSONA,
    KEY_ROUND,
    round_record,
)


def _user_dir(cfg, user_id: str = "u1"):
    return load_run_population(cfg).user_dir(user_id)


def _train(cfg, persona="a", *, partition=0, server_round=1, personas=("a", "b")):
    state = initial_server_state(cfg)
    msg = round_message(cfg, state, persona, MessageType.TRAIN, server_round=server_round,
                        personas=personas)
    return train(msg, node_context(partition))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One training round of user u1 (persona "a"); read-only for the tests that share it."""
    cfg = small_config(tmp_path_factory.mktemp("trained"), **FIXED_NOISE)
    return cfg, _train(cfg)


# -- train ---------------------------------------------------------------------------------

def test_train_reply_holds_only_released_b_tensors_and_metrics(trained):
    # Arrange / Act (the fixture trains)
    cfg, reply = trained
    sent = sent_part(get_runtime(cfg).initial["global"], cfg.lora_scheme)

    # Assert
    content = reply.content
    assert set(content.keys()) == {KEY_GLOBAL, KEY_PERSONA, KEY_METRICS}
    for name in (KEY_GLOBAL, KEY_PERSONA):
        record = content.array_records[name]
        assert set(record.keys()) == set(sent)
        assert all("lora_B" in key for key in record)
        assert all(array.dtype == "float32" for array in record.values())
        assert all(tuple(array.shape) == tuple(sent[k].shape) for k, array in record.items())
        state = record.to_torch_state_dict()
        assert any(not torch.equal(state[k], sent[k]) for k in sent)  # trained, not echoed
    assert reply.metadata.reply_to_message_id == "msg-1"


def test_train_metrics_and_ledger_on_disk(trained):
    # Arrange / Act (the fixture trains)
    cfg, reply = trained
    store = sim_store(cfg, _user_dir(cfg))
    metrics = reply.content.metric_records[KEY_METRICS]

    # Assert
    assert metrics["num-examples"] == 20
    assert metrics["declined"] == 0 and metrics["dp"] == 1
    assert metrics["persona-index"] == 0 and metrics["user-index"] == 0
    assert metrics["steps"] == 2
    assert 0 < metrics["epsilon"] < math.inf
    assert store.ledger_path.is_file()
    on_disk = json.loads(store.ledger_path.read_text())
    # two DP-SGD steps plus the one noisy train-loss release, at the same rate
    assert on_disk["history"] == [[cfg.noise_multiplier, 0.2, 3]]
    assert on_disk["epsilon"] == pytest.approx(metrics["epsilon"])
    user = store.load_user_adapter()  # saved on the device ...
    assert user is not None
    for name in (KEY_GLOBAL, KEY_PERSONA):  # ... and not what was sent
        sent = reply.content.array_records[name].to_torch_state_dict()
        assert all(not torch.equal(sent[k], user[k]) for k in sent)


def test_epsilon_composes_over_rounds(tmp_path):
    # Arrange
    cfg = small_config(tmp_path, **FIXED_NOISE)

    # Act
    first = _train(cfg, server_round=1).content.metric_records[KEY_METRICS]["epsilon"]
    second = _train(cfg, server_round=2).content.metric_records[KEY_METRICS]["epsilon"]

    # Assert
    ledger = sim_store(cfg, _user_dir(cfg)).load_ledger(
        target_epsilon=cfg.target_epsilon, target_delta=cfg.target_delta)
    assert second > first > 0
    assert ledger.rounds == 2 and len(ledger.history) == 2
    assert ledger.epsilon == pytest.approx(second)


def _device_context(user_dir, **node_config):
    """A real SuperNode's context: it serves the user directory it was started with."""
    from flwr.app import Context, RecordDict

    return Context(run_id=1, node_id=1, node_config={"user-dir": str(user_dir), **node_config},
                   state=RecordDict(), run_config={})


def _train_on_device(cfg, context, server_round=1):
    msg = round_message(cfg, initial_server_state(cfg), "a", MessageType.TRAIN,
                        server_round=server_round)
    return train(msg, context).content.metric_records[KEY_METRICS]


def test_two_runs_on_one_device_spend_one_budget(tmp_path):
    # Arrange: one device, two federations (two server runs in different directories)
    first_run = small_config(tmp_path, **FIXED_NOISE)
    second_run = first_run.replace(run_dir=str(tmp_path / "another-run"))
    device = _device_context(_user_dir(first_run))

    # Act
    first = _train_on_device(first_run, device)
    second = _train_on_device(second_run, device)

    # Assert: the second run's round adds to the first's spending; each run's user
    # adapter stays its own; the reported epsilon is what the device's ledger composes
    ledger_path = _user_dir(first_run) / ".fedpersona" / "ledger.json"
    ledger = json.loads(ledger_path.read_text())
    assert ledger["federation_rounds"] == {first_run.federation_key: 1,
                                           second_run.federation_key: 1}
    assert second["epsilon"] > first["epsilon"] > 0
    assert second["epsilon"] == pytest.approx(ledger["epsilon"], rel=1e-12)
    for cfg in (first_run, second_run):
        assert DeviceStore.on_device(_user_dir(cfg), cfg.federation_key).load_user_adapter() \
            is not None
    assert not (tmp_path / "run" / "devices").exists()  # nothing of a real device in a run


def test_a_device_budget_caps_every_run_it_joins(tmp_path):
    # Arrange: the owner caps the device at about one round's spending
    cfg = small_config(tmp_path, **FIXED_NOISE)
    uncapped = _train_on_device(cfg.replace(run_dir=str(tmp_path / "probe")),
                                _device_context(_user_dir(cfg, "u2")))
    device = _device_context(_user_dir(cfg), **{"epsilon-budget": 1.1 * uncapped["epsilon"]})

    # Act: a first run, then a new run that asks for far more
    first = _train_on_device(cfg, device)
    second = _train_on_device(cfg.replace(run_dir=str(tmp_path / "r2"), target_epsilon=1e6),
                              device)

    # Assert
    assert first["declined"] == 0 and second["declined"] == 1
    assert second["epsilon"] == pytest.approx(first["epsilon"])
    with pytest.raises(ValueError, match="epsilon-budget='none'"):
        _train_on_device(cfg, _device_context(_user_dir(cfg), **{"epsilon-budget": "none"}))


def test_train_declines_past_the_budget(tmp_path):
    # Arrange
    cfg = small_config(tmp_path, target_epsilon=0.01)
    store = sim_store(cfg, _user_dir(cfg))

    # Act
    reply = _train(cfg)

    # Assert
    content = reply.content
    assert set(content.keys()) == {KEY_METRICS}
    assert len(content.array_records) == 0
    metrics = content.metric_records[KEY_METRICS]
    assert metrics["declined"] == 1
    assert metrics["epsilon"] == 0.0
    assert store.load_user_adapter() is None  # nothing trained


def test_train_without_persona_sends_global_only(tmp_path):
    # Arrange: u1's persona "a" is not among this run's personas
    cfg = small_config(tmp_path)

    # Act
    reply = _train(cfg, persona=None, personas=("b",))

    # Assert
    assert set(reply.content.keys()) == {KEY_GLOBAL, KEY_METRICS}
    assert reply.content.metric_records[KEY_METRICS]["persona-index"] == -1


def test_train_without_dp_reports_no_epsilon(tmp_path):
    cfg = small_config(tmp_path, dp=False)

    metrics = _train(cfg).content.metric_records[KEY_METRICS]

    assert metrics["dp"] == 0 and metrics["epsilon"] == -1.0 and metrics["declined"] == 0
    ledger = sim_store(cfg, _user_dir(cfg)).load_ledger(
        target_epsilon=cfg.target_epsilon, target_delta=cfg.target_delta)
    assert ledger.history == [] and ledger.rounds == 1


# What may leave the device beside the DP-trained adapters: public counts and settings,
# and the accountant's epsilon (threat model: "everything that leaves a device is computed
# only from DP-SGD steps and public values"). The noise multiplier is a function of the
# settings and the ledger's history (client.budget), public like the epsilon.
PUBLIC_TRAIN_METRICS = {"num-examples", "persona-index", "user-index", "dp", "declined",
                        "steps", "epsilon", "train-loss",  # train-loss: noisy and accounted
                        "noise-multiplier"}


def test_train_metrics_hold_only_public_values(trained):
    _, reply = trained

    metrics = reply.content.metric_records[KEY_METRICS]

    assert set(metrics) <= PUBLIC_TRAIN_METRICS


def test_zero_local_steps_is_rejected_or_handled(tmp_path):
    try:
        cfg = small_config(tmp_path, local_steps=0)
    except ConfigError:
        return  # a fix that forbids the setting is fine too

    reply = _train(cfg)

    assert reply.content.metric_records[KEY_METRICS]["declined"] in (0, 1)


@pytest.mark.parametrize("fraction", [0.0, 0.25])
def test_the_user_adapter_is_checked_on_held_out_lines_and_the_check_stays_on_device(
        tmp_path, caplog, fraction):
    # Arrange
    cfg = small_config(tmp_path, user_holdout_fraction=fraction, user_steps=3)

    # Act
    with caplog.at_level(logging.INFO, logger="fedpersona.client"):
        reply = _train(cfg)

    # Assert: the device logs the check; its outcome decides what is on disk
    checks = [r.getMessage() for r in caplog.records if "held-out loss" in r.getMessage()]
    assert len(checks) == (1 if fraction else 0)
    kept = not checks or checks[0].endswith("new user adapter kept")
    assert kept or checks[0].endswith("new user adapter discarded")
    stored = sim_store(cfg, _user_dir(cfg)).load_user_adapter()
    initial = get_runtime(cfg).initial["user"]
    assert any(not torch.equal(stored[k], initial[k]) for k in initial) == kept
    # nothing about the check is released with the update; the evaluation (a
    # simulation's measurement, like its test losses) reports the device's tally
    assert set(reply.content.metric_records[KEY_METRICS]) == {
        "num-examples", "user-index", "dp", "declined", "persona-index", "steps",
        "train-loss", "epsilon", "noise-multiplier"}
    state = initial_server_state(cfg)
    scores = evaluate(round_message(cfg, state, "a", MessageType.EVALUATE), node_context(0))
    metrics = scores.content.metric_records[KEY_METRICS]
    assert (metrics["user-checks"], metrics["user-kept"]) == (len(checks), int(
        bool(checks) and kept))


def test_the_user_adapter_is_fitted_under_the_received_levels_not_the_devices_own_step(
        tmp_path, monkeypatch):
    # Arrange: shared levels that are not at their initialisation, and a spy on the
    # user adapter's training that notes the shared slots it trains under
    cfg = small_config(tmp_path)
    state = initial_server_state(cfg)
    state.global_state = randomize_level(tiny_peft(), "global", scale=0.05, seed=3)
    state.persona_states["a"] = randomize_level(tiny_peft(), "persona", scale=0.05, seed=4)
    msg = round_message(cfg, state, "a", MessageType.TRAIN)
    received = {key: record_to_state(msg.content[key]) for key in (KEY_GLOBAL, KEY_PERSONA)}
    under: dict = {}

    def spy(model, *args, **kwargs):
        under.update({KEY_GLOBAL: level_state(model, "global"),
                      KEY_PERSONA: level_state(model, "persona")})
        return real(model, *args, **kwargs)

    real = device_round.train_user_checked
    monkeypatch.setattr(device_round, "train_user_checked", spy)

    # Act
    reply = train(msg, node_context(0))

    # Assert: the device's released step moved every sent tensor, yet the user adapter
    # was trained under exactly what the server sent
    for key in (KEY_GLOBAL, KEY_PERSONA):
        released = record_to_state(reply.content[key])
        assert released.keys() == received[key].keys()
        for name, tensor in received[key].items():
            assert not torch.equal(released[name], tensor), name
            assert torch.equal(under[key][name], tensor), name


@pytest.mark.parametrize(("noise_multiplier", "expected_lr"), [(0.5, 3.0), (4.0, 0.75)])
def test_the_released_step_shrinks_with_the_rounds_noise(tmp_path, monkeypatch,
                                                          noise_multiplier, expected_lr):
    # Arrange: a fixed noise multiplier (the accounted one), a spy on the released training
    cfg = small_config(tmp_path, **{**FIXED_NOISE, "noise_multiplier": noise_multiplier,
                                    "learning_rate": 3.0, "local_optimizer": "sgd"},
                       lr_noise_reference=1.0, target_epsilon=1000.0)
    used = []

    def spy(*args, **kwargs):
        used.append(kwargs["lr"])
        return real(*args, **kwargs)

    real = device_round.train_released
    monkeypatch.setattr(device_round, "train_released", spy)

    # Act
    reply = _train(cfg)

    # Assert: learning-rate x reference / sigma above the reference, and the round's
    # sigma is the one reported (and accounted)
    assert used == [pytest.approx(expected_lr)]
    metrics = reply.content[KEY_METRICS]
    assert metrics["noise-multiplier"] == pytest.approx(noise_multiplier)


# -- query ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("partition", "persona_index"), [(0, 0), (1, 1), (2, 0)])
def test_query_reports_the_persona_index(tmp_path, partition, persona_index):
    cfg = small_config(tmp_path)
    msg = round_message(cfg, initial_server_state(cfg), None, MessageType.QUERY,
                        server_round=0)

    reply = query(msg, node_context(partition))

    metrics = reply.content.metric_records[KEY_METRICS]
    assert metrics["persona-index"] == persona_index
    assert metrics["user-index"] == partition
    assert metrics["num-examples"] == 20
    assert set(reply.content.keys()) == {KEY_METRICS}


def test_query_rejects_a_partition_beyond_the_population(tmp_path):
    cfg = small_config(tmp_path)
    msg = round_message(cfg, initial_server_state(cfg), None, MessageType.QUERY)

    with pytest.raises(ValueError, match="partition-id 3"):
        query(msg, node_context(3))


# -- evaluate ---------------------------------------------------------------------------------

def _evaluate(cfg):
    msg = round_message(cfg, initial_server_state(cfg), "a", MessageType.EVALUATE)
    return evaluate(msg, node_context(0)).content.metric_records[KEY_METRICS]


def test_evaluate_reports_every_level_and_initial_adapters_change_nothing(tmp_path):
    # Arrange
    cfg = small_config(tmp_path)

    # Act
    metrics = _evaluate(cfg)

    # Assert
    assert metrics["num-examples"] == 4
    for level in EVAL_LEVELS:
        assert metrics[f"{level}/tokens"] > 0
        assert 0 <= metrics[f"{level}/correct"] <= metrics[f"{level}/tokens"]
        assert math.isfinite(metrics[f"{level}/nll-sum"]) and metrics[f"{level}/nll-sum"] > 0
    # B = 0 at initialisation: no adapter level changes the base model's output
    for level in ("global", "global+persona", "global+persona+user"):
        assert metrics[f"{level}/nll-sum"] == pytest.approx(metrics["base/nll-sum"],
                                                            rel=1e-6, abs=1e-6)
        assert metrics[f"{level}/tokens"] == metrics["base/tokens"]


def test_evaluate_uses_the_saved_user_adapter(trained):
    # Arrange: the training round saved a user adapter on the device
    cfg, _ = trained

    # Act
    metrics = _evaluate(cfg)

    # Assert: the server sent initial released adapters, so only the user level differs
    assert metrics["global+persona/nll-sum"] == pytest.approx(metrics["base/nll-sum"], rel=1e-6)
    assert metrics["global+persona+user/nll-sum"] != pytest.approx(metrics["base/nll-sum"],
                                                                   rel=1e-6)


def _final_message(cfg, state):
    msg = round_message(cfg, state, "a", MessageType.EVALUATE)
    msg.content[KEY_ROUND] = round_record(1, ("a", "b"), final=True)
    return msg


def test_the_final_evaluation_fits_the_user_adapter_under_the_final_levels_once(tmp_path):
    # Arrange: final levels away from their initialisation; no holdout, so the fit is kept
    cfg = small_config(tmp_path, user_holdout_fraction=0.0, user_final_steps=2)
    store = sim_store(cfg, _user_dir(cfg))
    state = initial_server_state(cfg)
    state.global_state = randomize_level(tiny_peft(), "global", scale=0.05, seed=3)
    evaluate(round_message(cfg, state, "a", MessageType.EVALUATE), node_context(0))
    assert store.load_user_adapter() is None  # a round's evaluation only measures

    # Act
    first = evaluate(_final_message(cfg, state), node_context(0))
    fitted = store.load_user_adapter()
    again = evaluate(_final_message(cfg, state), node_context(0))

    # Assert: fitted before the measurement, which serves it; not fitted twice
    initial = get_runtime(cfg).initial["user"]
    assert fitted is not None and any(not torch.equal(fitted[k], initial[k]) for k in initial)
    metrics = first.content.metric_records[KEY_METRICS]
    assert metrics["global+persona+user/nll-sum"] != pytest.approx(
        metrics["global+persona/nll-sum"], rel=1e-6)
    assert all(torch.equal(fitted[k], v) for k, v in store.load_user_adapter().items())
    assert dict(again.content.metric_records[KEY_METRICS]) == dict(metrics)


def test_no_final_fit_when_user_final_steps_is_zero(tmp_path):
    cfg = small_config(tmp_path, user_holdout_fraction=0.0, user_final_steps=0)

    evaluate(_final_message(cfg, initial_server_state(cfg)), node_context(0))

    assert sim_store(cfg, _user_dir(cfg)).load_user_adapter() is None


# -- what runs is what is counted ----------------------------------------------------------

def test_the_ledger_records_the_entries_the_mechanisms_returned(tmp_path, monkeypatch):
    # Arrange: spies on the two mechanisms of a declared-persona round
    cfg = small_config(tmp_path, **FIXED_NOISE)
    returned = []

    def spy_steps(*args, **kwargs):
        result = real_steps(*args, **kwargs)
        returned.append(result.accountant_entry)
        return result

    def spy_loss(*args, **kwargs):
        value, entry = real_loss(*args, **kwargs)
        returned.append(entry)
        return value, entry

    real_steps, real_loss = device_round.train_released, device_round.private_mean_loss
    monkeypatch.setattr(device_round, "train_released", spy_steps)
    monkeypatch.setattr(device_round, "private_mean_loss", spy_loss)

    # Act
    _train(cfg)

    # Assert: the ledger holds what the two mechanisms returned (here at the same noise
    # and rate, so composed as one more step), and nothing else
    ledger = sim_store(cfg, _user_dir(cfg)).load_ledger(
        target_epsilon=cfg.target_epsilon, target_delta=cfg.target_delta,
        accountant=cfg.accountant)
    sigma, rate, steps = returned[0]
    assert returned[1] == (sigma, rate, 1)
    assert [tuple(entry) for entry in ledger.history] == [(sigma, rate, steps + 1)]


def test_a_mechanism_that_ran_other_than_planned_releases_nothing(tmp_path, monkeypatch):
    # Arrange: DP-SGD that reports one step more than the budget planned for
    cfg = small_config(tmp_path, **FIXED_NOISE)

    def over_stepping(*args, **kwargs):
        result = real(*args, **kwargs)
        sigma, rate, steps = result.accountant_entry
        return dataclasses.replace(result, accountant_entry=(sigma, rate, steps + 1))

    real = device_round.train_released
    monkeypatch.setattr(device_round, "train_released", over_stepping)

    # Act / Assert: refused before the ledger or any reply is written
    with pytest.raises(DPTrainingError, match="budget planned"):
        _train(cfg)
    store = sim_store(cfg, _user_dir(cfg))
    assert store.ledger_json() is None
    assert store.load_user_adapter() is None
