"""The hierarchical strategy (server.strategy): reply validation, aggregation, sampling."""

from __future__ import annotations

import pytest
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from helpers import instruction

from server.aggregation import GLOBAL, ClientUpdate, level_name
from server.checkpoint import ServerState
from server.strategy import (
    apply_changes,
    apply_round,
    parse_reply,
    round_changes,
    sample_nodes,
    sent_part,
    train_content,
)
from shared.config import RunConfig
from shared.protocol.validation import UpdateRejected
from shared.protocol.wire import KEY_GLOBAL, KEY_METRICS, KEY_PERSONA

A_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
B2_KEY = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
EXPECTED = {B_KEY: (4, 2), B2_KEY: (3, 2)}  # what a reply must carry under FFA


def _b_state(value: float) -> dict[str, torch.Tensor]:
    return {key: torch.full(shape, value) for key, shape in EXPECTED.items()}


def _reply(records: dict, *, num_examples=10, declined=0, extra: dict | None = None) -> Message:
    content = RecordDict({name: ArrayRecord(state) for name, state in records.items()})
    content[KEY_METRICS] = MetricRecord({"num-examples": num_examples, "declined": declined,
                                         "epsilon": 1.5})
    for name, record in (extra or {}).items():
        content[name] = record
    return Message(content, reply_to=instruction(RecordDict(), MessageType.TRAIN))


# -- parse_reply ------------------------------------------------------------------------------

def test_parse_reply_accepts_a_good_reply():
    # Arrange
    reply = _reply({KEY_GLOBAL: _b_state(1.0), KEY_PERSONA: _b_state(2.0)}, num_examples=7)

    # Act
    update, metrics = parse_reply(reply, persona="a", expected=EXPECTED)

    # Assert
    assert update.persona == "a" and update.num_examples == 7
    assert set(update.global_state) == set(EXPECTED) == set(update.persona_state)
    assert torch.equal(update.global_state[B_KEY], torch.ones(4, 2))
    assert torch.equal(update.persona_state[B2_KEY], torch.full((3, 2), 2.0))
    assert metrics["epsilon"] == 1.5


def test_parse_reply_accepts_a_global_only_reply_from_a_client_without_persona():
    update, _ = parse_reply(_reply({KEY_GLOBAL: _b_state(1.0)}), persona=None,
                            expected=EXPECTED)

    assert update.persona == "" and update.persona_state == {}


def test_parse_reply_passes_a_declined_reply_through():
    update, metrics = parse_reply(_reply({}, declined=1), persona="a", expected=EXPECTED)

    assert update is None and metrics["declined"] == 1


def _with(state: dict, key: str, tensor: torch.Tensor) -> dict:
    return {**state, key: tensor}


@pytest.mark.parametrize(("reply", "persona", "reason"), [
    pytest.param(_reply({KEY_GLOBAL: _b_state(1.0), KEY_PERSONA: _b_state(1.0)},
                        extra={"user": ArrayRecord(_b_state(1.0))}),
                 "a", "unexpected record", id="extra-record"),
    pytest.param(_reply({KEY_GLOBAL: _b_state(1.0), KEY_PERSONA: _b_state(1.0)},
                        extra={"config": ConfigRecord({"x": 1})}),
                 "a", "unexpected record", id="extra-config-record"),
    pytest.param(_reply({KEY_GLOBAL: _with(_b_state(1.0), B_KEY,
                                           torch.tensor([[float("nan"), 0.0]] * 4)),
                         KEY_PERSONA: _b_state(1.0)}),
                 "a", "NaN or Inf", id="nan-global"),
    pytest.param(_reply({KEY_GLOBAL: _b_state(1.0),
                         KEY_PERSONA: _with(_b_state(1.0), B2_KEY,
                                            torch.full((3, 2), float("inf")))}),
                 "a", "NaN or Inf", id="inf-persona"),
    pytest.param(_reply({KEY_GLOBAL: _with(_b_state(1.0), B_KEY, torch.ones(2, 4)),
                         KEY_PERSONA: _b_state(1.0)}),
                 "a", "shape", id="wrong-shape"),
    pytest.param(_reply({KEY_GLOBAL: _with(_b_state(1.0), B_KEY,
                                           torch.ones(4, 2, dtype=torch.float64)),
                         KEY_PERSONA: _b_state(1.0)}),
                 "a", "dtype", id="wrong-dtype"),
    pytest.param(_reply({KEY_GLOBAL: _with(_b_state(1.0), A_KEY, torch.ones(2, 2)),
                         KEY_PERSONA: _b_state(1.0)}),
                 "a", "unexpected key", id="extra-key-lora-A"),
    pytest.param(_reply({KEY_GLOBAL: {B_KEY: torch.ones(4, 2)}, KEY_PERSONA: _b_state(1.0)}),
                 "a", "missing key", id="missing-key"),
    pytest.param(_reply({KEY_PERSONA: _b_state(1.0)}), "a", "no global", id="no-global"),
    pytest.param(_reply({KEY_GLOBAL: _b_state(1.0)}), "a", "no adapter for persona",
                 id="no-persona-from-persona-member"),
    pytest.param(_reply({KEY_GLOBAL: _b_state(1.0), KEY_PERSONA: _b_state(1.0)}),
                 None, "has no persona", id="persona-from-client-without-persona"),
    pytest.param(_reply({KEY_GLOBAL: _b_state(1.0)}, num_examples=0), None, "num-examples",
                 id="zero-examples"),
    pytest.param(_reply({KEY_GLOBAL: _b_state(1.0)}, num_examples=-3), None, "num-examples",
                 id="negative-examples"),
    pytest.param(_reply({KEY_GLOBAL: _b_state(1.0)}, num_examples=2.5), None, "num-examples",
                 id="fractional-examples"),
])
def test_parse_reply_rejects(reply, persona, reason):
    with pytest.raises(UpdateRejected, match=reason):
        parse_reply(reply, persona=persona, expected=EXPECTED)


