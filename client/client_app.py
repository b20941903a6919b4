"""The ClientApp: translate Flower messages to on-device calls and back.

Which user a node serves: ``--node-config user-dir=...`` on a real SuperNode;
in a simulation, ``partition-id`` indexes the run's training users. What a round
does on the device is :mod:`client.round`.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from client.mods.secagg import secagg_mod
from client.mods.wire_log import record_wire
from client.round import Device, evaluate_round, query_round, train_round
from shared.config import RunConfig
from shared.protocol.wire import KEY_CONFIG, KEY_ROUND, read_run_config


def query(msg: Message, context: Context) -> Message:
    """Report this user's persona index (public per the threat model) and example count."""
    cfg, info = _setup(msg)
    device = Device.open(cfg, context, with_model=False)
    return Message(query_round(device, info), reply_to=msg)


def train(msg: Message, context: Context) -> Message:
    """One training round: DP-SGD on the released levels, accounted, then the user adapter."""
    cfg, info = _setup(msg)
    return Message(train_round(Device.open(cfg, context), msg.content, info), reply_to=msg)


def evaluate(msg: Message, context: Context) -> Message:
    """Per-user test metrics at each level (the final one first fits the user adapter)."""
    cfg, info = _setup(msg)
    return Message(evaluate_round(Device.open(cfg, context), msg.content, info), reply_to=msg)


def _setup(msg: Message) -> tuple[RunConfig, ConfigRecord]:
    return read_run_config(msg.content[KEY_CONFIG]), msg.content[KEY_ROUND]


def make_client_app(*extra_mods) -> ClientApp:
    """The ClientApp. The wire log is the outermost mod: it records each reply exactly as
    it leaves; then Flower's SecAgg+ for ``secagg`` rounds (:mod:`client.mods.secagg`),
    which masks what the handler and ``extra_mods`` return. A simulation adds its fault
    injector there (:mod:`simulations.faults`); tests add mods that misbehave on purpose.
    The device app (:data:`app`) has none."""
    client_app = ClientApp(mods=[record_wire, secagg_mod, *extra_mods])
    client_app.query()(query)
    client_app.train()(train)
    client_app.evaluate()(evaluate)
    return client_app


app = make_client_app()
