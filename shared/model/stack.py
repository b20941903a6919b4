"""A stack of LoRA adapters as one standard LoRA adapter, exactly.

Serving engines (vLLM, SGLang) apply one LoRA per request, and peft cannot save
a mix of several. On each target module peft computes, with the levels
``l = 1..L`` active, ``W x + sum_l s_l B_l A_l x`` (``s_l``: the level's scaling,
``lora_alpha / r``). The same map is one LoRA of rank ``R = sum_l r_l``::

    A = [A_1; A_2; ...; A_L]            (rows stacked: R x in)
    B = [s_1 B_1, s_2 B_2, ..., s_L B_L]  (columns stacked: out x R)

served at scaling 1 (``lora_alpha = R``): ``B A = sum_l s_l B_l A_l``. The only
difference to the stack is float rounding (the products are summed inside one
matrix product instead of one per level). Pure: tensors in, tensors out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

State = dict[str, torch.Tensor]
LORA_A, LORA_B = ".lora_A.weight", ".lora_B.weight"


class StackError(ValueError):
    """The adapters cannot be stacked (different modules or shapes)."""


def lora_scaling(config: Mapping) -> float:
    """The scaling peft applies to an adapter with this ``adapter_config.json`` content."""
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def concatenate(levels: Sequence[tuple[Mapping[str, torch.Tensor], float]]) -> State:
    """One LoRA state equal to the stack ``levels`` (``(state, scaling)`` pairs, each state
    with peft's keys, A and B of every target module); serve it at scaling 1."""
    if not levels:
        raise StackError("nothing to stack")
    modules = _modules(levels[0][0])
    for state, _ in levels[1:]:
        if _modules(state) != modules:
            raise StackError("the adapters adapt different modules")
    stacked: State = {}
    for module in sorted(modules):
        a = [state[module + LORA_A] for state, _ in levels]
        b = [state[module + LORA_B] * scaling for state, scaling in levels]
        for ai, bi in zip(a, b):
            if ai.shape[0] != bi.shape[1] or ai.shape[1] != a[0].shape[1] \
                    or bi.shape[0] != b[0].shape[0]:
                raise StackError(f"{module}: shapes A {tuple(ai.shape)} and B "
                                 f"{tuple(bi.shape)} do not stack")
        stacked[module + LORA_A] = torch.cat(a, dim=0).contiguous()
        stacked[module + LORA_B] = torch.cat(b, dim=1).contiguous()
    return stacked


def _modules(state: Mapping[str, torch.Tensor]) -> set[str]:
    a = {k.removesuffix(LORA_A) for k in state if k.endswith(LORA_A)}
    b = {k.removesuffix(LORA_B) for k in state if k.endswith(LORA_B)}
    if a != b or len(a) * 2 != len(state):
        raise StackError("an adapter state must hold exactly A and B of each module")
    return a