def test_parse_reply_rejects_a_reply_without_metrics():
    content = RecordDict({KEY_GLOBAL: ArrayRecord(_b_state(1.0))})
    reply = Message(content, reply_to=instruction(RecordDict(), MessageType.TRAIN))

    with pytest.raises(UpdateRejected, match="no metrics"):
        parse_reply(reply, persona=None, expected=EXPECTED)


def test_parse_reply_rejects_a_client_error():
    reply = Message(Error(code=0, reason="out of memory"),
                    reply_to=instruction(RecordDict(), MessageType.TRAIN))

    with pytest.raises(UpdateRejected, match="out of memory"):
        parse_reply(reply, persona="a", expected=EXPECTED)


# -- apply_round --------------------------------------------------------------------------------

def _full(a: float, b: float) -> dict[str, torch.Tensor]:
    """A server-side adapter state: lora_A (never sent under FFA) and lora_B."""
    return {A_KEY: torch.full((2, 2), a), B_KEY: torch.full((4, 2), b),
            B2_KEY: torch.full((3, 2), b)}


def _update(persona: str, global_b: float, persona_b: float, n: int) -> ClientUpdate:
    return ClientUpdate(global_state=_b_state(global_b), persona=persona,
                        persona_state=_b_state(persona_b), num_examples=n)


def _server_state() -> ServerState:
    return ServerState(round=0, global_state=_full(5.0, 0.0),
                       persona_states={"a": _full(6.0, 0.0), "b": _full(7.0, 10.0),
                                       "c": _full(8.0, 20.0)})


def _value(state: dict, key: str) -> float:
    values = state[key].unique()
    assert len(values) == 1
    return float(values[0])


def test_apply_round_fedavg_is_the_example_weighted_hierarchical_mean():
    # Arrange: weights 1, 3 (persona a) and 4 (persona b); all sums exact in float32
    state = _server_state()
    updates = [_update("a", 8.0, 4.0, 1), _update("a", 16.0, 8.0, 3), _update("b", 2.0, 3.0, 4)]
    cfg = RunConfig(model="tiny", server_optimizer="fedavg", server_learning_rate=1.0)

    # Act
    apply_round(state, updates, cfg)

    # Assert
    expected_global = (1 * 8.0 + 3 * 16.0 + 4 * 2.0) / 8  # 8.0
    for key in (B_KEY, B2_KEY):
        assert _value(state.global_state, key) == expected_global
        assert _value(state.persona_states["a"], key) == (1 * 4.0 + 3 * 8.0) / 4  # 7.0
        assert _value(state.persona_states["b"], key) == 3.0  # its one member
        assert _value(state.persona_states["c"], key) == 20.0  # no member: unchanged
    # FFA: the frozen A part is never touched
    assert _value(state.global_state, A_KEY) == 5.0
    assert [_value(state.persona_states[p], A_KEY) for p in "abc"] == [6.0, 7.0, 8.0]
    assert state.global_state[B_KEY].dtype == torch.float32


def test_apply_round_server_learning_rate_moves_part_way():
    state = _server_state()
    cfg = RunConfig(model="tiny", server_optimizer="fedavg", server_learning_rate=0.5)

    apply_round(state, [_update("b", 4.0, 30.0, 2)], cfg)

    assert _value(state.global_state, B_KEY) == 2.0  # 0 + 0.5 * (4 - 0)
    assert _value(state.persona_states["b"], B_KEY) == 20.0  # 10 + 0.5 * (30 - 10)
    assert _value(state.persona_states["a"], B_KEY) == 0.0


def test_apply_round_clients_without_persona_count_for_global_only():
    state = _server_state()
    cfg = RunConfig(model="tiny")
    lone = ClientUpdate(global_state=_b_state(4.0), persona="", persona_state={},
                        num_examples=1)

    apply_round(state, [lone, _update("a", 12.0, 2.0, 1)], cfg)

    assert _value(state.global_state, B_KEY) == 8.0
    assert _value(state.persona_states["a"], B_KEY) == 2.0
    assert set(state.persona_states) == {"a", "b", "c"}


