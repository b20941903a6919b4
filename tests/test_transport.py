"""float16 transport (``transport-dtype``): half the bytes both ways, float32 on arrival."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from helpers import (
    initial_server_state,
    instruction,
    node_context,
    round_message,
    small_config,
)

from client.client_app import train
from server.strategy import apply_round, parse_reply, sent_part, train_content
from shared.protocol.records import record_bytes, record_to_state, state_to_record
from shared.protocol.validation import UpdateRejected
from shared.protocol.wire import KEY_GLOBAL, KEY_METRICS, KEY_PERSONA

B_KEY = "layers.0.q_proj.lora_B.weight"


def test_float16_record_halves_the_bytes_and_arrives_as_float32():
    # Arrange: a value float16 cannot hold exactly
    state = {B_KEY: torch.full((64, 8), 1.0 + 2.0 ** -12)}

    # Act
    full, half = state_to_record(state), state_to_record(state, "float16")
    back = record_to_state(half)

    # Assert
    # (each array also carries its small .npy header)
    assert record_bytes(full) - record_bytes(half) == 64 * 8 * 2
    assert 64 * 8 * 2 < record_bytes(half) < 64 * 8 * 2 + 256
    assert back[B_KEY].dtype == torch.float32
    assert torch.equal(back[B_KEY], torch.ones(64, 8))  # rounded to the nearest half
    assert torch.equal(record_to_state(full)[B_KEY], state[B_KEY])  # float32 is exact


def test_client_replies_in_the_transport_dtype_and_the_server_accepts_only_it(tmp_path):
    # Arrange
    cfg = small_config(tmp_path, transport_dtype="float16")
    state = initial_server_state(cfg)
    message = round_message(cfg, state, "a", MessageType.TRAIN)
    expected = {k: tuple(v.shape) for k, v in sent_part(state.global_state, "ffa").items()}

    # Act
    reply = train(message, node_context(0))

    # Assert: the download was float16, and so is the upload
    assert {a.dtype for a in message.content[KEY_GLOBAL].values()} == {"float16"}
    assert {a.dtype for a in reply.content[KEY_GLOBAL].values()} == {"float16"}
    assert {a.dtype for a in reply.content[KEY_PERSONA].values()} == {"float16"}
    update, _ = parse_reply(reply, persona="a", expected=expected, dtype="float16")
    assert all(v.dtype == torch.float32 for v in update.global_state.values())
    with pytest.raises(UpdateRejected, match="has dtype float16, expected float32"):
        parse_reply(reply, persona="a", expected=expected)


def test_a_float32_reply_is_rejected_when_the_run_sends_float16():
    content = RecordDict({KEY_GLOBAL: ArrayRecord({B_KEY: torch.zeros(4, 2)})})
    content[KEY_METRICS] = MetricRecord({"num-examples": 3})
    reply = Message(content, reply_to=instruction(RecordDict(), MessageType.TRAIN))
    with pytest.raises(UpdateRejected, match="expected float16"):
        parse_reply(reply, persona=None, expected={B_KEY: (4, 2)}, dtype="float16")


def test_train_content_in_float16_is_half_the_float32_size(tmp_path):
    state = initial_server_state(small_config(tmp_path))
    full = train_content(state, "a", "ffa")
    half = train_content(state, "a", "ffa", "float16")
    for name in (KEY_GLOBAL, KEY_PERSONA):
        values = sum(v.numel() for v in sent_part(state.global_state, "ffa").values())
        assert record_bytes(full[name]) - record_bytes(half[name]) == 2 * values > 0


@pytest.mark.parametrize("server_optimizer", ["fedavg", "fedadam"])
def test_a_client_that_returns_what_it_received_in_float16_changed_nothing(tmp_path,
                                                                          server_optimizer):
    # Arrange: server adapters float16 cannot hold; a client echoes its download back
    cfg = small_config(tmp_path, transport_dtype="float16", server_optimizer=server_optimizer)
    state = initial_server_state(cfg)
    noise = torch.Generator().manual_seed(0)
    state.global_state = {k: v + 1e-3 * torch.randn(v.shape, generator=noise)
                          for k, v in state.global_state.items()}
    sent = train_content(state, "a", cfg.lora_scheme, "float16")
    expected = {k: tuple(v.shape) for k, v in sent_part(state.global_state, "ffa").items()}
    echo = RecordDict({KEY_GLOBAL: sent[KEY_GLOBAL], KEY_PERSONA: sent[KEY_PERSONA],
                       KEY_METRICS: MetricRecord({"num-examples": 3})})
    received = record_to_state(sent[KEY_GLOBAL])
    assert not all(torch.equal(received[k], state.global_state[k]) for k in received)

    # Act
    update, metrics = parse_reply(Message(echo, reply_to=instruction(RecordDict(),
                                                                     MessageType.TRAIN)),
                                  persona="a", expected=expected, current=state,
                                  dtype="float16")
    apply_round(state, [update], cfg)

    # Assert: no change measured, and the server now holds exactly what the client had
    # (the float32 reference used to count the rounding, ~1e-4 relative, as a change)
    assert metrics["update-norm"] == 0.0
    assert all(torch.equal(state.global_state[k], received[k]) for k in received)
