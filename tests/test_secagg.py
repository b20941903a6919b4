"""Secure aggregation with Flower's SecAgg+: the packed vector, the precision bound, the
settings, and a real simulation whose aggregates match plain aggregation while the
server never holds an individual update."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import MessageType, RecordDict
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    Key,
    Stage,
)
from flwr.common.serde import recorddict_to_proto
from helpers import sim_store

from client.client_app import make_client_app
from client.mods.secagg import secagg_input
from client.node import resolve_user
from server.aggregation import ClientUpdate
from server.checkpoint import ServerState, load_checkpoint, states_equal
from server.strategy import apply_round, sent_part
from shared.config import ConfigError, RunConfig
from shared.privacy.secagg import clip_change, error_bound, pack, quantized_weight, unpack
from shared.protocol.records import record_to_state, state_to_record
from shared.protocol.wire import (
    KEY_CONFIG,
    KEY_GLOBAL,
    KEY_METRICS,
    KEY_PERSONA,
    KEY_ROUND,
    read_run_config,
)
from tests.helpers import FIXED_NOISE, PERSONAS, secagg_tolerance, small_config

SHAPES = {"b.weight": (2, 3), "a.weight": (4,)}


def _state(value: float) -> dict[str, np.ndarray]:
    return {k: np.full(s, value, dtype=np.float32) for k, s in SHAPES.items()}


# -- the vector ---------------------------------------------------------------------------

def test_pack_fills_only_the_clients_slot_and_unpack_inverts_it():
    vector = pack(_state(1.0), _state(2.0), 1, 3)

    assert [a.shape for a in vector] == [(4,), (2, 3)] * 4  # sorted names, global + 3 slots
    global_part, slots = unpack(vector, SHAPES, 3)
    assert all((v == 1.0).all() for v in global_part.values())
    assert [float(sum(v.sum() for v in s.values())) for s in slots] == [0.0, 20.0, 0.0]


def test_pack_without_persona_and_layout_errors():
    vector = pack(_state(1.0), None, -1, 2)
    assert sum(float(a.sum()) for a in vector[2:]) == 0.0
    with pytest.raises(ValueError, match="slot 2 is not in"):
        pack(_state(1.0), _state(1.0), 2, 2)
    with pytest.raises(ValueError, match="needs a persona change"):
        pack(_state(1.0), None, 0, 2)
    with pytest.raises(ValueError, match="4 arrays, expected 6"):
        unpack(vector[:4], SHAPES, 2)
    with pytest.raises(ValueError, match=r"array 1 has shape \[3, 2\], expected \[2, 3\]"):
        unpack([vector[0], vector[1].reshape(3, 2), *vector[2:]], SHAPES, 2)


def test_clip_change_bounds_the_norm_then_each_coordinate():
    change = {"x": np.array([3.0, 4.0], dtype=np.float32)}  # norm 5

    scaled, clipped = clip_change(change, max_norm=1.0, clipping_range=10.0)
    np.testing.assert_allclose(scaled["x"], [0.6, 0.8], rtol=1e-6)
    assert clipped
    cut, clipped = clip_change(change, max_norm=0.0, clipping_range=3.5)
    np.testing.assert_array_equal(cut["x"], [3.0, 3.5])
    assert clipped
    same, clipped = clip_change(change, max_norm=0.0, clipping_range=4.0)
    np.testing.assert_array_equal(same["x"], [3.0, 4.0])
    assert not clipped


def test_weights_and_error_bound_follow_flowers_quantization():
    # Flower's mod: q = round(n / W * R); a power-of-two W keeps q exact
    assert quantized_weight(20, max_weight=32, quantization_range=2**22) == 20 * 2**17
    assert quantized_weight(1, max_weight=3, quantization_range=10) == 3
    # 3 vectors, each off by < one quantum 2c/R, over a weight of Q/R
    assert error_bound(3, 3 * 20 * 2**17, clipping_range=1.0, quantization_range=2**22) == \
        pytest.approx(3 * (2 / 2**22) / (3 * 20 * 2**17 / 2**22))
    with pytest.raises(ValueError, match="weight_total must be > 0"):
        error_bound(3, 0, clipping_range=1.0, quantization_range=2**22)


@pytest.mark.parametrize("changes, message", [
    ({"clients_per_round": 2}, "clients-per-round >= 3"),
    ({"secagg_num_shares": 4}, "odd number >= 3, got 4"),
    ({"secagg_num_shares": 5, "secagg_reconstruction_threshold": 5}, "got 5"),
    ({"secagg_reconstruction_threshold": 1}, "got 1"),
    ({"secagg_clipping_range": 0.0}, "secagg-clipping-range must be a finite number > 0"),
    ({"secagg_quantization_range": 2**31}, r"secagg-quantization-range must be in \[2, 2\*\*31\)"),
    ({"clients_per_round": 1024}, "must stay below 2\\*\\*32"),
    ({"secagg_max_weight": 0}, "secagg-max-weight must be >= 1, got 0"),
    ({"central_dp": True}, "secagg with central-dp is not supported"),
])
def test_bad_secagg_settings_are_refused(changes, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig(**{"secagg": True, "clients_per_round": 3, **changes})


def test_client_input_is_the_clipped_change_in_its_slot(tmp_path):
    cfg = small_config(tmp_path, secagg=True, clients_per_round=3, secagg_clipping_range=0.5,
                       secagg_max_weight=32)
    sent = RecordDict({KEY_GLOBAL: state_to_record({k: torch.zeros(s) for k, s in SHAPES.items()}),
                       KEY_PERSONA: state_to_record({k: torch.ones(s) for k, s in SHAPES.items()})})
    reply = RecordDict({KEY_GLOBAL: state_to_record({k: torch.full(s, 0.25)
                                                     for k, s in SHAPES.items()}),
                        KEY_PERSONA: state_to_record({k: torch.full(s, 2.0)
                                                      for k, s in SHAPES.items()})})
    metrics = {"num-examples": 20, "persona-index": 1, "declined": 0}

    vector, weight = secagg_input(sent, reply, metrics, cfg, num_slots=2)

    assert weight == 20
    global_part, slots = unpack(vector, SHAPES, 2)
    assert all((v == 0.25).all() for v in global_part.values())
    assert all((v == 0.0).all() for v in slots[0].values())
    assert all((v == 0.5).all() for v in slots[1].values())  # change 1.0 clipped to 0.5
    declined, weight = secagg_input(sent, reply, {**metrics, "declined": 1}, cfg, num_slots=2)
    assert weight == 0 and all((a == 0).all() for a in declined)
    with pytest.raises(ValueError, match="40 examples: secure aggregation weighs at most"):
        secagg_input(sent, reply, {**metrics, "num-examples": 40}, cfg, num_slots=2)


def test_client_input_refuses_a_release_of_another_shape_even_one_that_broadcasts(tmp_path):
    cfg = small_config(tmp_path, secagg=True, clients_per_round=3)
    sent = RecordDict({KEY_GLOBAL: state_to_record({k: torch.zeros(s) for k, s in SHAPES.items()})})
    metrics = {"num-examples": 20, "persona-index": -1, "declined": 0}
    for shape in ((1, 3), (3, 3)):  # (1, 3) - (2, 3) broadcasts in numpy
        released = {k: torch.zeros(s) for k, s in SHAPES.items()} | {"b.weight": torch.ones(shape)}
        reply = RecordDict({KEY_GLOBAL: state_to_record(released)})
        with pytest.raises(ValueError, match=rf"global adapter: b.weight has shape "
                                             rf"\[{shape[0]}, 3\], received \[2, 3\]"):
            secagg_input(sent, reply, metrics, cfg, num_slots=2)


def test_rounding_seed_is_the_devices_own_and_fixed_by_the_training_inputs(tmp_path):
    from client.mods.secagg import rounding_seed
    from client.store import STATE_DIR
    from shared.data.federation import load_run_population
    from tests.helpers import initial_server_state, node_context, round_message

    cfg = small_config(tmp_path, secagg=True, clients_per_round=3)
    state = initial_server_state(cfg)

    def seed(config: RunConfig, partition: int = 0, server_round: int = 1) -> list[int]:
        msg = round_message(config, state, "a", MessageType.TRAIN, server_round=server_round)
        return rounding_seed(msg, node_context(partition), config).tolist()

    first = seed(cfg)
    assert len(first) == 8 and seed(cfg) == first  # 256 bits, the same for the same round
    # where the run lives and how many rounds it has do not enter the rounding
    assert seed(cfg.replace(run_dir=str(tmp_path / "other"), num_rounds=9)) == first
    assert seed(cfg, server_round=2) != first
    assert seed(cfg, partition=1) != first  # another device, another secret
    (load_run_population(cfg).user_dir("u1") / STATE_DIR / "device-secret").write_bytes(
        bytes(32))
    assert seed(cfg) != first  # secret, not derived from what the server knows


# -- a real simulation -----------------------------------------------------------------------

def _spy(msg, context, call_next):
    """Innermost mod: saves what a client received and released in clear (test only:
    the server never gets this; every adapter record, ``persona-<i>`` included), and
    the plain message sizes, as ``spy/<run>-<round>-<user>.pt`` beside the run."""
    reply = call_next(msg, context)
    if msg.metadata.message_type != MessageType.TRAIN or reply.has_error():
        return reply
    cfg = read_run_config(msg.content[KEY_CONFIG])
    user = resolve_user(context, cfg)[0].name
    server_round = int(msg.content[KEY_ROUND]["server-round"])
    out = Path(cfg.run_dir).parent / "spy"
    out.mkdir(exist_ok=True)
    states = {f"{side}/{name}": record_to_state(content[name])
              for side, content in (("sent", msg.content), ("released", reply.content))
              for name in content.array_records}
    plain = {name: content for name, content in msg.content.items()
             if name != RECORD_KEY_CONFIGS}
    torch.save({"states": states, "metrics": dict(reply.content[KEY_METRICS]),
                "personas": list(msg.content[KEY_ROUND]["persona-names"]),
                "node": context.node_id,
                "bytes_in": recorddict_to_proto(RecordDict(plain)).ByteSize(),
                "bytes_out": recorddict_to_proto(reply.content).ByteSize()},
               out / f"{Path(cfg.run_dir).name}-{server_round}-{user}.pt")
    return reply


def _spied(root: Path, run: str) -> dict[tuple[int, str], dict]:
    """``(round, user) -> record`` of what :func:`_spy` saved for ``run``."""
    return {(int(p.stem.split("-")[-2]), p.stem.split("-")[-1]): torch.load(p)
            for p in sorted((root / "spy").glob(f"{run}-*.pt"))}


def _drop_u2_in_round_2(msg, context, call_next):
    """Under secagg, u2 trains in round 2 and then fails: a dropout after key sharing."""
    reply = call_next(msg, context)
    cfg = read_run_config(msg.content[KEY_CONFIG])
    if (cfg.secagg and msg.metadata.message_type == MessageType.TRAIN
            and int(msg.content[KEY_ROUND]["server-round"]) == 2
            and resolve_user(context, cfg)[0].name == "u2"):
        raise RuntimeError("simulated dropout")
    return reply


def _expected_round(spy: dict, server_round: int, users: list[str], cfg: RunConfig,
                    persona_of: dict[str, str]) -> ServerState:
    """apply_round on the clients' plain updates, from what they were sent."""
    first = spy[(server_round, users[0])]["states"]
    sent_persona = {persona_of[u]: spy[(server_round, u)]["states"]["sent/persona"]
                    for u in spy_users(spy, server_round)}
    state = ServerState(round=server_round - 1, global_state=dict(first["sent/global"]),
                        persona_states={p: dict(sent_persona[p]) for p in PERSONAS})
    updates = [ClientUpdate(global_state=spy[(server_round, u)]["states"]["released/global"],
                            persona=persona_of[u],
                            persona_state=spy[(server_round, u)]["states"]["released/persona"],
                            num_examples=int(spy[(server_round, u)]["metrics"]["num-examples"]))
               for u in sorted(users)]
    apply_round(state, updates, cfg)
    return state


