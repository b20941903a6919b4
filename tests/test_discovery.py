"""Persona discovery: ARI, contingency, the private IFCA choice, perturbed starts."""

import math

import pytest
import torch

from server.strategy import chosen_persona
from shared.config import ConfigError, RunConfig
from shared.personas import (
    adjusted_rand_index,
    cluster_names,
    contingency,
    noisy_argmin,
    parse_discovered,
    perturbed_copies,
    selection_noise_std,
)
from shared.validation import UpdateRejected


def test_ari_is_one_for_the_same_partition_under_other_names():
    assert adjusted_rand_index(["a", "a", "b", "b", "c"], [2, 2, 0, 0, 1]) == 1.0


def test_ari_on_a_hand_computed_case():
    # pairs: index=2 (two pairs inside found clusters), sum_a=6, sum_b=3, n=6 -> C(6,2)=15
    # expected = 6*3/15 = 1.2, max = 4.5 -> (2 - 1.2) / (4.5 - 1.2) = 0.242424...
    ari = adjusted_rand_index([0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 2, 2])

    assert ari == pytest.approx(0.8 / 3.3)


def test_ari_of_a_single_found_cluster_is_zero():
    assert adjusted_rand_index(["a", "a", "b", "b"], [0, 0, 0, 0]) == 0.0


def test_contingency_counts():
    table = contingency(["g1", "g1", "g2"], ["c0", "c1", "c1"])

    assert table == {"g1": {"c0": 1, "c1": 1}, "g2": {"c1": 1}}


def test_noisy_argmin_without_noise_is_the_argmin_ties_to_lower():
    assert noisy_argmin([3.0, 1.0, 1.0, 2.0], noise_std=0.0, generator=torch.Generator()) == 1


def test_noisy_argmin_is_reproducible_and_spreads_under_large_noise():
    picks = [noisy_argmin([1.0, 1.1, 1.2], noise_std=100.0,
                          generator=torch.Generator().manual_seed(s)) for s in range(300)]
    again = [noisy_argmin([1.0, 1.1, 1.2], noise_std=100.0,
                          generator=torch.Generator().manual_seed(s)) for s in range(300)]

    assert picks == again
    assert all(picks.count(i) > 60 for i in range(3))


def test_selection_noise_std_formula():
    assert selection_noise_std(sigma=2.0, k=4, clip=8.0, m=16) == pytest.approx(2.0 * 2 * 0.5)


def test_perturbed_copies_differ_only_on_listed_keys_and_reproduce():
    base = {"a.lora_B": torch.zeros(3, 2), "a.lora_A": torch.ones(2, 3)}

    copies = perturbed_copies(base, 3, scale=0.1, seed=5, keys=["a.lora_B"])
    again = perturbed_copies(base, 3, scale=0.1, seed=5, keys=["a.lora_B"])

    assert all(torch.equal(c["a.lora_A"], base["a.lora_A"]) for c in copies)
    assert not torch.equal(copies[0]["a.lora_B"], copies[1]["a.lora_B"])
    assert all(torch.equal(c["a.lora_B"], d["a.lora_B"]) for c, d in zip(copies, again))


def test_discovered_setting():
    cfg = RunConfig(personas="discovered:6")

    assert cfg.discovered_k == 6 and cfg.dataset_personas == "genre"
    assert parse_discovered("discovered:6") == 6 and parse_discovered("genre") is None
    assert cluster_names(2) == ("cluster-0", "cluster-1")
    for bad in ("discovered:1", "discovered:x", "clusters"):
        with pytest.raises(ConfigError):
            RunConfig(personas=bad)


def _reply_with(metrics):
    from flwr.app import Message, Metadata, MetricRecord, RecordDict

    metadata = Metadata(run_id=1, message_id="r", src_node_id=2, dst_node_id=0,
                        reply_to_message_id="m", group_id="", created_at=0.0, ttl=60.0,
                        message_type="train")
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), metadata=metadata)


def test_chosen_persona_validates_the_index():
    names = cluster_names(3)

    assert chosen_persona(_reply_with({"persona-index": 2, "declined": 0}), names) == "cluster-2"
    assert chosen_persona(_reply_with({"persona-index": 0, "declined": 1}), names) is None
    with pytest.raises(UpdateRejected, match="persona-index 3"):
        chosen_persona(_reply_with({"persona-index": 3, "declined": 0}), names)


@pytest.mark.parametrize("noise, private", [(1.0, True), (0.0, False)])
def test_discovery_round_on_the_device_records_the_private_choice(tmp_path, noise, private):
    import json

    from helpers import initial_server_state, instruction, node_context, small_config

    from client.client_app import train
    from client.store import DeviceStore
    from server.strategy import discovery_content
    from shared.wire import KEY_CONFIG, KEY_METRICS, KEY_ROUND, round_record, run_config_record

    cfg = small_config(tmp_path, personas="discovered:3", discovery_warmup=1,
                       selection_noise=noise, target_epsilon=math.inf)
    names = cluster_names(3)
    state = initial_server_state(cfg)
    state.persona_states = {n: dict(state.persona_states["a"]) for n in names}
    content = discovery_content(state, names, cfg.lora_scheme)
    content[KEY_CONFIG] = run_config_record(cfg)
    content[KEY_ROUND] = round_record(3, names)  # after the random-start round: by loss

    reply = train(instruction(content, "train"), node_context(0))

    metrics = reply.content.metric_records[KEY_METRICS]
    assert 0 <= metrics["persona-index"] < 3
    assert metrics["selection-private"] == int(private)
    store = DeviceStore(tmp_path / "pop" / "users" / "u1", cfg.federation_key)
    history = json.loads(store.ledger_path.read_text())["history"]
    assert ([noise, 1.0, 1] in history) == private
    assert store.load_state()["cluster"] == metrics["persona-index"]
