"""Persona discovery (shared.personas), the IFCA assignment step on the device
(client.discovery.choose_cluster and the train handler in discovered mode), and the
server's side of it (initial_personas, discovery_report, chosen_persona)."""

from __future__ import annotations

import importlib
import json
import math
from types import SimpleNamespace

import pytest
import torch
from flwr.app import Message, Metadata, MetricRecord, RecordDict
from helpers import (
    FIXED_NOISE,
    fit_persona,
    instruction,
    node_context,
    sim_store,
    small_config,
    tiny_peft,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from client.client_app import train
from client.discovery import choose_cluster
from client.trainer import sample_rate
from server.checkpoint import ServerState
from server.evaluation import discovery_report
from server.run import initial_personas
from server.strategy import chosen_persona, discovery_content
from shared.config import ConfigError, RunConfig
from shared.data.userdata import Profile, Record, UserData, write_population
from shared.model.adapters import level_state, load_level
from shared.model.runtime import get_runtime
from shared.personas import (
    SELECTION_CLIP,
    adjusted_rand_index,
    cluster_names,
    contingency,
    noisy_argmin,
    parse_discovered,
    perturbed_copies,
    selection_noise_std,
)
from shared.protocol.validation import UpdateRejected
from shared.protocol.wire import (
    KEY_CONFIG,
    KEY_METRICS,
    KEY_PERSONA,
    KEY_ROUND,
    round_record,
    run_config_record,
)

STYLE_X = (Record("abab abab abab"), Record("ab abab ab abab")) * 3
STYLE_Y = (Record("zzzz 1234 zzzz"), Record("9876 zzzz 5432")) * 3
SEQ_LEN = 24


# -- adjusted Rand index and the contingency table ---------------------------------------------

def test_ari_of_identical_partitions_is_one_even_with_renamed_labels():
    assert adjusted_rand_index([0, 0, 1, 1, 2], [0, 0, 1, 1, 2]) == 1.0
    assert adjusted_rand_index(["x", "x", "y", "y", "z"], [7, 7, 3, 3, 5]) == 1.0


def test_ari_on_a_hand_computed_example():
    # truth {0,1,2},{3,4,5}; found {0,1},{2,3},{4,5}; n = 6, C(6,2) = 15
    # pairs together in both: (0,1), (4,5) -> index = 2
    # sum_a = 2 * C(3,2) = 6, sum_b = 3 * C(2,2) = 3, expected = 6 * 3 / 15 = 1.2
    # max = (6 + 3) / 2 = 4.5 -> ARI = (2 - 1.2) / (4.5 - 1.2) = 0.8 / 3.3 = 0.242424...
    ari = adjusted_rand_index([0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 2, 2])

    assert ari == pytest.approx(0.24242424, abs=1e-7)
    assert adjusted_rand_index([0, 0, 1, 1, 2, 2], [0, 0, 0, 1, 1, 1]) == pytest.approx(ari)


def test_ari_below_chance_is_negative():
    # truth {0,1},{2,3}; found {0,2},{1,3}: index 0, sum_a = sum_b = 2, C(4,2) = 6
    # expected = 4/6, max = 2 -> (0 - 2/3) / (2 - 2/3) = -0.5
    assert adjusted_rand_index(["a", "a", "b", "b"], [0, 1, 0, 1]) == pytest.approx(-0.5)


@pytest.mark.parametrize("truth, found", [
    (["a", "a", "a", "b", "b", "b"], [0, 0, 0, 0, 0, 0]),  # all in one found cluster
    (["a", "a", "a", "a"], [0, 0, 1, 1]),  # one true group, split in two
    (["a", "a", "b", "b"], [0, 1, 2, 3]),  # every user alone
])
def test_ari_of_a_trivial_partition_against_a_split_is_zero(truth, found):
    assert adjusted_rand_index(truth, found) == 0.0


def test_ari_of_two_single_clusters_is_one_and_lengths_must_match():
    assert adjusted_rand_index(["a"] * 4, [9] * 4) == 1.0
    with pytest.raises(ValueError):
        adjusted_rand_index([0, 1], [0])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), min_size=2, max_size=30))