def spy_users(spy: dict, server_round: int) -> list[str]:
    return sorted(u for r, u in spy if r == server_round)


def _max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def secagg_vs_plain(tmp_path_factory):
    """The same two-round run twice, plain and under SecAgg+ (u2 drops out of round 2 after
    sharing its keys), with every client's released update spied on and every reply the
    SecAgg+ server received kept."""
    from simulations.run.simulate import simulate

    tmp_path = tmp_path_factory.mktemp("secagg-vs-plain")
    settings = {"clients_per_round": 3, "num_rounds": 2, "target_epsilon": 50.0,
                "secagg_max_weight": 32}
    plain_cfg = small_config(tmp_path / "plain", **settings)
    secure_cfg = small_config(tmp_path / "secure", secagg=True, **settings)
    app = make_client_app(_drop_u2_in_round_2, _spy)
    received: list[tuple[str, object]] = []
    plain = simulate(plain_cfg, final_evaluation=False, client_app=app)
    secure = simulate(secure_cfg, final_evaluation=False, client_app=app,
                      secagg_observer=lambda stage, reply: received.append((stage, reply)))
    spy = _spied(tmp_path / "secure", "run")
    return {"plain": plain, "secure": secure, "cfg": secure_cfg, "received": received,
            "plain_spy": _spied(tmp_path / "plain", "run"), "spy": spy,
            "persona_of": {"u1": "a", "u2": "b", "u3": "a"},  # helpers.write_small_population
            "examples": {u: int(spy[(1, u)]["metrics"]["num-examples"])
                         for u in ("u1", "u2", "u3")}}