def test_apply_round_without_updates_changes_nothing():
    state = _server_state()
    before = {k: v.clone() for k, v in state.global_state.items()}

    apply_round(state, [], RunConfig(model="tiny"))

    assert all(torch.equal(before[k], state.global_state[k]) for k in before)


def test_apply_round_fedadam_keeps_moments_per_adapter():
    state = _server_state()
    cfg = RunConfig(model="tiny", server_optimizer="fedadam", server_learning_rate=0.1)

    apply_round(state, [_update("a", 1.0, 1.0, 1)], cfg)

    assert set(state.optimizer) == {"global", "persona/a"}
    assert set(state.optimizer["global"].m) == set(EXPECTED)
    # first Adam step from zero moments: lr * 0.1 d / (sqrt(0.01 d^2) + tau), d = 1
    assert _value(state.global_state, B_KEY) == pytest.approx(0.1 * 0.1 / (0.1 + 1e-3))
    assert _value(state.global_state, A_KEY) == 5.0


def test_round_changes_are_the_mean_changes_from_what_was_sent():
    state = _server_state()  # B: global 0, a 0, b 10, c 20
    cfg = RunConfig(model="tiny")
    updates = [_update("a", 8.0, 4.0, 1), _update("b", 2.0, 13.0, 3)]

    changes = round_changes(state, updates, cfg)

    assert set(changes) == {GLOBAL, level_name("a"), level_name("b")}
    for key in (B_KEY, B2_KEY):  # only what is sent under FFA
        assert set(changes[GLOBAL]) == set(EXPECTED)
        assert _value(changes[GLOBAL], key) == (1 * 8.0 + 3 * 2.0) / 4  # 3.5
        assert _value(changes[level_name("a")], key) == 4.0
        assert _value(changes[level_name("b")], key) == 3.0


def test_apply_changes_steps_each_level_by_lr_times_its_change_and_leaves_the_rest():
    state = _server_state()
    cfg = RunConfig(model="tiny", server_learning_rate=0.5)
    changes = {GLOBAL: _b_state(4.0), level_name("b"): _b_state(-2.0)}

    apply_changes(state, changes, cfg)

    assert _value(state.global_state, B_KEY) == 2.0  # 0 + 0.5 * 4
    assert _value(state.persona_states["b"], B_KEY) == 9.0  # 10 + 0.5 * (-2)
    assert _value(state.persona_states["a"], B_KEY) == 0.0  # no change this round
    assert _value(state.persona_states["c"], B_KEY) == 20.0
    assert _value(state.global_state, A_KEY) == 5.0  # FFA: A is never sent nor stepped
    assert state.global_state[B_KEY].dtype == torch.float32


# -- what is sent, and to whom -------------------------------------------------------------------

def test_train_content_sends_b_only_and_only_the_clients_persona():
    state = _server_state()

    content = train_content(state, "b", "ffa")
    alone = train_content(state, None, "ffa")

    assert set(content.keys()) == {KEY_GLOBAL, KEY_PERSONA}
    assert set(content.array_records[KEY_PERSONA].keys()) == {B_KEY, B2_KEY}
    assert content.array_records[KEY_PERSONA].to_torch_state_dict()[B_KEY].eq(10.0).all()
    assert set(alone.keys()) == {KEY_GLOBAL}
    assert set(sent_part(state.global_state, "fedavg")) == {A_KEY, B_KEY, B2_KEY}


# -- sample_nodes ----------------------------------------------------------------------------------

def test_sample_nodes_is_reproducible_and_distinct():
    nodes = [9_001 * i + 17 for i in range(20)]

    first = sample_nodes(nodes, 5, seed=3, server_round=2)
    again = sample_nodes(reversed(nodes), 5, seed=3, server_round=2)  # order does not matter
    rounds = {tuple(sample_nodes(nodes, 5, seed=3, server_round=r)) for r in range(1, 9)}

    assert first == again
    assert len(first) == 5 == len(set(first)) and set(first) <= set(nodes)
    assert first == sorted(first)
    assert len(rounds) > 1  # a different round draws different clients


def test_sample_nodes_caps_at_the_population():
    assert sample_nodes({3: {}, 1: {}, 2: {}}, 10, seed=0, server_round=1) == [1, 2, 3]


def test_sample_nodes_by_user_key_survives_new_node_ids():
    # a restarted server sees new random node ids for the same users
    before = {101: "ann", 205: "bob", 307: "cy", 409: "dee"}
    after = {999: "ann", 12: "bob", 450: "cy", 77: "dee"}

    first = sample_nodes(before, 2, seed=1, server_round=3, key=before.get)
    again = sample_nodes(after, 2, seed=1, server_round=3, key=after.get)

    assert sorted(before[n] for n in first) == sorted(after[n] for n in again)


def test_the_sample_depends_on_the_seed_it_is_given():
    """Under central DP the server passes a secret-derived seed; the draw follows it."""
    nodes = list(range(100))
    draws = {tuple(sample_nodes(nodes, 10, seed=s, server_round=1)) for s in range(5)}
    assert len(draws) == 5
    assert sample_nodes(nodes, 10, seed=3, server_round=1) == sample_nodes(
        nodes, 10, seed=3, server_round=1)
