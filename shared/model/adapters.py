"""The three LoRA levels on one frozen base model, and their files in peft format.

Levels (peft adapter names): ``global``, ``persona`` (one slot; the server
keeps one state per persona id and the client loads its own into the slot)
and ``user`` (never leaves the device). With several adapters active peft sums
them: ``h = W x + sum_l B_l A_l x * scaling`` (Hu et al., LoRA, 2021).

Aggregation scheme (``lora-scheme``):
- ``ffa`` (Sun et al., "Improving LoRA in Privacy-preserving Federated Learning",
  ICLR 2024): A is frozen at an initialisation every party derives from the run
  seed, only B is trained and sent. Averaging B is then exactly averaging the
  products ``B A`` (A is shared), the upload halves, and DP noise goes into half
  the coordinates.
- ``fedavg``: A and B both trained and averaged; ``mean(B) mean(A) != mean(B A)``.

A state is a dict ``peft key -> tensor`` with peft's own keys (those of
``get_peft_model_state_dict``), so a saved adapter directory loads with plain
``peft.PeftModel.from_pretrained(base, path)``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from shared.util.atomic import replace_dir

LEVELS = ("global", "persona", "user")
RELEASED_LEVELS = ("global", "persona")  # the only adapters that ever leave a device
_LEVEL_SEED_OFFSET = {"global": 1, "persona": 2, "user": 3}
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

State = dict[str, torch.Tensor]


class AdapterFormatError(ValueError):
    """An adapter directory or state is corrupt or does not fit the model."""


def lora_config(*, rank: int, alpha: float, targets: Iterable[str],
                base_model_name: str | None = None) -> LoraConfig:
    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0,
                      bias="none", task_type="CAUSAL_LM",
                      base_model_name_or_path=base_model_name)


def level_seed(seed: int, level: str) -> int:
    """The public seed of a level's initialisation (FFA's frozen A comes from it)."""
    return seed * 1000 + _LEVEL_SEED_OFFSET[level]


def is_trainable_key(key: str, scheme: str) -> bool:
    """Which parameters a level trains and sends: B only under FFA, A and B under FedAvg."""
    if scheme == "ffa":
        return "lora_B" in key
    return "lora_A" in key or "lora_B" in key


def attach_levels(base_model: torch.nn.Module, config: LoraConfig, *, seed: int) -> PeftModel:
    """Wrap the (already placed) base model with the three levels, seeded per level.

    Every party that calls this with the same model, config and seed gets the
    same A matrices, which is what makes FFA's aggregation exact.
    """
    peft_model = None
    for level in LEVELS:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(level_seed(seed, level))
            if peft_model is None:
                peft_model = get_peft_model(base_model, config, adapter_name=level)
            else:
                peft_model.add_adapter(level, config)
    for parameter in peft_model.parameters():
        parameter.requires_grad_(False)
    return peft_model


def level_state(model: PeftModel, level: str, *, scheme: str | None = None) -> State:
    """A detached copy of a level's tensors; only the sent ones when ``scheme`` is given."""
    state = get_peft_model_state_dict(model, adapter_name=level, save_embedding_layers=False)
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()
            if scheme is None or is_trainable_key(k, scheme)}


def load_level(model: PeftModel, level: str, state: Mapping[str, torch.Tensor]) -> None:
    """Load (part of) a level's state into its slot; unknown keys or shapes are an error."""
    expected = get_peft_model_state_dict(model, adapter_name=level, save_embedding_layers=False)
    for key, tensor in state.items():
        if key not in expected:
            raise AdapterFormatError(f"{level} adapter: unexpected key {key}")
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise AdapterFormatError(f"{level} adapter: {key} has shape {tuple(tensor.shape)}, "
                                     f"expected {tuple(expected[key].shape)}")
    full = {k: v.detach().clone() for k, v in expected.items()}
    full.update({k: v.to(dtype=expected[k].dtype) for k, v in state.items()})
    set_peft_model_state_dict(model, full, adapter_name=level)


def activate(model: PeftModel, levels: Iterable[str], *, train: Iterable[str] = (),
             scheme: str = "ffa") -> list[torch.nn.Parameter]:
    """Make ``levels`` the active adapters; return the parameters of ``train`` to optimise.

    Everything else, including the active levels not trained, is frozen, so an
    optimizer can only touch what the caller named.
    """
    levels, train = list(levels), set(train)
    if not train <= set(levels):
        raise ValueError(f"cannot train inactive levels {sorted(train - set(levels))}")
    model.base_model.set_adapter(levels)
    trainable = []
    for name, parameter in model.named_parameters():
        level = _level_of(name)
        wanted = level in train and is_trainable_key(name, scheme)
        parameter.requires_grad_(wanted)
        if wanted:
            trainable.append(parameter)
    return trainable


def _level_of(param_name: str) -> str | None:
    for level in LEVELS:
        if f".{level}." in param_name:
            return level
    return None


# -- files --------------------------------------------------------------------------------

def save_adapter(path: Path, state: Mapping[str, torch.Tensor], config: LoraConfig) -> None:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` atomically.

    The directory is written beside its final place and renamed, so a crash
    leaves either the previous adapter or the new one, never half of each.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        config.save_pretrained(str(staging))
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()},
                  str(staging / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        replace_dir(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_adapter_state(path: Path) -> State:
    """Read an adapter directory's tensors, with a clear error when it is corrupt."""
    path = Path(path)
    weights = path / ADAPTER_WEIGHTS
    if not (path / ADAPTER_CONFIG).is_file() or not weights.is_file():
        raise AdapterFormatError(f"{path}: not an adapter directory (needs {ADAPTER_CONFIG} "
                                 f"and {ADAPTER_WEIGHTS})")
    try:
        json.loads((path / ADAPTER_CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterFormatError(f"{path / ADAPTER_CONFIG}: corrupt adapter config ({err})") \
            from None
    try:
        state = load_file(str(weights))
    except Exception as err:  # safetensors raises several types for a damaged file
        raise AdapterFormatError(f"{weights}: corrupt adapter file ({err})") from None
    for key, tensor in state.items():
        if not torch.isfinite(tensor).all():
            raise AdapterFormatError(f"{weights}: {key} holds NaN or Inf values")
    return state