@pytest.mark.integration
def test_secagg_history_says_how_each_round_was_aggregated(secagg_vs_plain):
    plain, secure = secagg_vs_plain["plain"], secagg_vs_plain["secure"]

    assert all("secure_aggregation" not in r for r in plain["rounds"])
    first, second = (r["secure_aggregation"] for r in secure["rounds"])
    assert (first["shares"], first["threshold"], first["summed"]) == (3, 2, 3)
    assert second["summed"] == 2 and secure["rounds"][1]["trained_users"] == ["u1", "u3"]
    assert [(e["client"], "simulated dropout" in e["reason"])
            for e in secure["rejected_updates"]] == [("u2", True)]


@pytest.mark.integration
def test_secagg_aggregates_equal_plain_aggregation_within_the_quantization_bound(
        secagg_vs_plain):
    spy, cfg = secagg_vs_plain["spy"], secagg_vs_plain["cfg"]
    persona_of, examples = secagg_vs_plain["persona_of"], secagg_vs_plain["examples"]
    # Two simulate() runs do not release bit-identical DP updates (their noise differs),
    # so the reference is plain aggregation (apply_round) of the very updates this
    # run's clients released, which the spy kept.
    changes = [_max_diff(s["states"][f"released/{n}"], s["states"][f"sent/{n}"])
               for s in spy.values() for n in ("global", "persona")]
    assert max(changes) < cfg.secagg_clipping_range  # nothing clipped: same inputs

    # round 1: all three summed
    after_1 = _expected_round(spy, 1, ["u1", "u2", "u3"], cfg, persona_of)
    got_1 = {"global": spy[(2, "u1")]["states"]["sent/global"],  # what round 2 was sent
             "a": spy[(2, "u1")]["states"]["sent/persona"],
             "b": spy[(2, "u2")]["states"]["sent/persona"]}
    tol_global = secagg_tolerance(cfg, 3, sum(examples.values()), got_1["global"])
    diff = _max_diff(got_1["global"], after_1.global_state)
    assert 0 < diff <= tol_global  # quantized (stochastic rounding), but within the bound
    assert tol_global < 1e-5
    assert _max_diff(got_1["a"], after_1.persona_states["a"]) <= secagg_tolerance(
        cfg, 3, examples["u1"] + examples["u3"], got_1["a"])
    assert _max_diff(got_1["b"], after_1.persona_states["b"]) <= secagg_tolerance(
        cfg, 3, examples["u2"], got_1["b"])

    # round 2: u2 dropped after sharing its keys; SecAgg+ summed u1 and u3 only
    after_2 = _expected_round(spy, 2, ["u1", "u3"], cfg, persona_of)
    final = load_checkpoint(Path(cfg.run_dir))
    final_global = sent_part(final.global_state, cfg.lora_scheme)
    assert _max_diff(final_global, after_2.global_state) <= secagg_tolerance(
        cfg, 2, examples["u1"] + examples["u3"], final_global)
    final_a = sent_part(final.persona_states["a"], cfg.lora_scheme)
    assert _max_diff(final_a, after_2.persona_states["a"]) <= secagg_tolerance(
        cfg, 2, examples["u1"] + examples["u3"], final_a)
    assert _max_diff(sent_part(final.persona_states["b"], cfg.lora_scheme),
                     got_1["b"]) == 0.0  # no member of b was summed: unchanged


