"""The three LoRA levels (shared.model.adapters) and their Flower records (shared.protocol.records),
on the tiny in-memory Llama."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel

from shared.model.adapters import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LEVELS,
    AdapterFormatError,
    activate,
    attach_levels,
    is_trainable_key,
    level_seed,
    level_state,
    load_adapter_state,
    load_level,
    lora_config,
    save_adapter,
)
from shared.model.base import TINY_VOCAB_SIZE, tiny_model
from shared.protocol.records import record_spec, record_to_state, state_to_record

RANK = 4
TARGETS = ("q_proj", "v_proj")
N_LORA_MODULES = 2 * len(TARGETS)  # 2 layers in the tiny model
# peft renames base_model_name_or_path to the tiny model's empty name and warns; harmless here.
pytestmark = pytest.mark.filterwarnings(
    "ignore:The PEFT config's `base_model_name_or_path`:UserWarning")
TOKENS = torch.tensor([[1, 40, 77, 120, 3, 250, 9, 2]])  # (batch=1, T=8)


def _lora():
    return lora_config(rank=RANK, alpha=2.0 * RANK, targets=TARGETS, base_model_name="tiny")


def _attached(seed: int = 0, base_seed: int = 0) -> PeftModel:
    # attach_levels wraps the base model in place: always a fresh base
    return attach_levels(tiny_model(seed=base_seed), _lora(), seed=seed)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=TOKENS).logits  # (1, T, vocab)


def _randomize_b(model: PeftModel, level: str, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=gen)
             for k, v in level_state(model, level, scheme="ffa").items()}
    load_level(model, level, state)
    return state


@pytest.fixture(scope="module")
def model() -> PeftModel:
    """One attached tiny model for the read-only tests (B still zero)."""
    return _attached()


# -- attaching ------------------------------------------------------------------------------

def test_attach_levels_creates_the_three_levels(model):
    assert set(model.peft_config) == set(LEVELS) == {"global", "persona", "user"}
    assert all(not p.requires_grad for p in model.parameters())


def test_level_state_keys_are_peft_keys_with_expected_shapes(model):
    state = level_state(model, "global")

    assert len(state) == 2 * N_LORA_MODULES
    assert all(k.startswith("base_model.model.") and k.endswith(".weight") for k in state)
    assert all(".global." not in k for k in state)  # peft's saved keys carry no adapter name
    q_a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    v_b = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    assert state[q_a].shape == (RANK, 32)
    assert state[v_b].shape == (16, RANK)  # 2 kv heads x head_dim 8


def test_adapters_at_initialisation_change_no_output(model):
    # Arrange
    base_logits = _logits(tiny_model(seed=0))

    # Act: every level active at once
    activate(model, LEVELS)
    adapted = _logits(model)

    # Assert: B = 0 in every level, so h = W x exactly
    assert adapted.shape == (1, TOKENS.shape[1], TINY_VOCAB_SIZE)
    assert torch.equal(adapted, base_logits)
    for level in LEVELS:
        assert all(torch.count_nonzero(v) == 0
                   for v in level_state(model, level, scheme="ffa").values())


def test_same_seed_same_a_different_seed_different_a():
    # Arrange / Act
    first, again, other = _attached(seed=0), _attached(seed=0), _attached(seed=1)

    # Assert
    for level in LEVELS:
        a1 = level_state(first, level)
        a2 = level_state(again, level)
        a3 = level_state(other, level)
        a_keys = [k for k in a1 if "lora_A" in k]
        assert a_keys
        assert all(torch.equal(a1[k], a2[k]) for k in a_keys)
        assert not any(torch.equal(a1[k], a3[k]) for k in a_keys)


def test_levels_have_different_a(model):
    states = {level: level_state(model, level) for level in LEVELS}
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"

    assert not torch.equal(states["global"][key], states["persona"][key])
    assert not torch.equal(states["persona"][key], states["user"][key])


def test_a_does_not_depend_on_the_global_rng():
    torch.manual_seed(123)
    first = level_state(_attached(seed=5), "user")
    torch.manual_seed(456)
    second = level_state(_attached(seed=5), "user")

    assert all(torch.equal(first[k], second[k]) for k in first)


def test_attach_levels_leaves_the_global_rng_alone():
    base = tiny_model(seed=0)
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)

    attach_levels(base, _lora(), seed=0)

    assert torch.equal(torch.rand(3), expected)


def test_level_seed_is_public_and_distinct():
    assert [level_seed(2, level) for level in LEVELS] == [2001, 2002, 2003]


# -- which keys are trained and sent ----------------------------------------------------------

@pytest.mark.parametrize("key,scheme,expected", [
    ("x.q_proj.lora_B.weight", "ffa", True),
    ("x.q_proj.lora_A.weight", "ffa", False),
    ("x.q_proj.lora_B.weight", "fedavg", True),
    ("x.q_proj.lora_A.weight", "fedavg", True),
    ("x.q_proj.base_layer.weight", "fedavg", False),
    ("x.q_proj.base_layer.weight", "ffa", False),
])
def test_is_trainable_key(key, scheme, expected):
    assert is_trainable_key(key, scheme) is expected


def test_level_state_with_scheme_keeps_only_the_sent_keys(model):
    ffa = level_state(model, "persona", scheme="ffa")
    fedavg = level_state(model, "persona", scheme="fedavg")

    assert len(ffa) == N_LORA_MODULES
    assert all("lora_B" in k for k in ffa)
    assert fedavg.keys() == level_state(model, "persona").keys()


def test_level_state_is_a_detached_copy(model):
    state = level_state(model, "global")
    key = next(k for k in state if "lora_A" in k)
    before = state[key].clone()

    state[key].add_(1.0)

    assert torch.equal(level_state(model, "global")[key], before)


@pytest.mark.parametrize("scheme,per_module", [("ffa", 1), ("fedavg", 2)])
def test_activate_returns_exactly_the_trained_levels_params(scheme, per_module):
    # Arrange
    peft_model = _attached()

    # Act
    params = activate(peft_model, ["global", "persona", "user"], train=["global", "user"],
                      scheme=scheme)

    # Assert
    names = {id(p): n for n, p in peft_model.named_parameters()}
    trained = sorted(names[id(p)] for p in params)
    assert len(trained) == 2 * per_module * N_LORA_MODULES
    assert all(".global." in n or ".user." in n for n in trained)
    assert all(is_trainable_key(n, scheme) for n in trained)
    for name, parameter in peft_model.named_parameters():
        assert parameter.requires_grad is (name in trained), name
    assert set(peft_model.base_model.active_adapters) == {"global", "persona", "user"}


def test_activate_again_freezes_what_was_trained_before():
    peft_model = _attached()
    activate(peft_model, ["global"], train=["global"])

    params = activate(peft_model, ["user"], train=["user"])

    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert len(params) == len(trainable) == N_LORA_MODULES
    assert all(".lora_B.user." in n for n in trainable)


def test_activate_refuses_to_train_an_inactive_level():
    with pytest.raises(ValueError, match="inactive"):
        activate(_attached(), ["global"], train=["user"])


def test_only_active_levels_change_the_output():
    # Arrange
    peft_model = _attached()
    _randomize_b(peft_model, "user", seed=1)
    base_logits = _logits(tiny_model(seed=0))

    # Act
    activate(peft_model, ["global", "persona"])
    without_user = _logits(peft_model)
    activate(peft_model, ["global", "persona", "user"])
    with_user = _logits(peft_model)

    # Assert
    assert torch.equal(without_user, base_logits)
    assert not torch.allclose(with_user, base_logits)


# -- records ------------------------------------------------------------------------------------

def test_state_record_round_trip_is_exact():
    # Arrange
    peft_model = _attached()
    _randomize_b(peft_model, "global", seed=2)
    state = level_state(peft_model, "global")

    # Act
    record = state_to_record(state)
    back = record_to_state(record)
    spec = record_spec(record)

    # Assert
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)
    assert spec == {k: ("float32", tuple(v.shape)) for k, v in state.items()}


def test_state_to_record_sends_float32():
    state = {"w": torch.tensor([0.5, -2.0], dtype=torch.bfloat16)}

    record = state_to_record(state)

    assert record_spec(record) == {"w": ("float32", (2,))}
    assert torch.equal(record_to_state(record)["w"], torch.tensor([0.5, -2.0]))


# -- load_level --------------------------------------------------------------------------------

def test_load_level_partial_state_keeps_the_rest():
    # Arrange
    peft_model = _attached()
    a_before = {k: v for k, v in level_state(peft_model, "persona").items() if "lora_A" in k}

    # Act
    b_new = _randomize_b(peft_model, "persona", seed=3)

    # Assert
    after = level_state(peft_model, "persona")
    assert all(torch.equal(after[k], v) for k, v in b_new.items())
    assert all(torch.equal(after[k], v) for k, v in a_before.items())
    # other levels untouched
    assert all(torch.count_nonzero(v) == 0
               for v in level_state(peft_model, "global", scheme="ffa").values())


def test_load_level_rejects_an_unknown_key():
    peft_model = _attached()

    with pytest.raises(AdapterFormatError, match="unexpected key nope.lora_B.weight"):
        load_level(peft_model, "user", {"nope.lora_B.weight": torch.zeros(2, 2)})


def test_load_level_rejects_a_wrong_shape_and_loads_nothing():
    peft_model = _attached()
    state = {k: torch.ones(v.shape)
             for k, v in level_state(peft_model, "user", scheme="ffa").items()}
    bad_key = sorted(state)[-1]
    state[bad_key] = torch.ones(3, 3)

    with pytest.raises(AdapterFormatError, match=r"has shape \(3, 3\), expected"):
        load_level(peft_model, "user", state)

    assert all(torch.count_nonzero(v) == 0
               for v in level_state(peft_model, "user", scheme="ffa").values())


# -- files ---------------------------------------------------------------------------------------

def test_saved_adapter_loads_with_plain_peft(tmp_path):
    # Arrange: random B in the persona level, so the adapter changes the output
    peft_model = _attached()
    _randomize_b(peft_model, "persona", seed=4)
    activate(peft_model, ["persona"])
    ours = _logits(peft_model)
    path = tmp_path / "persona-a"

    # Act
    save_adapter(path, level_state(peft_model, "persona"), _lora())
    loaded = PeftModel.from_pretrained(tiny_model(seed=0), str(path))

    # Assert
    assert (path / ADAPTER_CONFIG).is_file() and (path / ADAPTER_WEIGHTS).is_file()
    assert not torch.allclose(ours, _logits(tiny_model(seed=0)))
    torch.testing.assert_close(_logits(loaded), ours, rtol=0, atol=1e-6)


def test_save_then_load_adapter_state_is_exact(tmp_path):
    peft_model = _attached()
    _randomize_b(peft_model, "global", seed=5)
    state = level_state(peft_model, "global")

    save_adapter(tmp_path / "g", state, _lora())
    back = load_adapter_state(tmp_path / "g")

    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_save_over_an_existing_adapter_replaces_it(tmp_path):
    # Arrange
    path = tmp_path / "user"
    old = {"x.lora_B.weight": torch.zeros(2, 2)}
    new = {"x.lora_B.weight": torch.full((2, 2), 3.0), "y.lora_B.weight": torch.ones(1)}
    save_adapter(path, old, _lora())

    # Act
    save_adapter(path, new, _lora())

    # Assert: the new adapter, loadable, and no staging or old directories left behind
    back = load_adapter_state(path)
    assert back.keys() == new.keys()
    assert all(torch.equal(back[k], new[k]) for k in new)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["user"]


def test_load_adapter_state_on_a_corrupt_file_names_it(tmp_path):
    # Arrange
    path = tmp_path / "broken"
    save_adapter(path, {"x.lora_B.weight": torch.ones(2)}, _lora())
    (path / ADAPTER_WEIGHTS).write_bytes(b"\x00\xffnot a safetensors file at all" * 3)

    # Act / Assert
    with pytest.raises(AdapterFormatError, match=ADAPTER_WEIGHTS.replace(".", r"\.")) as err:
        load_adapter_state(path)
    assert str(path / ADAPTER_WEIGHTS) in str(err.value)
    assert "corrupt" in str(err.value)


def test_load_adapter_state_on_a_truncated_file(tmp_path):
    path = tmp_path / "cut"
    save_adapter(path, {"x.lora_B.weight": torch.ones(64, 64)}, _lora())
    weights = path / ADAPTER_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:200])

    with pytest.raises(AdapterFormatError, match="corrupt"):
        load_adapter_state(path)


def test_load_adapter_state_rejects_non_finite_values(tmp_path):
    path = tmp_path / "nan"
    save_adapter(path, {"x.lora_B.weight": torch.tensor([1.0, float("nan")])}, _lora())

    with pytest.raises(AdapterFormatError, match="x.lora_B.weight holds NaN"):
        load_adapter_state(path)


@pytest.mark.parametrize("missing", [ADAPTER_CONFIG, ADAPTER_WEIGHTS])
def test_load_adapter_state_needs_both_files(tmp_path, missing):
    path = tmp_path / "half"
    save_adapter(path, {"x.lora_B.weight": torch.ones(2)}, _lora())
    (path / missing).unlink()

    with pytest.raises(AdapterFormatError, match="not an adapter directory"):
        load_adapter_state(path)


def test_load_adapter_state_of_a_missing_directory(tmp_path):
    with pytest.raises(AdapterFormatError):
        load_adapter_state(Path(tmp_path / "nowhere"))


def test_a_failed_save_keeps_the_previous_adapter(tmp_path, monkeypatch):
    # Arrange
    import shared.model.adapters as adapters

    path = tmp_path / "global"
    old = {"x.lora_B.weight": torch.full((2,), 7.0)}
    save_adapter(path, old, _lora())

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(adapters, "save_file", crash)

    # Act
    with pytest.raises(OSError, match="disk full"):
        save_adapter(path, {"x.lora_B.weight": torch.zeros(2)}, _lora())

    # Assert: the old adapter is intact and the staging directory is gone
    assert torch.equal(load_adapter_state(path)["x.lora_B.weight"], old["x.lora_B.weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global"]