def test_ari_is_symmetric_at_most_one_and_blind_to_label_names(pairs):
    truth, found = [t for t, _ in pairs], [f for _, f in pairs]
    renamed = [f"cluster-{9 - f}" for f in found]

    ari = adjusted_rand_index(truth, found)

    assert ari <= 1.0 + 1e-12
    assert adjusted_rand_index(found, truth) == pytest.approx(ari)
    assert adjusted_rand_index(truth, renamed) == pytest.approx(ari)
    assert adjusted_rand_index(truth, truth) == 1.0


def test_contingency_table_is_exact_and_sorted():
    table = contingency(["tragedy", "comedy", "tragedy", "tragedy", "comedy"],
                        ["c1", "c0", "c1", "c0", "c0"])

    assert table == {"comedy": {"c0": 2}, "tragedy": {"c0": 1, "c1": 2}}
    assert list(table) == ["comedy", "tragedy"]
    assert list(table["tragedy"]) == ["c0", "c1"]


# -- the private choice ------------------------------------------------------------------------

def test_noisy_argmin_without_noise_is_the_argmin_ties_to_the_lower_index():
    generator = torch.Generator().manual_seed(0)
    before = generator.get_state()

    assert noisy_argmin([3.0, 0.5, 2.0], noise_std=0.0, generator=generator) == 1
    assert noisy_argmin([2.0, 1.0, 1.0, 1.0], noise_std=0.0, generator=generator) == 1
    assert torch.equal(generator.get_state(), before)  # no randomness was drawn


def test_noisy_argmin_is_reproducible_from_a_seeded_generator():
    losses = [1.0, 1.2, 0.9, 1.1]

    first = [noisy_argmin(losses, noise_std=1.0, generator=torch.Generator().manual_seed(s))
             for s in range(50)]
    again = [noisy_argmin(losses, noise_std=1.0, generator=torch.Generator().manual_seed(s))
             for s in range(50)]

    assert first == again


def test_noisy_argmin_under_huge_noise_spreads_over_all_indices():
    generator = torch.Generator().manual_seed(1)

    picks = [noisy_argmin([0.0, 5.0, 10.0], noise_std=1e4, generator=generator)
             for _ in range(600)]

    counts = [picks.count(i) for i in range(3)]
    assert all(140 < c < 260 for c in counts), counts  # ~200 each; far from always 0


def test_selection_noise_std_is_sigma_sqrt_k_clip_over_m():
    assert selection_noise_std(sigma=1.5, k=9, clip=8.0, m=12) == pytest.approx(3.0)
    assert selection_noise_std(sigma=0.0, k=4, clip=8.0, m=16) == 0.0


def test_perturbed_copies_differ_only_on_the_listed_keys_and_reproduce():
    base = {"x.lora_A": torch.ones(4, 3), "x.lora_B": torch.zeros(3, 4),
            "y.lora_B": torch.full((2, 2), 0.5)}
    keys = ["x.lora_B", "y.lora_B"]

    copies = perturbed_copies(base, 3, scale=0.1, seed=7, keys=keys)
    again = perturbed_copies(base, 3, scale=0.1, seed=7, keys=keys)
    other_seed = perturbed_copies(base, 3, scale=0.1, seed=8, keys=keys)

    assert len(copies) == 3
    for copy in copies:
        assert set(copy) == set(base)
        assert torch.equal(copy["x.lora_A"], base["x.lora_A"])
        assert all(not torch.equal(copy[k], base[k]) for k in keys)
    for i in range(3):
        for j in range(i + 1, 3):
            assert all(not torch.equal(copies[i][k], copies[j][k]) for k in keys)
    assert all(torch.equal(c[k], d[k]) for c, d in zip(copies, again) for k in base)
    assert not torch.equal(copies[0]["x.lora_B"], other_seed[0]["x.lora_B"])
    assert torch.equal(base["x.lora_B"], torch.zeros(3, 4))  # the base is not modified


