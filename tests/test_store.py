"""The on-device store (client.store) and the privacy ledger it persists (shared.privacy.accounting)."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from helpers import randomize_level, tiny_lora, tiny_peft

from client.store import DeviceStore, LedgerError
from shared.config import RunConfig
from shared.model.adapters import AdapterFormatError, level_state, load_level
from shared.privacy.accounting import PrivacyLedger, epsilon

KEY = "federation-1"
DELTA = 1e-5
ENTRY = (1.0, 0.2, 2)  # sigma, q, steps: epsilon about 3.45 at delta 1e-5


@pytest.fixture
def store(tmp_path):
    return DeviceStore.on_device(tmp_path / "user", KEY)


def _spent_ledger(entries=(ENTRY, (1.2, 0.1, 4))) -> PrivacyLedger:
    ledger = PrivacyLedger(target_epsilon=8.0, target_delta=DELTA)
    for entry in entries:
        ledger.record(entry)
    return ledger


# -- ledger persistence ------------------------------------------------------------------------

def test_fresh_store_gives_an_empty_ledger(store):
    ledger = store.load_ledger(target_epsilon=8.0, target_delta=DELTA)

    assert ledger.history == [] and ledger.rounds == 0 and ledger.epsilon == 0.0
    assert not store.ledger_path.exists()


def test_ledger_persists_across_store_instances(tmp_path):
    # Arrange
    ledger = _spent_ledger()
    DeviceStore.on_device(tmp_path / "user", KEY).save_ledger(ledger)

    # Act
    loaded = DeviceStore.on_device(tmp_path / "user", KEY).load_ledger(target_epsilon=8.0,
                                                                       target_delta=DELTA)

    # Assert
    assert loaded.history == [(1.0, 0.2, 2), (1.2, 0.1, 4)]
    assert loaded.rounds == 2
    assert loaded.epsilon == ledger.epsilon > 0
    assert loaded.epsilon == epsilon(ledger.history, delta=DELTA)
    on_disk = json.loads(DeviceStore.on_device(tmp_path / "user", KEY).ledger_path.read_text())
    assert on_disk["accountant"] == "rdp" and on_disk["epsilon"] == pytest.approx(ledger.epsilon)


def test_loading_may_tighten_but_not_loosen_the_budget(store):
    store.save_ledger(PrivacyLedger(target_epsilon=4.0, target_delta=DELTA))

    assert store.load_ledger(target_epsilon=2.0, target_delta=DELTA).target_epsilon == 2.0
    assert store.load_ledger(target_epsilon=9.0, target_delta=DELTA).target_epsilon == 4.0


@pytest.mark.parametrize("content", [
    "{not json",
    "",
    json.dumps({"target_epsilon": 8.0, "history": []}),  # no delta
    json.dumps({"target_epsilon": 8.0, "target_delta": 1e-5, "history": [[1.0, 0.2]]}),
    json.dumps([1, 2, 3]),
    "null",
    json.dumps("ledger"),
])
def test_corrupt_ledger_raises(store, content):
    # Arrange
    store.ledger_path.parent.mkdir(parents=True)
    store.ledger_path.write_text(content)

    # Act / Assert
    with pytest.raises(LedgerError, match="unreadable privacy ledger"):
        store.load_ledger(target_epsilon=8.0, target_delta=DELTA)


def test_changing_delta_raises(store):
    store.save_ledger(_spent_ledger())

    with pytest.raises(LedgerError, match="delta"):
        store.load_ledger(target_epsilon=8.0, target_delta=1e-6)


def test_ledger_write_leaves_no_staging_files(store):
    store.save_ledger(_spent_ledger())
    store.save_ledger(_spent_ledger([ENTRY]))

    assert sorted(p.name for p in store.ledger_path.parent.iterdir()) == ["ledger.json"]


# -- the budget ----------------------------------------------------------------------------------

def test_budget_refuses_an_entry_that_passes_the_target():
    # Arrange
    ledger = PrivacyLedger(target_epsilon=4.0, target_delta=DELTA)
    one = ledger.epsilon_after(ENTRY)
    assert 3.0 < one < 4.0  # about 3.45; two such runs compose to about 4.24

    # Act
    affordable_first = ledger.can_afford(ENTRY)
    ledger.record(ENTRY)
    affordable_second = ledger.can_afford(ENTRY)

    # Assert
    assert affordable_first
    assert ledger.epsilon == pytest.approx(one)
    assert ledger.epsilon_after(ENTRY) > 4.0
    assert not affordable_second
    assert not PrivacyLedger(target_epsilon=0.01, target_delta=DELTA).can_afford(ENTRY)


def test_epsilon_never_decreases_as_entries_compose():
    ledger = PrivacyLedger(target_epsilon=100.0, target_delta=DELTA)
    spent = [ledger.epsilon]
    for entry in [ENTRY, (2.0, 0.05, 10), (1.0, 0.2, 0), (0.8, 0.5, 1)]:
        ledger.record(entry)
        spent.append(ledger.epsilon)

    assert all(b >= a for a, b in itertools.pairwise(spent))
    assert spent[3] == spent[2]  # a zero-step run spends nothing
    assert ledger.rounds == 4 and len(ledger.history) == 3


@pytest.mark.parametrize("entry", [(0.0, 0.2, 1), (1.0, 0.0, 1), (1.0, 1.5, 1),
                                   (1.0, 0.2, -1), (math.inf, 0.2, 1), (math.nan, 0.2, 1)])
def test_ledger_rejects_invalid_entries(entry):
    ledger = PrivacyLedger(target_epsilon=8.0, target_delta=DELTA)

    with pytest.raises(ValueError, match="invalid accountant entry"):
        ledger.record(entry)
    assert ledger.history == [] and ledger.rounds == 0


# -- the user adapter --------------------------------------------------------------------------

def test_user_adapter_round_trip(store):
    # Arrange
    model = tiny_peft()
    load_level(model, "user", randomize_level(model, "user", scale=0.3, seed=1))
    state = level_state(model, "user")

    # Act
    assert store.load_user_adapter() is None
    store.save_user_adapter(state, tiny_lora())
    loaded = store.load_user_adapter()

    # Assert
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert (store.user_adapter_path / "adapter_config.json").is_file()


def test_user_adapter_overwrite_keeps_only_the_new_one(store):
    model = tiny_peft()
    first = randomize_level(model, "user", scale=0.3, seed=1)
    second = randomize_level(model, "user", scale=0.3, seed=2)

    store.save_user_adapter(first, tiny_lora())
    store.save_user_adapter(second, tiny_lora())

    loaded = store.load_user_adapter()
    assert all(torch.equal(loaded[k], second[k]) for k in second)
    assert sorted(p.name for p in store.root.iterdir()) == ["user_adapter"]


def test_corrupt_user_adapter_raises(store):
    store.save_user_adapter(randomize_level(tiny_peft(), "user", scale=0.3, seed=1), tiny_lora())
    (store.user_adapter_path / "adapter_model.safetensors").write_bytes(b"garbage")

    with pytest.raises(AdapterFormatError, match="corrupt"):
        store.load_user_adapter()


# -- one budget per device, one state per federation --------------------------------------------

def test_two_federations_on_one_device_spend_one_budget_and_keep_their_own_adapters(tmp_path):
    # Arrange: federation one spends and trains a user adapter
    one = DeviceStore.on_device(tmp_path / "user", "key-one")
    other = DeviceStore.on_device(tmp_path / "user", "key-two")
    ledger = one.load_ledger(target_epsilon=8.0, target_delta=DELTA)
    ledger.record(ENTRY, federation=one.federation)
    one.save_ledger(ledger)
    one.save_user_adapter(randomize_level(tiny_peft(), "user", scale=0.3, seed=1), tiny_lora())

    # Act: federation two (a new run, a new server) opens the same device
    seen = other.load_ledger(target_epsilon=8.0, target_delta=DELTA)
    seen.record(ENTRY, federation=other.federation)
    other.save_ledger(seen)
    again = one.load_ledger(target_epsilon=8.0, target_delta=DELTA)

    # Assert: the spending composes; the adapters do not mix
    assert one.ledger_path == other.ledger_path == tmp_path / "user" / ".fedpersona" / "ledger.json"
    assert again.history == [ENTRY, ENTRY] and again.sources == ["key-one", "key-two"]
    assert again.epsilon == pytest.approx(epsilon([ENTRY, ENTRY], delta=DELTA), rel=1e-12)
    assert again.epsilon > epsilon([ENTRY], delta=DELTA)
    assert again.rounds_in("key-one") == again.rounds_in("key-two") == 1 and again.rounds == 2
    assert other.load_user_adapter() is None and one.load_user_adapter() is not None


def test_a_device_keeps_the_strictest_budget_it_was_given(tmp_path):
    store = DeviceStore.on_device(tmp_path / "user", "key-one")
    store.save_ledger(store.load_ledger(target_epsilon=4.0, target_delta=DELTA))

    looser = DeviceStore.on_device(tmp_path / "user", "key-two").load_ledger(
        target_epsilon=50.0, target_delta=DELTA)

    assert looser.target_epsilon == 4.0
    with pytest.raises(LedgerError, match="device's budget is at delta=1e-05, this run asks "
                                          "delta=1e-06"):
        store.load_ledger(target_epsilon=8.0, target_delta=1e-6)


def test_earlier_per_federation_ledgers_are_folded_into_the_device_ledger(tmp_path):
    # Arrange: two ledgers as earlier versions kept them, one per federation directory
    state = tmp_path / "user" / ".fedpersona"
    for key, entry in (("old-a", ENTRY), ("old-b", (1.2, 0.1, 4))):
        (state / key).mkdir(parents=True)
        legacy = {"target_epsilon": 8.0, "target_delta": DELTA, "history": [list(entry)],
                  "rounds": 1, "epsilon": 0.0, "accountant": "rdp",
                  "open_round": [1, "digest", 0, 0]}
        (state / key / "ledger.json").write_text(json.dumps(legacy))

    # Act: a new federation opens the upgraded device
    ledger = DeviceStore.on_device(tmp_path / "user", "new").load_ledger(
        target_epsilon=8.0, target_delta=DELTA)

    # Assert: nothing spent is forgotten, each entry keeps its federation
    assert ledger.history == [ENTRY, (1.2, 0.1, 4)] and ledger.sources == ["old-a", "old-b"]
    assert ledger.federation_rounds == {"old-a": 1, "old-b": 1} and ledger.open_round is None
    assert ledger.epsilon == pytest.approx(epsilon([ENTRY, (1.2, 0.1, 4)], delta=DELTA))


def test_an_unreadable_earlier_ledger_refuses_training(tmp_path):
    (tmp_path / "user" / ".fedpersona" / "old").mkdir(parents=True)
    (tmp_path / "user" / ".fedpersona" / "old" / "ledger.json").write_text("{torn")

    with pytest.raises(LedgerError, match="earlier ledger of this device cannot be composed"):
        DeviceStore.on_device(tmp_path / "user", "new").load_ledger(target_epsilon=8.0,
                                                                    target_delta=DELTA)


def _simulated(tmp_path, run_dir):
    cfg = RunConfig(model="tiny", run_dir=str(run_dir))
    return cfg, DeviceStore.simulated(cfg, "u1", tmp_path / "pop" / "users" / "u1")


def test_a_simulated_device_lives_in_its_run_and_moves_with_it(tmp_path):
    # Arrange: a run's device spends
    _, store = _simulated(tmp_path, tmp_path / "run")
    ledger = store.load_ledger(target_epsilon=8.0, target_delta=DELTA)
    ledger.record(ENTRY, federation=store.federation)
    store.save_ledger(ledger)

    # Act: the run directory is moved; a second run over the same population starts
    (tmp_path / "run").rename(tmp_path / "moved")
    _, moved = _simulated(tmp_path, tmp_path / "moved")
    _, second = _simulated(tmp_path, tmp_path / "second")

    # Assert: the moved run still holds what its device spent; the second run is its own
    assert store.ledger_path == tmp_path / "run" / "devices" / "u1" / "ledger.json"
    assert moved.load_ledger(target_epsilon=8.0, target_delta=DELTA).history == [ENTRY]
    assert second.load_ledger(target_epsilon=8.0, target_delta=DELTA).history == []
    assert not (tmp_path / "pop" / "users" / "u1" / ".fedpersona").exists()


def test_a_simulation_made_before_devices_lived_in_their_run_moves_them_in(tmp_path):
    # Arrange: the device state an earlier version kept in the population
    cfg = RunConfig(model="tiny", run_dir=str(tmp_path / "run"))
    earlier = tmp_path / "pop" / "users" / "u1" / ".fedpersona" / cfg.federation_key
    earlier.mkdir(parents=True)
    legacy = {"target_epsilon": 8.0, "target_delta": DELTA, "history": [list(ENTRY)],
              "rounds": 1, "epsilon": 0.0, "accountant": "rdp", "open_round": None}
    (earlier / "ledger.json").write_text(json.dumps(legacy))
    (earlier / "state.json").write_text('{"cluster": 1}')

    # Act
    store = DeviceStore.simulated(cfg, "u1", tmp_path / "pop" / "users" / "u1")

    # Assert
    assert store.root == tmp_path / "run" / "devices" / "u1" and not earlier.exists()
    assert store.load_ledger(target_epsilon=8.0, target_delta=DELTA).history == [ENTRY]
    assert store.load_state() == {"cluster": 1}


def test_the_ledger_lock_serializes_two_federations(tmp_path):
    import threading

    one = DeviceStore.on_device(tmp_path / "user", "key-one")
    other = DeviceStore.on_device(tmp_path / "user", "key-two")
    order = []

    def spend(store, name):
        with store.ledger_lock():
            ledger = store.load_ledger(target_epsilon=8.0, target_delta=DELTA)
            order.append(f"{name} read")
            threading.Event().wait(0.2)  # the other would read the same spending here
            ledger.record(ENTRY, federation=store.federation)
            store.save_ledger(ledger)
            order.append(f"{name} wrote")

    threads = [threading.Thread(target=spend, args=(s, n)) for s, n in ((one, "a"), (other, "b"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert one.load_ledger(target_epsilon=8.0, target_delta=DELTA).history == [ENTRY, ENTRY]
    assert order[1].endswith("wrote") and order[3].endswith("wrote")


def test_federation_key_depends_on_run_dir_and_adapter_shape():
    base = RunConfig(model="tiny", run_dir="/runs/one")

    assert base.federation_key == RunConfig(model="tiny", run_dir="/runs/one").federation_key
    assert base.federation_key != base.replace(run_dir="/runs/two").federation_key
    assert base.federation_key != base.replace(lora_rank=4).federation_key
    assert base.federation_key == base.replace(num_rounds=99).federation_key


def test_an_unlimited_budget_survives_the_round_trip(tmp_path):
    # no-DP runs use target-epsilon = inf; JSON has no Infinity
    store = DeviceStore.on_device(tmp_path, "fed")
    ledger = store.load_ledger(target_epsilon=math.inf, target_delta=1e-5)
    ledger.record()
    store.save_ledger(ledger)

    again = DeviceStore.on_device(tmp_path, "fed").load_ledger(target_epsilon=math.inf,
                                                               target_delta=1e-5)

    assert again.target_epsilon == math.inf and again.rounds == 1


# -- the device secret behind every DP random draw ---------------------------------------------

def test_device_secret_is_made_once_private_and_stable(tmp_path):
    from client.store import SECRET_BYTES, device_secret

    first = device_secret(tmp_path / "u1")
    path = tmp_path / "u1" / ".fedpersona" / "device-secret"
    assert len(first) == SECRET_BYTES and path.read_bytes() == first
    assert path.stat().st_mode & 0o777 == 0o600
    assert device_secret(tmp_path / "u1") == first
    assert device_secret(tmp_path / "u2") != first


def test_a_torn_device_secret_is_replaced(tmp_path):
    from client.store import SECRET_BYTES, device_secret

    path = tmp_path / ".fedpersona" / "device-secret"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"short")
    secret = device_secret(tmp_path)
    assert len(secret) == SECRET_BYTES and path.read_bytes() == secret


def test_dp_noise_is_not_reproducible_from_public_values(tmp_path):
    """The same user id, run seed and round on two devices (two secrets) train differently:
    the server, which knows all three, cannot regenerate a device's noise."""
    import shutil

    from helpers import (
        FIXED_NOISE,
        initial_server_state,
        node_context,
        round_message,
        small_config,
    )

    from client.client_app import train
    from shared.protocol.records import record_to_state
    from shared.protocol.wire import KEY_GLOBAL

    # a fixed noise multiplier: a calibrated one follows the device's spend, which the
    # second call on the same device has changed (the first call's round is closed)
    cfg = small_config(tmp_path / "one", **FIXED_NOISE)
    shutil.copytree(tmp_path / "one" / "pop", tmp_path / "two" / "pop")
    cfg_two = small_config(tmp_path / "two", run_dir=cfg.run_dir, **FIXED_NOISE)
    state = initial_server_state(cfg)

    replies = []
    for c in (cfg, cfg, cfg_two):
        # no replay: each call trains (the second one from the same secret and question)
        for replay in (tmp_path / "one" / "pop").rglob("replay*"):
            replay.unlink()
        replies.append(train(round_message(c, state, "a", "train"), node_context(0)))

    first, again, other = (record_to_state(r.content[KEY_GLOBAL]) for r in replies)
    assert all(torch.equal(first[k], again[k]) for k in first)  # a device reproduces itself
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_user_adapter_settings_do_not_change_what_a_device_releases(tmp_path):
    """The user adapter trains after the reply is final and is inactive in DP training:
    its settings are no input of the reply, so the same draws give the same bytes (and
    a comparison of user-adapter settings is paired at the shared levels)."""
    from helpers import (
        FIXED_NOISE,
        initial_server_state,
        node_context,
        round_message,
        small_config,
    )

    from client.client_app import train
    from shared.protocol.records import record_to_state
    from shared.protocol.wire import KEY_GLOBAL, KEY_PERSONA

    # a fixed noise multiplier: a calibrated one would follow the spend of each call
    cfg = small_config(tmp_path, **FIXED_NOISE)
    state = initial_server_state(cfg)
    replies = [train(round_message(c, state, "a", "train"), node_context(0))
               for c in (cfg, cfg.replace(user_steps=4, user_learning_rate=0.05,
                                          user_holdout_fraction=0.0))]

    for key in (KEY_GLOBAL, KEY_PERSONA):
        a, b = (record_to_state(r.content[key]) for r in replies)
        assert all(torch.equal(a[k], b[k]) for k in a)
    changed = cfg.replace(learning_rate=cfg.learning_rate * 2)
    other = record_to_state(train(round_message(changed, state, "a", "train"),
                                  node_context(0)).content[KEY_GLOBAL])
    first = record_to_state(replies[0].content[KEY_GLOBAL])
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_training_draws_depend_on_every_training_input_and_nothing_else(tmp_path):
    """Same secret, same round, a different question (here: the learning rate) gives other
    draws, so two releases never share their noise; where the run lives does not."""
    from helpers import initial_server_state, round_message, small_config

    from client.replay import NOT_TRAINING_INPUTS, SECAGG_RECORD, content_digest
    from shared.config import RunConfig

    assert set(RunConfig().to_flower()) >= NOT_TRAINING_INPUTS
    cfg = small_config(tmp_path)
    state = initial_server_state(cfg)

    def digest(c):
        return content_digest(round_message(c, state, "a", "train").content,
                              config_ignore=NOT_TRAINING_INPUTS)

    assert digest(cfg) == digest(cfg.replace(run_dir=str(tmp_path / "elsewhere")))
    assert digest(cfg) != digest(cfg.replace(learning_rate=cfg.learning_rate * 2))
    assert digest(cfg) != content_digest(round_message(cfg, state, None, "train").content,
                                         config_ignore=NOT_TRAINING_INPUTS)
    message = round_message(cfg, state, "a", "train")
    before = content_digest(message.content)
    from flwr.app import ConfigRecord
    message.content[SECAGG_RECORD] = ConfigRecord({"stage": "setup"})
    assert content_digest(message.content) == before  # protocol state is not a question
