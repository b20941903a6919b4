"""The wire log records each reply as it leaves the ClientApp, and the wire check holds
it to what may leave: adapter tensors of the expected names and shapes, scalar metrics."""

from __future__ import annotations

import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MessageType, MetricRecord
from helpers import initial_server_state, node_context, round_message, sim_store, small_config

from client.client_app import make_client_app
from client.mods.wire_log import WIRE_LOG, read_wire_log
from server.strategy import sent_part
from shared.data.federation import load_run_population
from shared.model.runtime import get_runtime
from shared.protocol.wire import KEY_GLOBAL, KEY_METRICS
from shared.protocol.wire_check import check_entries


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
    return read_wire_log(sim_store(cfg, user_dir).root / WIRE_LOG)


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
        from shared.protocol.wire import read_run_config

        cfg = read_run_config(msg.content["config"])
        user = sim_store(cfg, resolve_user(context, cfg)[0]).load_user_adapter()
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
        ("entry 1 (train, round 3): global: tensor 'layer.lora_B.weight' has shape [8, 5], "
        "expected [8, 4]"),
        ("entry 1 (train, round 3): global: tensor 'layer.lora_A.weight' has dtype int64 "
        "(only floats may leave; integers can carry token ids)"),
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
    store_root = sim_store(cfg, load_run_population(cfg).user_dir("u1")).root
    store_root.mkdir(parents=True)
    (store_root / WIRE_LOG).mkdir()  # a directory where the log file should be

    reply = app(msg, node_context(0))

    assert not reply.has_error()
    assert isinstance(reply.content[KEY_METRICS], MetricRecord)


# -- SecAgg+ stage replies ------------------------------------------------------------------

SECAGG_SHAPES = {"b.weight": (2, 3), "a.weight": (4,)}  # sorted: a, then b


def _blob(shape, dtype="int64"):
    import numpy as np
    from flwr.common import ndarray_to_bytes

    return ndarray_to_bytes(np.zeros(shape, dtype=dtype))


def _config(name, values):
    from client.mods.wire_log import _describe_value
    from shared.protocol.wire_check import SECAGG_MASKED, SECAGG_RECORD

    return {"kind": "config", "values": {k: type(v).__name__ for k, v in values.items()},
            "details": {k: _describe_value(v, arrays=name == SECAGG_RECORD
                                           and k == SECAGG_MASKED)
                        for k, v in values.items()}}


def _secagg_entry(stage, *, slots=2, peers=3):
    """A well-formed log entry of one stage's reply, as the wire log describes it."""
    node_ids = [4819587513456703152, 10990779304872876590, 9571348760588425560][:peers]
    secagg = {"stage": stage}
    if stage == "setup":
        configs = {"pk1": b"k" * 215, "pk2": b"K" * 215}
    elif stage == "share_keys":
        secagg["peers"] = peers
        configs = {"dsts": node_ids[1:], "ctxts": [b"c" * 612] * (peers - 1)}
    elif stage == "collect_masked_vectors":
        secagg["persona_slots"] = slots
        configs = {"masked_params": [_blob((1,))] + [_blob((4,)), _blob((2, 3))] * (slots + 1)}
    else:
        secagg["nodes"] = peers
        configs = {"nids": node_ids, "shares": [b"s" * 52] * peers}
    records = {"secaggplus_configs": _config("secaggplus_configs", configs)}
    if stage == "collect_masked_vectors":
        records |= {
            "fitres.metrics": _config("fitres.metrics", {
                "num-examples": 20, "user-index": 1, "dp": 1, "declined": 0,
                "persona-index": 0, "steps": 2, "train-loss": 4.1, "epsilon": 3.2}),
            "fitres.num_examples": {"kind": "metrics", "values": {"num_examples": 20}},
            "fitres.parameters": {"kind": "arrays", "arrays": {}},
            "fitres.status": _config("fitres.status", {"code": 0, "message": ""})}
    return {"message_type": "train", "server_round": 2, "error": False, "secagg": secagg,
            "records": records}


SECAGG_STAGES = ("setup", "share_keys", "collect_masked_vectors", "unmask")


def test_secagg_names_are_flowers():
    from flwr.common.secure_aggregation.secaggplus_constants import (
        RECORD_KEY_CONFIGS,
        Key,
        Stage,
    )

    from shared.protocol import wire_check
    assert wire_check.SECAGG_RECORD == RECORD_KEY_CONFIGS
    assert wire_check.SECAGG_STAGE == Key.STAGE
    assert wire_check.SECAGG_MASKED == Key.MASKED_PARAMETERS
    assert wire_check.SECAGG_STAGES == Stage.all() == SECAGG_STAGES
    assert wire_check.SECAGG_REPLY["setup"].keys() == {Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2}
    assert wire_check.SECAGG_REPLY["share_keys"].keys() == {Key.DESTINATION_LIST,
                                                             Key.CIPHERTEXT_LIST}
    assert wire_check.SECAGG_REPLY["unmask"].keys() == {Key.NODE_ID_LIST, Key.SHARE_LIST}