def test_perturbation_scale():
    base = {"w": torch.zeros(200, 200)}

    (copy,) = perturbed_copies(base, 1, scale=0.5, seed=0, keys=["w"])

    assert float(copy["w"].std()) == pytest.approx(0.5, rel=0.02)


def test_parse_discovered_and_cluster_names():
    assert parse_discovered("discovered:6") == 6
    assert parse_discovered("genre") is None and parse_discovered("play") is None
    assert cluster_names(3) == ("cluster-0", "cluster-1", "cluster-2")
    assert cluster_names(0) == ()


def test_run_config_accepts_discovered_personas():
    cfg = RunConfig(personas="discovered:6")

    assert cfg.discovered_k == 6 and cfg.dataset_personas == "genre"
    assert RunConfig.from_mapping({"personas": "discovered:2"}).discovered_k == 2
    assert RunConfig(personas="play").discovered_k is None


@pytest.mark.parametrize("personas", ["discovered:1", "discovered:0", "discovered:x",
                                      "discovered:", "discovered:-3", "discovered:2.5",
                                      "clusters"])
def test_run_config_rejects_bad_discovered_settings(personas):
    with pytest.raises(ConfigError, match="personas"):
        RunConfig(personas=personas)


# -- IFCA's assignment step on the device ------------------------------------------------------

@pytest.fixture(scope="module")
def clusters():
    """[cluster fitted to style Y, cluster fitted to style X] (the right one is not index 0,
    so a tie-to-the-lower-index would not pass for a right answer)."""
    model = tiny_peft(seed=0)
    start = level_state(model, "persona")
    return [fit_persona(model, STYLE_Y, start), fit_persona(model, STYLE_X, start)]


def _runtime_cfg(**changes) -> RunConfig:
    settings = {"model": "tiny", "device": "cpu", "lora_rank": 4, "lora_alpha": 8.0,
                "seq_len": SEQ_LEN, "selection_records": 4}
    settings.update(changes)
    return RunConfig(**settings)


def _user_x() -> UserData:
    return UserData(Profile("x-user"), STYLE_X)


def _fresh_runtime(cfg):
    runtime = get_runtime(cfg)
    for level in ("global", "persona", "user"):
        load_level(runtime.model, level, runtime.initial[level])
    return runtime


def test_choose_cluster_picks_the_cluster_fitted_to_the_users_style(clusters):
    cfg = _runtime_cfg()
    runtime = _fresh_runtime(cfg)

    index = choose_cluster(runtime, clusters, _user_x(), cfg, torch.Generator(), private=False)

    assert index == 1
    assert choose_cluster(runtime, clusters[::-1], _user_x(), cfg, torch.Generator(),
                          private=False) == 0


def test_private_choice_uses_the_calibrated_noise_and_is_noisy(clusters, monkeypatch):
    # Arrange: spy on the argmin to see the losses and the noise std actually used
    cfg = _runtime_cfg(selection_noise=50.0, selection_records=4)
    runtime = _fresh_runtime(cfg)
    home = importlib.import_module(choose_cluster.__module__)  # wherever it now lives
    seen = []
    real = home.noisy_argmin

    def spy(losses, *, noise_std, generator):
        seen.append((list(losses), noise_std))
        return real(losses, noise_std=noise_std, generator=generator)

    monkeypatch.setattr(home, "noisy_argmin", spy)

    # Act
    picks = [choose_cluster(runtime, clusters, _user_x(), cfg,
                            torch.Generator().manual_seed(seed), private=True)
             for seed in range(16)]
    plain = choose_cluster(runtime, clusters, _user_x(), cfg, torch.Generator(), private=False)

    # Assert
    expected_std = selection_noise_std(sigma=50.0, k=2, clip=SELECTION_CLIP, m=4)
    assert all(std == pytest.approx(expected_std) for _, std in seen[:-1])
    assert seen[-1][1] == 0.0 and plain == 1
    losses = seen[0][0]
    assert len(losses) == 2 and losses[1] < losses[0]
    assert all(0 <= v <= SELECTION_CLIP for v in losses)  # clipped mean over m records
    assert set(picks) == {0, 1}  # the noise dominates a gap of well under one nat


