"""The wire log records each reply as it leaves the ClientApp, and the wire check holds
it to what may leave: adapter tensors of the expected names and shapes, scalar metrics."""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, ConfigRecord, MessageType, MetricRecord
from helpers import initial_server_state, node_context, round_message, small_config

from client.client_app import make_client_app
from client.store import DeviceStore
from client.wire_log import WIRE_LOG, read_wire_log
from server.strategy import sent_part
from shared.federation import load_run_population
from shared.runtime import get_runtime
from shared.wire import KEY_GLOBAL, KEY_METRICS
from shared.wire_check import check_entries


def _expected(cfg):
    return {k: tuple(v.shape) for k, v in sent_part(get_runtime(cfg).initial["global"],
                                                     cfg.lora_scheme).items()}


def _run(cfg, app, *, rounds=2, partition=0):
    state = initial_server_state(cfg)
    for server_round in range(1, rounds + 1):
        for kind in (MessageType.TRAIN, MessageType.EVALUATE):
            msg = round_message(cfg, state, "a", kind, server_round=server_round)
            reply = app(msg, node_context(partition))
            assert not reply.has_error(), reply.error
    user_dir = load_run_population(cfg).user_dir("u1")
    return read_wire_log(DeviceStore(user_dir, cfg.federation_key).root / WIRE_LOG)


def test_every_reply_is_logged_and_a_normal_client_passes(tmp_path):
    cfg = small_config(tmp_path, user_steps=2)

    entries = _run(cfg, make_client_app())

    assert [(e["message_type"], e["server_round"]) for e in entries] == [
        ("train", 1), ("evaluate", 1), ("train", 2), ("evaluate", 2)]
    train = entries[0]["records"]
    assert set(train) == {"global", "persona", "metrics"}
    assert {k: tuple(v["shape"]) for k, v in train["global"]["arrays"].items()} == _expected(cfg)
    assert all(v["dtype"] == "float32" and len(v["sha256"]) == 64
               for v in train["global"]["arrays"].values())
    assert train["metrics"]["values"]["num-examples"] == 20
    assert check_entries(entries, _expected(cfg)) == []


def _leak_string(msg, context, call_next):
    reply = call_next(msg, context)
    reply.content["note"] = ConfigRecord({"text": "Now, good Peter Quince"})
    return reply


def _leak_user_adapter(msg, context, call_next):
    """Send the on-device user adapter's B tensors under the global record's names."""
    reply = call_next(msg, context)
    if msg.metadata.message_type == MessageType.TRAIN:
        from client.node import resolve_user
        from shared.wire import read_run_config

        cfg = read_run_config(msg.content["config"])
        user = DeviceStore(resolve_user(context, cfg)[0], cfg.federation_key).load_user_adapter()
        record = reply.content[KEY_GLOBAL]
        for key in list(record):
            record[key] = Array(user[key].numpy())
    return reply


def _leak_token_ids(msg, context, call_next):
    reply = call_next(msg, context)
    if msg.metadata.message_type == MessageType.TRAIN:
        import numpy as np

        reply.content["tokens"] = ArrayRecord({"ids": Array(np.arange(12, dtype=np.int64))})
        reply.content[KEY_METRICS]["first-token"] = 4712
        reply.content[KEY_METRICS]["lengths"] = [3.0, 9.0]
    return reply


def test_a_client_that_sends_a_string_fails_the_audit(tmp_path):
    cfg = small_config(tmp_path)

    problems = check_entries(_run(cfg, make_client_app(_leak_string), rounds=1), _expected(cfg))

    assert len(problems) == 2  # the train and the evaluate reply
    assert all("record 'note' is a config record" in p and "text: str" in p for p in problems)


def test_a_client_that_sends_its_user_adapter_fails_the_audit(tmp_path):
    cfg = small_config(tmp_path, user_steps=3)

    problems = check_entries(_run(cfg, make_client_app(_leak_user_adapter), rounds=2),
                             _expected(cfg))

    # round 1: the user adapter is saved after the reply is built, and the mod copies
    # the saved one, so every tensor of both train replies is flagged
    assert problems and all("equals a tensor of the on-device user adapter" in p
                            for p in problems)
    assert len(problems) == 2 * len(_expected(cfg))


def test_token_ids_and_unlisted_or_list_metrics_fail_the_audit(tmp_path):
    cfg = small_config(tmp_path)

    problems = check_entries(_run(cfg, make_client_app(_leak_token_ids), rounds=1),
                             _expected(cfg))

    assert any("record 'tokens'" in p for p in problems)
    assert any("metric 'first-token' is not one a train reply may send" in p for p in problems)
    assert any("metric 'lengths'" in p for p in problems)


def test_check_entries_names_shape_and_dtype_problems():
    expected = {"layer.lora_B.weight": (8, 4)}
    entry = {"message_type": "train", "server_round": 3, "records": {
        "global": {"kind": "arrays", "arrays": {
            "layer.lora_B.weight": {"dtype": "float32", "shape": [8, 5]},
            "layer.lora_A.weight": {"dtype": "int64", "shape": [4, 8]}}},
        "persona": {"kind": "arrays", "arrays": {}},
        "metrics": {"kind": "metrics", "values": {"epsilon": 1.5, "dp": True}}}}

    problems = check_entries([entry], expected)

    assert problems == [
        "entry 1 (train, round 3): global: unexpected tensor 'layer.lora_A.weight' [4, 8]",
        "entry 1 (train, round 3): global: tensor 'layer.lora_B.weight' has shape [8, 5], "
        "expected [8, 4]",
        "entry 1 (train, round 3): global: tensor 'layer.lora_A.weight' has dtype int64 "
        "(only floats may leave; integers can carry token ids)",
        "entry 1 (train, round 3): persona: tensor 'layer.lora_B.weight' missing",
        "entry 1 (train, round 3): metric 'dp' is a bool, not a scalar number"]
    assert check_entries([{"unreadable": "wire.jsonl:4"}], expected) == [
        "entry 1: unreadable log line wire.jsonl:4"]
    assert check_entries([{"message_type": "reconnect", "server_round": 1}], {}) == [
        "entry 1 (reconnect, round 1): unknown message type 'reconnect'"]


def test_mod_records_nothing_but_passes_the_reply_when_it_cannot_log(tmp_path):
    cfg = small_config(tmp_path)
    app = make_client_app()
    state = initial_server_state(cfg)
    msg = round_message(cfg, state, "a", MessageType.TRAIN)
    store_root = DeviceStore(load_run_population(cfg).user_dir("u1"), cfg.federation_key).root
    store_root.mkdir(parents=True)
    (store_root / WIRE_LOG).mkdir()  # a directory where the log file should be

    reply = app(msg, node_context(0))

    assert not reply.has_error()
    assert isinstance(reply.content[KEY_METRICS], MetricRecord)