@pytest.mark.integration
def test_the_secagg_server_receives_keys_shares_and_masked_integers_never_an_adapter(
        secagg_vs_plain):
    received, spy, cfg = (secagg_vs_plain[k] for k in ("received", "spy", "cfg"))
    persona_of, examples = secagg_vs_plain["persona_of"], secagg_vs_plain["examples"]

    assert {stage for stage, _ in received} == set(Stage.all())
    assert all(not record for _, reply in received if not reply.has_error()
               for record in reply.content.array_records.values())
    masked = [(stage, reply) for stage, reply in received
              if stage == Stage.COLLECT_MASKED_VECTORS and not reply.has_error()]
    assert len(masked) == 3 + 2
    node_user = {s["node"]: u for (_, u), s in spy.items()}
    for _, reply in masked:
        vector = [bytes_to_ndarray(b) for b in
                  reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]]
        user = node_user[reply.metadata.src_node_id]
        states = spy[(int(reply.metadata.group_id), user)]["states"]
        change = {n: {k: (states[f"released/{n}"][k] - states[f"sent/{n}"][k]).numpy()
                      for k in states[f"sent/{n}"]} for n in ("global", "persona")}
        clear = pack(change["global"], change["persona"], PERSONAS.index(persona_of[user]), 2)
        dq = quantized_weight(examples[user], max_weight=cfg.secagg_max_weight,
                              quantization_range=cfg.secagg_quantization_range)
        scale = cfg.secagg_quantization_range / (2 * cfg.secagg_clipping_range)
        quantized = np.concatenate([((a * dq / cfg.secagg_quantization_range
                                      + cfg.secagg_clipping_range) * scale).ravel()
                                    for a in clear])
        sent = np.concatenate([a.ravel() for a in vector[1:]]).astype(np.float64)
        assert all(np.issubdtype(a.dtype, np.integer) for a in vector)
        assert sent.min() >= 0 and sent.max() < 2**32
        # the masked coordinates are unrelated to the client's quantized change
        assert np.mean(np.abs(sent - quantized) <= 2) < 0.01
        assert abs(np.corrcoef(sent, quantized)[0, 1]) < 0.15


@pytest.mark.integration
def test_secagg_history_counts_what_each_stage_sent_and_received(secagg_vs_plain):
    plain_spy = secagg_vs_plain["plain_spy"]
    first = secagg_vs_plain["secure"]["rounds"][0]["secure_aggregation"]
    plain_up = sum(s["bytes_out"] for (r, _), s in plain_spy.items() if r == 1)

    # K + 1 = 3 slots of int64 against float32 adapters: more than twice the plain upload
    assert first["bytes_received"] > 2 * plain_up
    # the stages the protocol ran, and the round's totals are their sums
    assert Stage.COLLECT_MASKED_VECTORS in first["stages"]
    assert set(first["stages"]) <= set(Stage.all())
    assert first["bytes_sent"] == sum(s["bytes_sent"] for s in first["stages"].values())
    assert first["bytes_received"] == sum(
        s["bytes_received"] for s in first["stages"].values())
    assert all(s["seconds"] >= 0 for s in first["stages"].values())
    assert set(first["quantization_error_bound"]) == {"global", "persona/a", "persona/b"}
    assert 0 < first["quantization_error_bound"]["global"] < 1e-5