def test_private_choice_is_reproducible_from_the_generator(clusters):
    cfg = _runtime_cfg(selection_noise=50.0)
    runtime = _fresh_runtime(cfg)

    first = [choose_cluster(runtime, clusters, _user_x(), cfg,
                            torch.Generator().manual_seed(s), private=True) for s in range(5)]
    again = [choose_cluster(runtime, clusters, _user_x(), cfg,
                            torch.Generator().manual_seed(s), private=True) for s in range(5)]

    assert first == again


# -- the train handler in discovered mode ------------------------------------------------------

def _discovery_setup(tmp_path, clusters, **changes):
    """A population whose first user writes in style X, clusters [Y-fitted, X-fitted]."""
    write_population(tmp_path / "pop", [
        ("train", UserData(Profile("u1"), STYLE_X, STYLE_X[:2])),
        ("train", UserData(Profile("u2"), STYLE_Y, STYLE_Y[:2])),
    ], {"personas": []})
    cfg = small_config(tmp_path, personas="discovered:2", discovery_warmup=1,
                       target_epsilon=math.inf, seq_len=SEQ_LEN, selection_records=4,
                       **changes)
    names = cluster_names(2)
    runtime = get_runtime(cfg)
    state = ServerState(round=2, global_state=dict(runtime.initial["global"]),
                        persona_states=dict(zip(names, clusters)))
    return cfg, names, state


def _discovery_message(cfg, state, names, server_round):
    content = discovery_content(state, names, cfg.lora_scheme)
    content[KEY_CONFIG] = run_config_record(cfg)
    content[KEY_ROUND] = round_record(server_round, names)
    return instruction(content, "train")


def _distance(a: dict, b: dict) -> float:
    return math.sqrt(sum(float((a[k] - b[k]).pow(2).sum()) for k in a))


def test_discovery_round_trains_the_cluster_that_fits_the_user(tmp_path, clusters):
    # Arrange: no DP, so the choice is the plain argmin (round warmup + 2: by loss)
    cfg, names, state = _discovery_setup(tmp_path, clusters, dp=False)
    msg = _discovery_message(cfg, state, names, cfg.discovery_warmup + 2)

    # Act
    reply = train(msg, node_context(0))

    # Assert
    metrics = reply.content.metric_records[KEY_METRICS]
    assert metrics["persona-index"] == 1 and metrics["selection-private"] == 0
    assert chosen_persona(reply, names) == "cluster-1"
    trained = reply.content.array_records[KEY_PERSONA].to_torch_state_dict()
    sent = {k: v for k, v in clusters[1].items() if k in trained}
    other = {k: v for k, v in clusters[0].items() if k in trained}
    assert _distance(trained, sent) < _distance(trained, other) / 4
    store = sim_store(cfg, tmp_path / "pop" / "users" / "u1")
    assert store.load_state()["cluster"] == 1


def test_private_discovery_round_spends_the_selection_in_the_ledger(tmp_path, clusters):
    # Arrange
    cfg, names, state = _discovery_setup(tmp_path, clusters, dp=True, noise_multiplier=1.0,
                                         selection_noise=2.0, **FIXED_NOISE)
    msg = _discovery_message(cfg, state, names, cfg.discovery_warmup + 2)

    # Act
    reply = train(msg, node_context(0))

    # Assert
    metrics = reply.content.metric_records[KEY_METRICS]
    assert metrics["persona-index"] in (0, 1) and metrics["declined"] == 0
    assert metrics["selection-private"] == 1
    assert chosen_persona(reply, names) == names[metrics["persona-index"]]
    store = sim_store(cfg, tmp_path / "pop" / "users" / "u1")
    history = json.loads(store.ledger_path.read_text())["history"]
    rate = sample_rate(cfg.batch_size, len(STYLE_X))
    assert history == [[1.0, pytest.approx(rate), cfg.local_steps + 1], [2.0, 1.0, 1]]


