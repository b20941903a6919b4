"""``fedpersona export``: a run's stack of adapters as one standard peft LoRA adapter.

What a device serves is a stack: global, its persona, and its own user adapter.
Serving engines take one LoRA per request and peft cannot save a mix, so the
stack is written as the exact concatenation (:func:`shared.model.stack.concatenate`:
rank ``r_global + r_persona [+ r_user]``, the scalings folded into B), which plain
``PeftModel.from_pretrained`` loads. Beside it, ``manifest.json`` says what went
in: the order, each level's file and SHA-256, the base model, and the privacy
facts (the released levels' accounting from the run's report; the user level
never left the device, and neither should an export that holds it).

Before it returns, the export is loaded afresh onto a fresh base model and its
logits compared with the stack's on a probe text: the manifest records the
largest difference.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from client.serving.run_adapters import RunAdapters
from client.store import DeviceStore
from shared.data.userdata import load_profile
from shared.model.adapters import ADAPTER_WEIGHTS, activate, level_state, lora_config, save_adapter
from shared.model.base import base_model_name, load_base_model, resolve_model
from shared.model.stack import concatenate, lora_scaling
from shared.util.atomic import write_json_atomic

FORMAT = "fedpersona-export-1"
ADAPTER_DIR, MERGED_DIR, MANIFEST = "adapter", "merged", "manifest.json"
PROBE = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer"
# what the released levels' privacy summary keeps (the per-user figures stay in the report)
PRIVACY_KEYS = ("dp", "accountant", "mechanism", "delta", "target_epsilon", "epsilon_max",
                "note")


class ExportError(ValueError):
    """The export cannot be made as asked (unknown persona, no user adapter, used folder)."""


def export_stack(adapters: RunAdapters, out: Path, *, persona: str | None = None,
                 user_dir: Path | None = None, merge: bool = False,
                 report: Mapping[str, Any] | None = None) -> dict:
    """Write ``out/adapter`` (and with ``merge`` ``out/merged``, a full model directory)
    and ``out/manifest.json``; return the manifest."""
    cfg, runtime = adapters.cfg, adapters.runtime
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out}: exists and is not empty; export into a new folder")
    if persona is not None and persona not in adapters.persona_states:
        raise ExportError(f"persona {persona!r} is not one of this run's "
                          f"({', '.join(adapters.persona_states) or 'none'})")
    sources = [_source("global", adapters.run_dir / "adapters" / "global", released=True)]
    if persona is not None:
        sources.append(_source("persona", adapters.run_dir / "adapters" / "persona" / persona,
                               released=True, name=persona))
    user_state = None
    if user_dir is not None:
        store = DeviceStore.of_run(cfg, load_profile(Path(user_dir)).user_id, Path(user_dir))
        user_state = store.load_user_adapter()
        if user_state is None:
            raise ExportError(f"{user_dir}: no user adapter of this run on the device (it "
                              "never trained in it)")
        sources.append(_source("user", store.user_adapter_path, released=False))
    levels = tuple(s["level"] for s in sources)

    adapters.load(persona=persona, user_state=user_state)
    scaling = lora_scaling({"r": runtime.lora.r, "lora_alpha": runtime.lora.lora_alpha,
                            "use_rslora": runtime.lora.use_rslora})
    stacked = concatenate([(level_state(runtime.model, level), scaling) for level in levels])
    rank = runtime.lora.r * len(levels)
    config = lora_config(rank=rank, alpha=float(rank), targets=cfg.lora_target_modules,
                         base_model_name=base_model_name(cfg.model))
    out.mkdir(parents=True, exist_ok=True)
    save_adapter(out / ADAPTER_DIR, stacked, config)

    check = _compare_logits(adapters, levels, out / ADAPTER_DIR)
    if merge:
        _merge(adapters, out / ADAPTER_DIR, out / MERGED_DIR)
    manifest = {
        "format": FORMAT,
        "adapter": {"path": ADAPTER_DIR, "rank": rank, "lora_alpha": float(rank),
                    "target_modules": list(cfg.lora_target_modules),
                    "sha256": _sha256(out / ADAPTER_DIR / ADAPTER_WEIGHTS)},
        "stack": [{**s, "rank": runtime.lora.r, "scaling": scaling} for s in sources],
        "base_model": _base_model(cfg.model),
        "run": {"dir": str(adapters.run_dir), "seed": cfg.seed, "lora_scheme": cfg.lora_scheme},
        "privacy": _privacy(report, has_user=user_state is not None),
        "check": check,
        "merged": MERGED_DIR if merge else None,
    }
    write_json_atomic(out / MANIFEST, manifest)
    adapters.load()  # the slots as the caller found them: global only
    return manifest


def _source(level: str, directory: Path, *, released: bool, name: str | None = None) -> dict:
    entry = {"level": level, "source": str(directory),
             "sha256": _sha256(Path(directory) / ADAPTER_WEIGHTS), "released": released}
    return {**entry, "name": name} if name else entry


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _base_model(spec: str) -> dict:
    source = resolve_model(spec)
    if source is None:
        return {"model": spec, "note": "the tiny test model, built from a config and a seed"}
    if source.gguf_file:
        path = source.directory / source.gguf_file
        return {"model": spec, "file": str(path), "sha256": _sha256(path)}
    return {"model": spec, "directory": str(source.directory),
            "config_sha256": _sha256(source.directory / "config.json")}


def _privacy(report: Mapping[str, Any] | None, *, has_user: bool) -> dict:
    privacy = dict((report or {}).get("privacy", {}))
    facts: dict[str, Any] = {
        "released_levels": {k: privacy[k] for k in PRIVACY_KEYS if k in privacy} or
        {"note": "the run's report.json was not found: no accounting to state"},
        "user_level_privacy": (report or {}).get("user_level_privacy"),
    }
    if has_user:
        facts["user_level"] = ("trained on the device without DP and never released: this "
                               "export holds it, so it belongs on the device only")
    return facts


@torch.no_grad()
def _compare_logits(adapters: RunAdapters, levels: tuple[str, ...], path: Path) -> dict:
    """Max |logit difference| between the stack (as served) and the export loaded afresh."""
    cfg, runtime = adapters.cfg, adapters.runtime
    ids = runtime.tokenizer(PROBE, return_tensors="pt")["input_ids"][:, :cfg.seq_len]
    ids = ids.to(runtime.device)
    # float32's own spread: the same stack summed in the reverse order (peft adds the
    # active levels one by one), against which the export's difference is judged
    activate(runtime.model, levels[::-1])
    reordered = runtime.model(input_ids=ids).logits.float()
    activate(runtime.model, levels)
    stacked = runtime.model(input_ids=ids).logits.float()
    base = load_base_model(cfg.model, device=runtime.device, dtype=runtime.model.dtype,
                           seed=cfg.seed)
    exported = PeftModel.from_pretrained(base, str(path)).eval()
    single = exported(input_ids=ids).logits.float()
    return {"max_abs_logit_diff": float((stacked - single).abs().max()),
            "reordered_stack_diff": float((stacked - reordered).abs().max()),
            "max_abs_logit": float(stacked.abs().max()), "tokens": int(ids.numel()),
            "probe": PROBE}


def _merge(adapters: RunAdapters, adapter: Path, target: Path) -> None:
    """The base model with the export merged into its weights, as a model directory."""
    cfg, runtime = adapters.cfg, adapters.runtime
    base = load_base_model(cfg.model, device="cpu", dtype=torch.float32, seed=cfg.seed)
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    staging = target.with_name(target.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    merged.save_pretrained(staging)
    if hasattr(runtime.tokenizer, "save_pretrained"):
        runtime.tokenizer.save_pretrained(staging)
    staging.rename(target)