# -- untested combinations: transport dtype, FedAdam, discovered personas, resume, faults ----

def _snapshot(run_dir: Path, server_round: int) -> ServerState:
    """The checkpoint of ``server_round`` (the server keeps the last two)."""
    view = run_dir.parent / f"{run_dir.name}-view-{server_round}" / "checkpoint"
    view.mkdir(parents=True, exist_ok=True)
    name = f"round-{server_round:04d}"
    if not (view / name).exists():
        (view / name).symlink_to(run_dir / "checkpoint" / name)
    (view / "LATEST").write_text(name + "\n")
    return load_checkpoint(view.parent)


def _initial(cfg: RunConfig) -> ServerState:
    from server.run import initial_personas
    from shared.model.runtime import get_runtime
    from shared.personas import cluster_names

    runtime = get_runtime(cfg)
    personas = cluster_names(cfg.discovered_k) if cfg.discovered_k else PERSONAS
    return ServerState(round=0, global_state=dict(runtime.initial["global"]),
                       persona_states=initial_personas(runtime, personas, cfg))


def _plain_update(entry: dict, cfg: RunConfig, corrupt=None) -> tuple[ClientUpdate, bool]:
    """What one summed client contributes, as plain aggregation would take it: the
    released adapters, after the clipping the device applies before masking (and
    ``corrupt(sent, released)``, a fault, before that). Also whether anything clipped."""
    states, metrics = entry["states"], entry["metrics"]
    index = int(metrics["persona-index"])
    levels = {"global": "sent/global"}
    if "released/persona" in states:
        levels["persona"] = ("sent/persona" if "sent/persona" in states
                             else f"sent/persona-{index}")
    released, clipped_any = {}, False
    for level, sent_name in levels.items():
        sent, after = states[sent_name], states[f"released/{level}"]
        if corrupt is not None:
            after = corrupt(sent, after)
        change, clipped = clip_change({k: (after[k] - sent[k]).numpy() for k in sent},
                                      max_norm=cfg.max_update_norm,
                                      clipping_range=cfg.secagg_clipping_range)
        clipped_any |= clipped
        released[level] = after if not clipped else {
            k: sent[k] + torch.from_numpy(change[k]) for k in sent}
    persona = entry["personas"][index] if "persona" in released else ""
    return ClientUpdate(global_state=released["global"], persona=persona,
                        persona_state=released.get("persona", {}),
                        num_examples=int(metrics["num-examples"])), clipped_any


def _adamsecagg_tolerance(tol: float, opt, lr: float, beta1: float = 0.9,
                    beta2: float = 0.99, tau: float = 1e-3) -> dict[str, torch.Tensor]:
    """``tol`` on the pseudo-gradient carried through one FedAdam step
    (``server.aggregation.fedadam_step``): per coordinate, |d step / d delta| <=
    lr ((1 - b1) + |m| sqrt(1 - b2) / (sqrt(v) + tau)) / (sqrt(v) + tau), doubled
    for the curvature over the interval."""
    out = {}
    for key, m in opt.m.items():
        s = opt.v[key].sqrt() + tau
        out[key] = 2 * tol * lr * ((1 - beta1) + m.abs() * (1 - beta2) ** 0.5 / s) / s
    return out