def test_a_well_formed_reply_to_each_secagg_stage_passes():
    entries = [_secagg_entry(stage) for stage in SECAGG_STAGES]
    dropout = {"message_type": "train", "server_round": 2, "error": True,
               "secagg": {"stage": "collect_masked_vectors", "persona_slots": 2},
               "records": {}}

    assert check_entries([*entries, dropout], SECAGG_SHAPES) == []


def test_an_extra_key_a_string_or_an_extra_record_in_a_secagg_reply_fails():
    setup = _secagg_entry("setup")
    setup["records"]["secaggplus_configs"] = _config("secaggplus_configs", {
        "pk1": b"k" * 215, "pk2": "Now, good Peter Quince", "note": b"x"})
    share = _secagg_entry("share_keys")
    share["records"]["note"] = _config("note", {"text": "Now, good Peter Quince"})
    unmask = _secagg_entry("unmask")
    unmask["records"]["secaggplus_configs"] = _config("secaggplus_configs", {
        "nids": [1, 2, 3], "shares": [b"s" * 52, b"s" * 52, "s" * 52]})

    problems = check_entries([setup, share, unmask], SECAGG_SHAPES)

    assert problems == [
        ("entry 1 (train, SecAgg+ setup, round 2): secaggplus_configs: unexpected key "
        "'note' (bytes)"),
        ("entry 1 (train, SecAgg+ setup, round 2): secaggplus_configs: 'pk2' is a str, "
        "expected bytes"),
        ("entry 2 (train, SecAgg+ share_keys, round 2): record 'note' (config) may not leave "
        "in a SecAgg+ share_keys reply"),
        ("entry 3 (train, SecAgg+ unmask, round 2): secaggplus_configs: 'shares' holds bytes, "
        "str, expected only bytes")]


def test_the_masking_stage_allows_only_flowers_fitres_records_and_the_exact_layout():
    extra = _secagg_entry("collect_masked_vectors")
    extra["records"]["global"] = {"kind": "arrays", "arrays": {
        "a.weight": {"dtype": "float32", "shape": [4]}}}
    extra["records"]["fitres.status"] = _config("fitres.status",
                                                {"code": 0, "message": "Peter"})
    extra["records"]["fitres.metrics"] = _config("fitres.metrics",
                                                 {"num-examples": 20, "first-token": 4712,
                                                  "epsilon": "3.2"})
    extra["records"]["fitres.parameters"]["arrays"] = {"a.weight": {"dtype": "float32"}}
    slots = _secagg_entry("collect_masked_vectors", slots=3)
    slots["secagg"]["persona_slots"] = 2  # the round had 2 personas, the vector 3 slots
    tokens = _secagg_entry("collect_masked_vectors")
    blobs = [_blob((1,)), _blob((4,)), _blob((2, 3), "int32"), _blob((4,)) + b"hidden",
             _blob((3, 2))] + [_blob((4,)), _blob((2, 3))]
    tokens["records"]["secaggplus_configs"] = _config("secaggplus_configs",
                                                      {"masked_params": blobs})

    problems = check_entries([extra, slots, tokens], SECAGG_SHAPES)

    where = "(train, SecAgg+ collect_masked_vectors, round 2)"
    assert problems == [
        (f"entry 1 {where}: record 'global' (arrays) may not leave in a SecAgg+ "
        "collect_masked_vectors reply"),
        f"entry 1 {where}: fitres.metrics: metric 'epsilon' is a str, not a scalar number",
        (f"entry 1 {where}: fitres.metrics: metric 'first-token' is not one a train reply "
        "may send"),
        f"entry 1 {where}: fitres.parameters: tensor 'a.weight' may not leave in clear",
        (f"entry 1 {where}: fitres.status: 'message' is a str of length 5 (only an empty "
        "status message may leave)"),
        (f"entry 2 {where}: secaggplus_configs: 'masked_params': 9 arrays, expected 7 (the "
        "weight, the global change and 2 persona slots)"),
        (f"entry 3 {where}: secaggplus_configs: 'masked_params': array 2 has dtype int32, "
        "expected int64 (Flower's masked integers)"),
        (f"entry 3 {where}: secaggplus_configs: 'masked_params': array 3 carries 38 bytes "
        "for shape [4] (32 expected)"),
        (f"entry 3 {where}: secaggplus_configs: 'masked_params': array 4 has shape [3, 2], "
        "expected [2, 3]")]


