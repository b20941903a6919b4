"""Server checkpoints (server.checkpoint): round trip, LATEST, crash leftovers, peft format."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import randomize_level, tiny_lora, tiny_peft
from peft import PeftModel
from peft.utils import get_peft_model_state_dict

from server.aggregation import FedAdamState
from server.checkpoint import (
    KEEP_SNAPSHOTS,
    ServerState,
    load_checkpoint,
    save_checkpoint,
    states_equal,
)
from shared.model.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterFormatError
from shared.model.base import load_base_model


@pytest.fixture(scope="module")
def states():
    """Three distinct full adapter states (A and B) of the tiny model."""
    model = tiny_peft()
    return [randomize_level(model, "global", scale=0.1, seed=s) for s in range(3)]


def _state(states, round_: int = 3) -> ServerState:
    g, a, b = states
    moments = FedAdamState(m={k: v * 0.5 for k, v in g.items() if "lora_B" in k},
                           v={k: v * v for k, v in g.items() if "lora_B" in k})
    return ServerState(
        round=round_, global_state=g, persona_states={"comedies": a, "tragedies": b},
        optimizer={"global": moments, "persona/comedies": FedAdamState(m=dict(a), v=dict(b))},
        history=[{"round": 1, "accepted": 2, "train_loss": 4.25},
                 {"round": 2, "accepted": 3, "train_loss": 3.5}],
        epsilon_per_user={"u1": 1.25, "u2": 2.5},
        rejected=[{"round": 2, "client": "u3", "reason": "NaN"}])


def test_checkpoint_round_trip(tmp_path, states):
    # Arrange
    saved = _state(states)

    # Act
    path = save_checkpoint(tmp_path, saved, tiny_lora())
    loaded = load_checkpoint(tmp_path)

    # Assert
    assert path == tmp_path / "checkpoint" / "round-0003"
    assert loaded.round == 3
    assert states_equal(loaded.global_state, saved.global_state)
    assert set(loaded.persona_states) == {"comedies", "tragedies"}
    for persona, state in saved.persona_states.items():
        assert states_equal(loaded.persona_states[persona], state)
    assert loaded.history == saved.history
    assert loaded.epsilon_per_user == saved.epsilon_per_user
    assert loaded.rejected == saved.rejected
    assert set(loaded.optimizer) == set(saved.optimizer)
    for level, opt in saved.optimizer.items():
        assert states_equal(loaded.optimizer[level].m, opt.m)
        assert states_equal(loaded.optimizer[level].v, opt.v)


def test_no_checkpoint_loads_as_none(tmp_path):
    assert load_checkpoint(tmp_path) is None


def test_history_with_nan_loss_survives(tmp_path, states):
    saved = _state(states)
    saved.history.append({"round": 3, "accepted": 0, "train_loss": float("nan")})

    save_checkpoint(tmp_path, saved, tiny_lora())

    loss = load_checkpoint(tmp_path).history[-1]["train_loss"]
    assert loss != loss  # NaN (a round where every client declined)


def test_latest_points_to_the_newest_snapshot_and_old_ones_are_pruned(tmp_path, states):
    # Arrange / Act
    for round_ in range(1, 5):
        state = _state(states, round_)
        state.global_state = {k: v + round_ for k, v in states[0].items()}
        save_checkpoint(tmp_path, state, tiny_lora())

    # Assert
    root = tmp_path / "checkpoint"
    assert (root / "LATEST").read_text().strip() == "round-0004"
    loaded = load_checkpoint(tmp_path)
    assert loaded.round == 4
    assert torch.equal(next(iter(loaded.global_state.values())),
                       next(iter(states[0].values())) + 4)
    snapshots = sorted(p.name for p in root.glob("round-*"))
    assert snapshots == [f"round-{r:04d}" for r in range(1, 5)][-KEEP_SNAPSHOTS:]
    assert not [p for p in root.iterdir() if ".tmp-" in p.name]


def test_stale_staging_directory_does_not_affect_load(tmp_path, states):
    # Arrange: a server died while writing round 5 after finishing round 4
    save_checkpoint(tmp_path, _state(states, 4), tiny_lora())
    stale = tmp_path / "checkpoint" / ".round-0005.tmp-xyz"
    (stale / "global").mkdir(parents=True)
    (stale / "state.json").write_text("{half written")
    (stale / "global" / ADAPTER_WEIGHTS).write_bytes(b"junk")

    # Act
    loaded = load_checkpoint(tmp_path)
    save_checkpoint(tmp_path, _state(states, 5), tiny_lora())  # the restarted server goes on

    # Assert
    assert loaded.round == 4
    assert states_equal(loaded.global_state, states[0])
    assert load_checkpoint(tmp_path).round == 5


def test_a_snapshot_never_named_by_latest_is_ignored(tmp_path, states):
    # A snapshot renamed into place whose LATEST update never happened
    save_checkpoint(tmp_path, _state(states, 2), tiny_lora())
    (tmp_path / "checkpoint" / "round-0003").mkdir()

    assert load_checkpoint(tmp_path).round == 2


def test_corrupt_snapshot_adapter_is_an_error_not_silent(tmp_path, states):
    save_checkpoint(tmp_path, _state(states), tiny_lora())
    (tmp_path / "checkpoint" / "round-0003" / "global" / ADAPTER_WEIGHTS).write_bytes(b"junk")

    with pytest.raises(AdapterFormatError):
        load_checkpoint(tmp_path)


def test_adapters_are_written_in_peft_format(tmp_path, states):
    # Arrange
    saved = _state(states)

    # Act
    save_checkpoint(tmp_path, saved, tiny_lora())

    # Assert: the files, in the snapshot and published for users
    for adapter in ("checkpoint/round-0003/global", "checkpoint/round-0003/persona/comedies",
                    "adapters/global", "adapters/persona/tragedies"):
        directory = tmp_path / adapter
        assert (directory / ADAPTER_WEIGHTS).is_file()
        config = json.loads((directory / ADAPTER_CONFIG).read_text())
        assert config["peft_type"] == "LORA" and config["r"] == 4
        assert set(config["target_modules"]) == {"q_proj", "v_proj"}
    # ... and plain peft loads the published global adapter with the saved tensors
    peft_model = PeftModel.from_pretrained(load_base_model("tiny"),
                                           str(tmp_path / "adapters" / "global"))
    assert states_equal(get_peft_model_state_dict(peft_model), saved.global_state)