def _check_round(cfg: RunConfig, before: ServerState, after: ServerState, spy: dict,
                 server_round: int, summed: list[str],
                 corrupt: dict | None = None) -> dict[str, float]:
    """``after`` (the SecAgg+ server's checkpoint) against ``before`` stepped by
    apply_round with the summed clients' plain updates (``corrupt``: user -> the
    fault applied to its release); max |difference| / tolerance per aggregate
    (global, persona/<name>)."""
    import copy

    corrupt = corrupt or {}
    reference = copy.deepcopy(before)
    pairs = {u: _plain_update(spy[(server_round, u)], cfg, corrupt.get(u)) for u in summed}
    # honest clients' changes are not clipped: the reference is their very release
    assert not any(clipped for u, (_, clipped) in pairs.items() if u not in corrupt)
    assert all(pairs[u][1] for u in corrupt)  # a corrupted one was clipped on the device
    updates = [u for u, _ in pairs.values()]
    # the reference starts from what these clients were sent
    for user in summed:
        entry = spy[(server_round, user)]
        for name, sent in entry["states"].items():
            if name.startswith("sent/"):
                level = name.removeprefix("sent/")
                persona = entry["personas"][int(
                    entry["metrics"]["persona-index"] if level == "persona"
                    else level.removeprefix("persona-"))] if level != "global" else None
                held = before.global_state if persona is None else \
                    before.persona_states[persona]
                assert _max_diff(sent, sent_part(held, cfg.lora_scheme,
                                                 cfg.transport_dtype)) == 0.0
    apply_round(reference, updates, cfg)
    groups = {"global": (sum(u.num_examples for u in updates), reference.global_state,
                         after.global_state)}
    for persona in sorted({u.persona for u in updates} - {""}):
        groups[f"persona/{persona}"] = (
            sum(u.num_examples for u in updates if u.persona == persona),
            reference.persona_states[persona], after.persona_states[persona])
    ratios = {}
    for name, (examples, want, got) in groups.items():
        tol = secagg_tolerance(cfg, len(updates), examples, want)
        if cfg.server_optimizer == "fedadam":
            # the moments are linear in the pseudo-gradient: m is off by (1 - b1) x its error
            got_m, want_m = after.optimizer[name].m, reference.optimizer[name].m
            assert max(float((got_m[k] - want_m[k]).abs().max()) for k in want_m) <= 0.1 * tol
            per_key = _adamsecagg_tolerance(tol, reference.optimizer[name], cfg.server_learning_rate)
        else:
            per_key = {}
        worst = 0.0
        for key in want:
            diff = (got[key].double() - want[key].double()).abs()
            bound = per_key[key].double() + 4 * float(np.finfo(np.float32).eps) * float(
                want[key].abs().max()) if key in per_key else torch.tensor(tol)
            assert bool((diff <= bound).all()), (name, key, float(diff.max()), float(
                bound.min()))
            worst = max(worst, float((diff / bound).max()))
        ratios[name] = worst
    for persona in set(before.persona_states) - {u.persona for u in updates}:
        assert states_equal(after.persona_states[persona], before.persona_states[persona])
    return ratios


@pytest.mark.integration
def test_secagg_with_float16_transport_and_fedadam_matches_plain_aggregation(tmp_path):
    """Both at once: FedAdam's pseudo-gradient is taken against the float16-rounded
    state the clients received (server.strategy.sent_part), in both paths."""
    from simulations.run.simulate import simulate

    cfg = small_config(tmp_path, secagg=True, clients_per_round=3, num_rounds=2,
                       target_epsilon=50.0, secagg_max_weight=32, transport_dtype="float16",
                       server_optimizer="fedadam", server_learning_rate=0.01)
    report = simulate(cfg, final_evaluation=False, client_app=make_client_app(_spy))

    spy = _spied(tmp_path, "run")
    assert [r["secure_aggregation"]["summed"] for r in report["rounds"]] == [3, 3]
    assert report["rejected_updates"] == []
    # both ways in half precision: every value the clients saw and released is a float16
    assert all(torch.equal(v, v.half().to(v.dtype)) for s in spy.values()
               for state in s["states"].values() for v in state.values())
    before, ratios = _initial(cfg), {}
    for server_round in (1, 2):
        after = _snapshot(Path(cfg.run_dir), server_round)
        assert sorted(after.optimizer) == ["global", "persona/a", "persona/b"]
        ratios[server_round] = _check_round(cfg, before, after, spy, server_round,
                                            ["u1", "u2", "u3"])
        before = after
    assert all(0 <= r <= 1 for per_round in ratios.values() for r in per_round.values())


class _Stop(Exception):
    """Stops the server mid-round, as a kill would."""


def _stop_in_collect(server_round: int):
    def observer(stage, reply):
        if stage == Stage.COLLECT_MASKED_VECTORS and int(reply.metadata.group_id) == \
                server_round:
            raise _Stop(f"server stopped while collecting round {server_round}")
    return observer


def _history(state: ServerState) -> list[dict]:
    """The round history without what varies between protocol runs: timings, and bytes
    (node ids are random varints, keys are fresh), and a resumed run's marker of the
    round it sent again; NaN (no update norm) as a string."""
    varies = {"seconds", "eval_seconds", "stages", "bytes_sent", "bytes_received", "resumed"}

    def same(value):
        if isinstance(value, dict):
            return {k: same(v) for k, v in value.items() if k not in varies}
        return "nan" if isinstance(value, float) and np.isnan(value) else value
    return [same(h) for h in state.history]


