"""The server's step: every level moves by ``sent + lr * mean change``.

Whatever computed the mean change (the mean, robust aggregation, user-level DP, or
SecAgg+'s sum), one step applies it: FedAvg's ``sent + lr * change`` (McMahan et al.
2017; ``lr = 1`` takes the mean), or FedAdam's ``sent + lr * m / (sqrt(v) + tau)``
with the mean change as pseudo-gradient (Reddi et al., "Adaptive Federated
Optimization", ICLR 2021). The step is taken in float64 and cast back to the dtype of
what was sent, so it rounds once.

Pure functions over ``dict[str, Tensor]``; no Flower, no files.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from server.aggregation.mean import Changes, State
from shared.config import SERVER_OPTIMIZERS


def apply_change(sent: Mapping[str, torch.Tensor], change: Mapping[str, torch.Tensor], *,
                 lr: float) -> State:
    """``sent + lr * change`` key by key, computed in float64, in the dtype of ``sent``."""
    return {key: (value.double() + lr * change[key].double()).to(value.dtype)
            for key, value in sent.items()}


@dataclass
class FedAdamState:
    """First and second moments of one adapter's pseudo-gradient."""

    m: State = field(default_factory=dict)
    v: State = field(default_factory=dict)


def fedadam_step(sent: Mapping[str, torch.Tensor], change: Mapping[str, torch.Tensor],
                 state: FedAdamState, *, lr: float, beta1: float = 0.9, beta2: float = 0.99,
                 tau: float = 1e-3) -> tuple[State, FedAdamState]:
    """One FedAdam step (Reddi et al. 2021) with pseudo-gradient ``change``.

    ``m = b1 m + (1 - b1) d``, ``v = b2 v + (1 - b2) d^2`` and ``sent + lr * m /
    (sqrt(v) + tau)``, computed in float64; the moments are kept in the dtype of ``sent``
    (they are checkpointed with it). Inputs are not modified."""
    direction, m, v = {}, {}, {}
    for key, value in sent.items():
        delta = change[key].double()
        zero = torch.zeros_like(delta)
        m64 = beta1 * state.m.get(key, zero).double() + (1 - beta1) * delta
        v64 = beta2 * state.v.get(key, zero).double() + (1 - beta2) * delta * delta
        direction[key] = m64 / (v64.sqrt() + tau)
        m[key], v[key] = m64.to(value.dtype), v64.to(value.dtype)
    return apply_change(sent, direction, lr=lr), FedAdamState(m=m, v=v)


def step_levels(sent: Mapping[str, Mapping[str, torch.Tensor]], changes: Changes,
                moments: Mapping[str, FedAdamState], *, optimizer: str,
                lr: float) -> tuple[dict[str, State], dict[str, FedAdamState]]:
    """Each level in ``changes`` stepped from what was sent; state in, state out.

    Parameters
    ----------
    sent : level -> the tensors the server sent (every level in ``changes``).
    changes : level -> its mean change this round; a level absent does not move.
    moments : level -> FedAdam's moments so far (``optimizer = "fedadam"``).
    optimizer : ``"fedavg"`` or ``"fedadam"``.
    lr : the server learning rate.

    Returns the stepped levels (the keys of ``changes``) and, under FedAdam, their new
    moments (empty under FedAvg).
    """
    if optimizer not in SERVER_OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(SERVER_OPTIMIZERS)}; got "
                         f"{optimizer!r}")
    new: dict[str, State] = {}
    new_moments: dict[str, FedAdamState] = {}
    for name, change in changes.items():
        if optimizer == "fedadam":
            new[name], new_moments[name] = fedadam_step(
                sent[name], change, moments.get(name, FedAdamState()), lr=lr)
        else:
            new[name] = apply_change(sent[name], change, lr=lr)
    return new, new_moments
