"""One loaded base model with its three adapter slots, kept for the life of the process.

A simulation worker (a Ray actor) serves many rounds and users: loading the
base model once and swapping adapter tensors per message keeps a round's cost
in training, not in loading (cached base model load ~0.1 s, GGUF ~15 s once).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft import LoraConfig, PeftModel

from shared.config import RunConfig
from shared.model.adapters import LEVELS, attach_levels, level_state, lora_config
from shared.model.base import load_base_model, load_tokenizer

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class Runtime:
    model: PeftModel
    tokenizer: object
    lora: LoraConfig
    device: torch.device
    initial: dict[str, dict[str, torch.Tensor]]  # each level at its seeded initialisation


_RUNTIMES: dict[tuple, Runtime] = {}


def pick_device(setting: str) -> torch.device:
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("device=cuda but no CUDA GPU is visible")
        return torch.device("cuda")
    return torch.device("cpu")


def get_runtime(cfg: RunConfig) -> Runtime:
    key = (cfg.model, cfg.device, cfg.dtype, cfg.lora_rank, cfg.lora_alpha,
           cfg.lora_target_modules, cfg.seed)
    if key not in _RUNTIMES:
        device = pick_device(cfg.device)
        # Placement first, adapters second, Opacus hooks last (see client.trainer).
        base = load_base_model(cfg.model, device=device, dtype=_DTYPES[cfg.dtype], seed=cfg.seed)
        # peft records the base model's own name_or_path in adapter_config.json
        config = lora_config(rank=cfg.lora_rank, alpha=cfg.lora_alpha,
                             targets=cfg.lora_target_modules)
        model = attach_levels(base, config, seed=cfg.seed)
        _RUNTIMES.clear()  # one model per process: a new setting replaces the old one
        initial = {level: level_state(model, level) for level in LEVELS}
        _RUNTIMES[key] = Runtime(model=model, tokenizer=load_tokenizer(cfg.model), lora=config,
                                 device=device, initial=initial)
    return _RUNTIMES[key]