@pytest.mark.integration
def test_secagg_with_discovered_personas_matches_plain_and_resumes_exactly(tmp_path):
    """Discovered personas under SecAgg+ (each client fills the slot it chose), and a
    server stopped while collecting round 2's masked vectors, restarted on the same run
    directory: the devices replay their round-2 replies, the rounding is seeded on the
    device (client.mods.secagg.rounding_seed), so the result is the uninterrupted run's, bit
    for bit."""
    from shared.data.federation import load_run_population
    from simulations.run.simulate import simulate

    settings = {"secagg": True, "clients_per_round": 3, "num_rounds": 2,
                "target_epsilon": 50.0, "secagg_max_weight": 32,
                "personas": "discovered:2", "discovery_warmup": 0,
                "seed": 2}  # round 1's public random start: u1, u3 -> cluster-0, u2 -> 1
    straight = small_config(tmp_path, run_dir=str(tmp_path / "straight"), **settings)
    stopped = small_config(tmp_path, run_dir=str(tmp_path / "stopped"), **settings)
    app = make_client_app(_spy)
    simulate(straight, final_evaluation=False, client_app=app)
    with pytest.raises(_Stop):
        simulate(stopped, final_evaluation=False, client_app=app,
                 secagg_observer=_stop_in_collect(2))
    assert load_checkpoint(Path(stopped.run_dir)).round == 1
    simulate(stopped, final_evaluation=False, client_app=app)

    # the uninterrupted run matches plain aggregation of what its clients chose and released
    spy, before, ratios = _spied(tmp_path, "straight"), _initial(straight), {}
    assert [spy[(1, u)]["metrics"]["persona-index"] for u in ("u1", "u2", "u3")] == [0, 1, 0]
    for server_round in (1, 2):
        after = _snapshot(Path(straight.run_dir), server_round)
        ratios[server_round] = _check_round(straight, before, after, spy, server_round,
                                            ["u1", "u2", "u3"])
        before = after
    assert {u: f"cluster-{spy[(2, u)]['metrics']['persona-index']}" for u in spy_users(spy, 2)} \
        == after.assignments  # the clients' own choices went into the persona slots
    a, b = load_checkpoint(Path(straight.run_dir)), load_checkpoint(Path(stopped.run_dir))
    diffs = {"global": _max_diff(a.global_state, b.global_state),
             **{p: _max_diff(a.persona_states[p], b.persona_states[p])
                for p in a.persona_states}}
    assert all(0 <= r <= 1 for per_round in ratios.values() for r in per_round.values())
    assert diffs == dict.fromkeys(diffs, 0.0)  # the resumed run is the straight one
    assert a.round == b.round == 2
    assert states_equal(a.global_state, b.global_state)
    assert all(states_equal(a.persona_states[p], b.persona_states[p]) for p in a.persona_states)
    assert _history(a) == _history(b) and a.assignments == b.assignments
    assert a.epsilon_per_user == b.epsilon_per_user
    for user in ("u1", "u2", "u3"):  # round 2 replayed on resume, not trained and spent again
        ledgers = [json.loads(sim_store(c, load_run_population(c).user_dir(user))
                              .ledger_path.read_text())
                   for c in (straight, stopped)]
        assert ledgers[0]["rounds"] == ledgers[1]["rounds"] == 2
        assert ledgers[0]["history"] == ledgers[1]["history"]


def _times_norm_factor(sent: dict, released: dict) -> dict:
    """simulations.faults' ``norm`` fault: an update NORM_FACTOR times the real one."""
    from simulations.faults import NORM_FACTOR

    return {k: sent[k] + NORM_FACTOR * (v - sent[k]) for k, v in released.items()}


FAULT_REASONS = {"nan": "global adapter: NaN or Inf after training",
                 "inf": "global adapter: NaN or Inf after training",
                 "shape": "lora_B.weight has shape [33, 4], received [32, 4]",
                 "names": "global adapter: released tensors differ from those received",
                 "crash": "injected crash"}


@pytest.mark.integration
def test_secagg_faulty_clients_drop_out_or_are_clipped_on_the_device(tmp_path, monkeypatch):
    """Under SecAgg+ the server never sees an update, so it cannot reject a faulty one:
    the faulty client's own secagg layer refuses a malformed or non-finite change (a
    dropout that SecAgg+ removes from the sum, the round goes on), and clips a finite
    oversized one to max-update-norm before masking (it is summed, bounded)."""
    import server.checkpoint
    from shared.config import FAULT_KINDS
    from simulations.faults import fault_schedule, faulty_users, inject_faults
    from simulations.run.simulate import simulate

    monkeypatch.setattr(server.checkpoint, "KEEP_SNAPSHOTS", 100)  # every round's state
    cfg = small_config(tmp_path, secagg=True, clients_per_round=3, num_rounds=6,
                       target_epsilon=50.0, secagg_max_weight=32, fault_fraction=0.3,
                       max_update_norm=2.0, **FIXED_NOISE)  # every device, every round
    users = ["u1", "u2", "u3"]
    (faulty,) = faulty_users(users, seed=cfg.seed, fraction=cfg.fault_fraction)
    kinds = [fault_schedule(users, seed=cfg.seed, fraction=cfg.fault_fraction,
                            kinds=cfg.fault_kind_list, server_round=r)[faulty]
             for r in range(1, 7)]
    assert sorted(kinds) == sorted(FAULT_KINDS)  # one round per kind
    report = simulate(cfg, final_evaluation=False,
                      client_app=make_client_app(inject_faults, _spy))

    spy = _spied(tmp_path, "run")
    honest = [u for u in users if u != faulty]
    rejected = {r["round"]: r for r in report["rejected_updates"]}
    before, ratios = _initial(cfg), {}
    for server_round, kind in enumerate(kinds, start=1):
        entry = report["rounds"][server_round - 1]
        after = _snapshot(Path(cfg.run_dir), server_round)
        if kind == "norm":  # finite and well formed: summed, clipped to max-update-norm
            assert entry["trained_users"] == users and server_round not in rejected
            assert entry["secure_aggregation"]["summed"] == 3
            ratios[kind] = _check_round(cfg, before, after, spy, server_round, users,
                                        corrupt={faulty: _times_norm_factor})
        else:  # refused on the device: a dropout, and the other two are summed
            assert entry["trained_users"] == honest, (kind, entry)
            assert entry["secure_aggregation"]["summed"] == 2
            assert rejected[server_round]["client"] == faulty
            assert FAULT_REASONS[kind] in rejected[server_round]["reason"], (kind, rejected)
            ratios[kind] = _check_round(cfg, before, after, spy, server_round, honest)
        before = after
    assert all(0 <= r <= 1 for per_kind in ratios.values() for r in per_kind.values())


