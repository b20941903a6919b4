"""``fedpersona export`` (client.serving.export) and the stacking it rests on
(shared.model.stack): one standard LoRA adapter that computes what the stack does."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from helpers import RANK, randomize_level, sim_store, write_finished_run
from peft import PeftModel

from shared.data.federation import load_run_population
from shared.model.adapters import activate, load_level, save_adapter
from shared.model.base import load_base_model
from shared.model.runtime import get_runtime
from shared.model.stack import StackError, concatenate, lora_scaling
from simulations.cli import main

# -- the pure stacking -----------------------------------------------------------------------


def _level(seed: int, rank: int, *, inputs: int = 5, outputs: int = 3) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {"m.lora_A.weight": torch.randn(rank, inputs, generator=generator, dtype=torch.float64),
            "m.lora_B.weight": torch.randn(outputs, rank, generator=generator,
                                           dtype=torch.float64)}


def test_the_concatenation_is_the_scaled_sum_of_the_levels_products():
    levels = [(_level(1, 2), 0.5), (_level(2, 3), 2.0), (_level(3, 1), 1.0)]

    stacked = concatenate(levels)

    assert stacked["m.lora_A.weight"].shape == (6, 5)
    assert stacked["m.lora_B.weight"].shape == (3, 6)
    want = sum(s * st["m.lora_B.weight"] @ st["m.lora_A.weight"] for st, s in levels)
    got = stacked["m.lora_B.weight"] @ stacked["m.lora_A.weight"]
    assert torch.allclose(got, want, rtol=0, atol=1e-12)


def test_adapters_of_different_modules_or_shapes_do_not_stack():
    other = {k.replace("m.", "n."): v for k, v in _level(2, 2).items()}
    with pytest.raises(StackError, match="different modules"):
        concatenate([(_level(1, 2), 1.0), (other, 1.0)])
    wide = _level(2, 2, inputs=7)
    with pytest.raises(StackError, match="do not stack"):
        concatenate([(_level(1, 2), 1.0), (wide, 1.0)])
    with pytest.raises(StackError, match="exactly A and B"):
        concatenate([({"m.lora_A.weight": torch.zeros(2, 5)}, 1.0)])


def test_lora_scaling_follows_peft():
    assert lora_scaling({"r": 8, "lora_alpha": 16}) == 2.0
    assert lora_scaling({"r": 4, "lora_alpha": 8, "use_rslora": True}) == 4.0


# -- the command on a tiny run -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished tiny run by hand: random global and persona adapters, a report, and user
    u1's own adapter in its device store."""
    privacy = {"dp": True, "accountant": "prv", "mechanism": "local", "delta": 1e-5,
               "target_epsilon": 8.0, "epsilon_max": 5.3, "epsilon_per_user": {"u1": 5.3}}
    cfg, run = write_finished_run(tmp_path_factory.mktemp("export"), report={
        "privacy": privacy, "user_level_privacy": {"central_dp": False}})
    return cfg, run, load_run_population(cfg).user_dir("u1")


def _stack_logits(cfg, run, persona, user_dir, ids):
    from client.serving.run_adapters import RunAdapters

    adapters = RunAdapters(run, cfg)
    user = sim_store(cfg, user_dir).load_user_adapter() if user_dir else None
    adapters.load(persona=persona, user_state=user)
    levels = ("global", "persona", "user")[:1 + bool(persona) + bool(user_dir)]
    activate(adapters.runtime.model, levels)
    with torch.no_grad():
        return adapters.runtime.model(input_ids=ids).logits