def test_random_start_round_costs_no_selection_privacy(tmp_path, clusters):
    cfg, names, state = _discovery_setup(tmp_path, clusters, dp=True, selection_noise=2.0,
                                         **FIXED_NOISE)
    msg = _discovery_message(cfg, state, names, cfg.discovery_warmup + 1)

    reply = train(msg, node_context(0))

    metrics = reply.content.metric_records[KEY_METRICS]
    assert metrics["persona-index"] in (0, 1) and metrics["selection-private"] == 1
    store = sim_store(cfg, tmp_path / "pop" / "users" / "u1")
    history = json.loads(store.ledger_path.read_text())["history"]
    assert len(history) == 1 and history[0][2] == cfg.local_steps + 1


# -- the server's side -------------------------------------------------------------------------

def _reply(metrics: dict) -> Message:
    metadata = Metadata(run_id=1, message_id="reply", src_node_id=5, dst_node_id=0,
                        reply_to_message_id="msg-1", group_id="", created_at=0.0, ttl=60.0,
                        message_type="train")
    return Message(RecordDict({KEY_METRICS: MetricRecord(metrics)}), metadata=metadata)


@pytest.mark.parametrize("index", [2, 7, -1])
def test_chosen_persona_rejects_an_index_out_of_range(index):
    with pytest.raises(UpdateRejected, match="persona-index"):
        chosen_persona(_reply({"persona-index": index, "declined": 0}), cluster_names(2))


def test_chosen_persona_accepts_a_valid_index_and_skips_a_declined_reply():
    names = cluster_names(2)

    assert chosen_persona(_reply({"persona-index": 1, "declined": 0}), names) == "cluster-1"
    assert chosen_persona(_reply({"persona-index": -1, "declined": 1}), names) is None


def test_initial_discovered_personas_are_distinct_copies_apart_on_trainable_keys():
    state = {"m.lora_A.weight": torch.ones(4, 8), "m.lora_B.weight": torch.zeros(8, 4)}
    runtime = SimpleNamespace(initial={"persona": state})
    cfg = RunConfig(personas="discovered:3", lora_scheme="ffa")

    personas = initial_personas(runtime, cluster_names(3), cfg)
    declared = initial_personas(runtime, ("a", "b"), RunConfig(personas="genre"))

    assert list(personas) == list(cluster_names(3))
    for s in personas.values():
        assert torch.equal(s["m.lora_A.weight"], state["m.lora_A.weight"])  # A is public
        assert not torch.equal(s["m.lora_B.weight"], state["m.lora_B.weight"])
    assert not torch.equal(personas["cluster-0"]["m.lora_B.weight"],
                           personas["cluster-1"]["m.lora_B.weight"])
    assert all(torch.equal(s[k], state[k]) for s in declared.values() for k in state)


def test_discovery_report_scores_assignments_against_the_truth():
    state = ServerState(round=3, global_state={}, persona_states={},
                        assignments={"u1": "cluster-0", "u2": "cluster-0", "u3": "cluster-1",
                                     "u4": "cluster-1", "stranger": "cluster-1"})
    truth = {"u1": "comedy", "u2": "comedy", "u3": "tragedy", "u4": "tragedy"}

    private = discovery_report(state, truth, RunConfig(personas="discovered:2", dp=True,
                                                       selection_noise=1.0))
    public = discovery_report(state, truth, RunConfig(personas="discovered:2", dp=False))

    assert private["k"] == 2 and private["users"] == 4
    assert private["adjusted_rand_index"] == 1.0
    assert private["contingency"] == {"comedy": {"cluster-0": 2}, "tragedy": {"cluster-1": 2}}
    assert "stranger" not in private["assignments"]
    assert private["choice_private"] is True and "in the user's ledger" in private["note"]
    assert public["choice_private"] is False and "NOT covered" in public["note"]