def _dropout(user: str, *, stage: str | None = None):
    """A mod under which ``user`` fails: outermost, at SecAgg+ ``stage`` (before it
    answers it); innermost (``stage=None``), after training (a dropout after masking
    would have been its next step)."""
    def mod(msg, context, call_next):
        cfg = read_run_config(msg.content[KEY_CONFIG])
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS, {})
        mine = resolve_user(context, cfg)[0].name == user
        if mine and stage is not None and configs.get(Key.STAGE) == stage:
            raise RuntimeError(f"simulated dropout at {stage}")
        reply = call_next(msg, context)
        if mine and stage is None and msg.metadata.message_type == MessageType.TRAIN:
            raise RuntimeError("simulated dropout after training")
        return reply
    return mod


@pytest.mark.integration
def test_a_client_lost_before_sharing_its_keys_is_left_out_of_the_unmasking(tmp_path):
    """Flower 1.42 would unmask a node lost at setup or share-keys as a dropout: its
    peers hold no share of its key and the round halts (server.secagg._Workflow). u2 is
    lost at share-keys and u4 after training, in the same round: u1 and u3 are summed,
    and the aggregate is plain aggregation of their releases within the bound."""
    from flwr.clientapp import ClientApp

    from client.client_app import evaluate, query, train
    from client.mods.secagg import secagg_mod
    from client.mods.wire_log import record_wire
    from simulations.run.simulate import simulate
    from tests.helpers import write_small_population

    write_small_population(tmp_path / "pop", users=(("u1", "a"), ("u2", "b"), ("u3", "a"),
                                                     ("u4", "b")))
    cfg = small_config(tmp_path, secagg=True, clients_per_round=4, num_rounds=1,
                       secagg_reconstruction_threshold=2, target_epsilon=50.0,
                       secagg_max_weight=32)
    app = ClientApp(mods=[_dropout("u2", stage=Stage.SHARE_KEYS), record_wire, secagg_mod,
                          _dropout("u4"), _spy])
    app.query()(query)
    app.train()(train)
    app.evaluate()(evaluate)

    report = simulate(cfg, final_evaluation=False, client_app=app)

    entry = report["rounds"][0]
    secure = entry["secure_aggregation"]
    assert "failure" not in secure, secure
    assert (secure["shares"], secure["summed"]) == (4, 2)
    assert entry["trained_users"] == ["u1", "u3"]
    assert {r["client"] for r in report["rejected_updates"]} == {"u2", "u4"}
    ratios = _check_round(cfg, _initial(cfg), _snapshot(Path(cfg.run_dir), 1),
                          _spied(tmp_path, "run"), 1, ["u1", "u3"])
    assert all(0 <= r <= 1 for r in ratios.values())


@pytest.mark.integration
def test_a_halted_secagg_round_still_reports_what_the_honest_device_spent(tmp_path):
    """Two of three clients drop out (NaN): SecAgg+ halts and nothing is applied, but the
    honest device trained and spent, so the server's privacy report must say so."""
    from shared.data.federation import load_run_population
    from simulations.faults import faulty_users
    from simulations.run.simulate import simulate

    cfg = small_config(tmp_path, secagg=True, clients_per_round=3, num_rounds=1,
                       target_epsilon=50.0, secagg_max_weight=32, fault_fraction=0.67,
                       fault_kinds="nan", **FIXED_NOISE)  # the RDP figure it checks
    faulty = faulty_users(["u1", "u2", "u3"], seed=cfg.seed, fraction=cfg.fault_fraction)
    (honest,) = {"u1", "u2", "u3"} - set(faulty)

    report = simulate(cfg, final_evaluation=False)

    entry = report["rounds"][0]
    assert entry["accepted"] == 0 and "halted" in entry["secure_aggregation"]["failure"]
    assert sorted(r["client"] for r in report["rejected_updates"]) == ["u1", "u2", "u3"]
    ledger = sim_store(cfg, load_run_population(cfg).user_dir(honest)).load_ledger(
        target_epsilon=cfg.target_epsilon, target_delta=cfg.target_delta)
    assert ledger.epsilon > 0
    assert report["privacy"]["epsilon_per_user"][honest] == pytest.approx(ledger.epsilon)
    after = load_checkpoint(Path(cfg.run_dir))
    assert after.round == 1 and states_equal(after.global_state, _initial(cfg).global_state)