def _sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_export_computes_the_stack_and_its_manifest_names_what_went_in(tiny_run, tmp_path,
                                                                             capsys):
    cfg, run, user_dir = tiny_run
    out = tmp_path / "export"

    code = main(["export", "--run", str(run), "--persona", "a", "--user-dir", str(user_dir),
                 "--out", str(out)])

    assert code == 0
    assert f"rank {3 * RANK}" in capsys.readouterr().out  # three levels of rank RANK
    # plain peft loads it, and it computes what the stack computes
    exported = PeftModel.from_pretrained(load_base_model("tiny", seed=cfg.seed),
                                         str(out / "adapter")).eval()
    ids = torch.randint(0, 60, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        single = exported(input_ids=ids).logits
    stacked = _stack_logits(cfg, run, "a", user_dir, ids)
    assert float((single - stacked).abs().max()) < 1e-5
    assert float((stacked - _stack_logits(cfg, run, None, None, ids)).abs().max()) > 1e-3
    # the manifest: order, sources and their hashes, the privacy facts
    manifest = json.loads((out / "manifest.json").read_text())
    assert [(s["level"], s["released"]) for s in manifest["stack"]] == [
        ("global", True), ("persona", True), ("user", False)]
    assert manifest["stack"][1]["name"] == "a"
    user_file = sim_store(cfg, user_dir).user_adapter_path
    assert [s["sha256"] for s in manifest["stack"]] == [
        _sha256(run / "adapters" / "global" / "adapter_model.safetensors"),
        _sha256(run / "adapters" / "persona" / "a" / "adapter_model.safetensors"),
        _sha256(user_file / "adapter_model.safetensors")]
    assert manifest["adapter"]["rank"] == 3 * RANK
    assert manifest["adapter"]["sha256"] == _sha256(out / "adapter" / "adapter_model.safetensors")
    assert manifest["privacy"]["released_levels"]["epsilon_max"] == 5.3
    assert "epsilon_per_user" not in manifest["privacy"]["released_levels"]
    assert "never released" in manifest["privacy"]["user_level"]
    assert manifest["check"]["max_abs_logit_diff"] < 1e-5
    assert manifest["merged"] is None
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == "tiny"


def test_a_merged_model_directory_computes_the_global_stack(tiny_run, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg, run, _ = tiny_run
    out = tmp_path / "merged-export"

    assert main(["export", "--run", str(run), "--out", str(out), "--merge"]) == 0

    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    ids = torch.randint(0, 60, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = merged(input_ids=ids).logits
    assert float((got - _stack_logits(cfg, run, None, None, ids)).abs().max()) < 1e-4
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["level"] for s in manifest["stack"]] == ["global"]
    assert manifest["merged"] == "merged" and "user_level" not in manifest["privacy"]


def test_export_refuses_what_it_cannot_do_in_one_line_and_overwrites_nothing(
        tiny_run, tmp_path, capsys):
    cfg, run, _ = tiny_run
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    other_user = load_run_population(cfg).user_dir("u2")  # never trained: no user adapter

    cases = [(["--persona", "zzz", "--out", str(tmp_path / "a")], "persona 'zzz' is not one"),
             (["--out", str(used)], "is not empty"),
             (["--user-dir", str(other_user), "--out", str(tmp_path / "b")], "no user adapter")]
    for extra, message in cases:
        assert main(["export", "--run", str(run), *extra]) == 1
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert (used / "keep.txt").read_text() == "mine"
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())


def test_the_export_of_a_stack_changes_no_slot_the_caller_relies_on(tiny_run, tmp_path):
    # the run's adapters object is left with global only in its slots, user slot clean
    from client.serving.export import export_stack
    from client.serving.run_adapters import RunAdapters

    cfg, run, user_dir = tiny_run
    adapters = RunAdapters(run, cfg)
    export_stack(adapters, tmp_path / "x", persona="b", user_dir=user_dir)

    runtime = adapters.runtime
    initial_user = runtime.initial["user"]
    from shared.model.adapters import level_state
    now = level_state(runtime.model, "user")
    assert all(torch.equal(now[k], initial_user[k]) for k in initial_user)
    load_level(runtime.model, "user", initial_user)


@pytest.mark.real_model
def test_the_export_computes_the_stack_on_smollm2(tmp_path):
    from client.serving.export import export_stack
    from client.serving.run_adapters import RunAdapters
    from shared.config import RunConfig

    # Arrange: a run of the real model with trained-looking global and persona adapters
    cfg = RunConfig(model="smollm2", lora_rank=4, lora_alpha=8.0, seed=0,
                    run_dir=str(tmp_path / "run"))
    runtime = get_runtime(cfg)
    run = tmp_path / "run"
    save_adapter(run / "adapters" / "global",
                 randomize_level(runtime.model, "global", scale=0.02, seed=1), runtime.lora)
    save_adapter(run / "adapters" / "persona" / "comedies",
                 randomize_level(runtime.model, "persona", scale=0.02, seed=2), runtime.lora)

    # Act
    manifest = export_stack(RunAdapters(run, cfg), tmp_path / "export", persona="comedies")

    # Assert: the export's float32 logits within 1e-5 of the stack's, relative to their
    # size (the manifest's own check, on the probe text; one float32 step at a logit of 32
    # is 3.8e-6, and the stack summed in the other order moves them as far or farther)
    check = manifest["check"]
    assert check["max_abs_logit_diff"] / check["max_abs_logit"] < 1e-5, check
    assert check["max_abs_logit_diff"] <= 2 * check["reordered_stack_diff"] + 1e-5, check
    assert check["tokens"] > 10 and check["max_abs_logit"] > 1.0
    assert manifest["base_model"]["sha256"] and manifest["adapter"]["rank"] == 8
    # every adapter names a base model someone else can find: the GGUF's origin
    from shared.model.base import EMBEDDED_ORIGIN
    for path in (tmp_path / "export" / "adapter", run / "adapters" / "global"):
        saved = json.loads((path / "adapter_config.json").read_text())
        assert saved["base_model_name_or_path"] == EMBEDDED_ORIGIN, path
