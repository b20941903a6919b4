"""Aggregation of adapter states: weighted FedAvg and the FedAdam server optimizer.

Pure functions over ``dict[str, Tensor]``; no Flower, no files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

State = dict[str, torch.Tensor]


def weighted_mean(states: Sequence[Mapping[str, torch.Tensor]],
                  weights: Sequence[float]) -> State:
    """``sum_i w_i s_i / sum_i w_i`` key by key (McMahan et al., FedAvg, 2017)."""
    if not states:
        raise ValueError("nothing to aggregate")
    if len(states) != len(weights):
        raise ValueError(f"{len(states)} states but {len(weights)} weights")
    total = float(sum(weights))
    if not total > 0:
        raise ValueError(f"weights must sum to a positive number, got {total}")
    keys = set(states[0])
    for state in states[1:]:
        if set(state) != keys:
            raise ValueError("states have different keys")
    return {key: sum((w / total) * s[key].double() for s, w in zip(states, weights)).to(
        states[0][key].dtype) for key in states[0]}


@dataclass
class FedAdamState:
    """First and second moments of one adapter's pseudo-gradient."""

    m: State = field(default_factory=dict)
    v: State = field(default_factory=dict)


def fedadam_step(current: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor],
                 state: FedAdamState, *, lr: float, beta1: float = 0.9, beta2: float = 0.99,
                 tau: float = 1e-3) -> tuple[State, FedAdamState]:
    """One FedAdam step towards the clients' mean (Reddi et al., "Adaptive Federated
    Optimization", ICLR 2021): the pseudo-gradient is ``target - current``."""
    new, m, v = {}, {}, {}
    for key, value in current.items():
        delta = target[key] - value
        m[key] = beta1 * state.m.get(key, torch.zeros_like(delta)) + (1 - beta1) * delta
        v[key] = beta2 * state.v.get(key, torch.zeros_like(delta)) + (1 - beta2) * delta * delta
        new[key] = value + lr * m[key] / (v[key].sqrt() + tau)
    return new, FedAdamState(m=m, v=v)


@dataclass(frozen=True)
class ClientUpdate:
    """What one accepted reply contributes: its released adapter states and weight."""

    global_state: State
    persona: str
    persona_state: State
    num_examples: int


def group_by_persona(updates: Sequence[ClientUpdate]) -> dict[str, list[ClientUpdate]]:
    groups: dict[str, list[ClientUpdate]] = {}
    for update in updates:
        groups.setdefault(update.persona, []).append(update)
    return groups


def hierarchical_mean(updates: Sequence[ClientUpdate]) -> tuple[State, dict[str, State]]:
    """Global over every update; each persona over its members only, by examples."""
    global_mean = weighted_mean([u.global_state for u in updates],
                                [u.num_examples for u in updates])
    persona_means = {
        persona: weighted_mean([u.persona_state for u in members],
                               [u.num_examples for u in members])
        for persona, members in group_by_persona(updates).items()}
    return global_mean, persona_means