def test_secagg_list_lengths_byte_sizes_and_unknown_layouts_are_bounded():
    share = _secagg_entry("share_keys")
    share["secagg"]["peers"] = 2  # one more destination than the server named
    long_key = _secagg_entry("setup")
    long_key["records"]["secaggplus_configs"]["details"]["pk1"]["len"] = 5000
    no_count = _secagg_entry("unmask")
    del no_count["secagg"]["nodes"]
    missing = _secagg_entry("collect_masked_vectors")
    del missing["records"]["fitres.status"]
    unknown_stage = _secagg_entry("setup")
    unknown_stage["secagg"]["stage"] = None
    evaluate = _secagg_entry("setup")
    evaluate["message_type"] = "evaluate"
    unsized = _secagg_entry("collect_masked_vectors", slots=70)
    del unsized["secagg"]["persona_slots"]  # the layout is unknown: 71 slots > the bound

    problems = check_entries([share, long_key, no_count, missing, unknown_stage, evaluate],
                             SECAGG_SHAPES)
    bounded = check_entries([unsized], SECAGG_SHAPES)

    assert problems == [
        ("entry 1 (train, SecAgg+ share_keys, round 2): secaggplus_configs: 'dsts' has 2 "
        "items, expected 1"),
        ("entry 1 (train, SecAgg+ share_keys, round 2): secaggplus_configs: 'ctxts' has 2 "
        "items, expected 1"),
        ("entry 2 (train, SecAgg+ setup, round 2): secaggplus_configs: 'pk1' carries a value "
        "of 5000 bytes, at most 256 allowed"),
        ("entry 3 (train, SecAgg+ unmask, round 2): secaggplus_configs: the log does not say "
        "how many nodes the server's unmask message named"),
        ("entry 4 (train, SecAgg+ collect_masked_vectors, round 2): record 'fitres.status' "
        "missing from a SecAgg+ collect_masked_vectors reply"),
        ("entry 5 (train, SecAgg+ None, round 2): SecAgg+ stage None is not one of Flower's "
        "['setup', 'share_keys', 'collect_masked_vectors', 'unmask']"),
        ("entry 6 (evaluate, SecAgg+ setup, round 2): SecAgg+ runs in train messages, not "
        "evaluate")]
    assert bounded == [
        ("entry 1 (train, SecAgg+ collect_masked_vectors, round 2): secaggplus_configs: "
        "'masked_params': 711 masked integers, at most 651 allowed (the log does not give "
        "the round's layout)")]
    # without the slot count a vector of a plausible size passes on the bound alone
    plausible = _secagg_entry("collect_masked_vectors")
    del plausible["secagg"]["persona_slots"]
    assert check_entries([plausible], SECAGG_SHAPES) == []


def test_a_secagg_record_outside_a_secagg_stage_is_still_a_violation():
    entry = _secagg_entry("setup")
    del entry["secagg"]

    assert check_entries([entry], SECAGG_SHAPES) == [
        ("entry 1 (train, round 2): record 'secaggplus_configs' is a config record (it can "
        "carry strings: pk1: bytes, pk2: bytes)")]


@pytest.mark.integration
def test_a_secagg_simulation_passes_the_wire_audit(tmp_path):
    from simulations.cli import main
    from simulations.run.simulate import simulate

    cfg = small_config(tmp_path, secagg=True, clients_per_round=3, num_rounds=1,
                       target_epsilon=50.0, secagg_max_weight=32)

    simulate(cfg, final_evaluation=False)
    code = main(["audit", "wire", "--run", cfg.run_dir])

    assert code == 0
    population = load_run_population(cfg)
    for user in ("u1", "u2", "u3"):
        log = read_wire_log(sim_store(cfg, population.user_dir(user)).root
                            / WIRE_LOG)
        stages = [e["secagg"]["stage"] for e in log if "secagg" in e]
        assert stages == list(SECAGG_STAGES)  # logged before Flower's mod pops the stage
        masked = next(e for e in log if e.get("secagg", {}).get("stage") ==
                      "collect_masked_vectors")
        arrays = masked["records"]["secaggplus_configs"]["details"]["masked_params"]["arrays"]
        assert masked["secagg"]["persona_slots"] == 2
        assert len(arrays) == 1 + 3 * len(_expected(cfg))
        assert {a["dtype"] for a in arrays} == {"int64"}
        assert check_entries(log, _expected(cfg)) == []
