"""Changes and their mean: the inner sum every aggregate of a round wraps.

A round's input is each accepted client's *change* of an adapter from what the server
sent it (float64), grouped by level: ``"global"`` over every client, ``"persona/<p>"``
over persona p's members (clients without a persona feed global only). Its output is
one mean change per level (:data:`Changes`), which :func:`server.aggregation.apply.
step_levels` applies as ``sent + lr * mean change``.

Pure functions over ``dict[str, Tensor]``; no Flower, no files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from shared.model.adapters import State

Changes = dict[str, State]  # level ("global", "persona/<p>") -> its mean change this round
GLOBAL = "global"
PERSONA_PREFIX = "persona/"


def level_name(persona: str) -> str:
    """The level of persona ``persona``'s adapter: ``"persona/<p>"``."""
    return PERSONA_PREFIX + persona


@dataclass(frozen=True)
class ClientUpdate:
    """What one accepted reply contributes: its adapter states and weight.

    As parsed from a reply, the states are what the client released; :func:`client_change`
    turns them into changes from what the server sent, the form every aggregate takes."""

    global_state: State
    persona: str
    persona_state: State
    num_examples: int


def change(sent: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> State:
    """``state - sent`` key by key, in float64 (exact for float32 and float16 inputs)."""
    if set(state) != set(sent):
        raise ValueError("a client's adapter has different keys from the one sent")
    return {key: state[key].double() - value.double() for key, value in sent.items()}


def client_change(update: ClientUpdate, sent: Mapping[str, Mapping[str, torch.Tensor]]
                  ) -> ClientUpdate:
    """``update`` as changes from ``sent`` (level -> the tensors the server sent)."""
    persona_change = (change(sent[level_name(update.persona)], update.persona_state)
                      if update.persona and update.persona_state else {})
    return ClientUpdate(global_state=change(sent[GLOBAL], update.global_state),
                        persona=update.persona, persona_state=persona_change,
                        num_examples=update.num_examples)


def weighted_sum(states: Sequence[Mapping[str, torch.Tensor]], coefficients: Sequence[float],
                 like: Mapping[str, torch.Tensor] | None = None) -> State:
    """``sum_i c_i s_i`` key by key, in float64: the sum every aggregate wraps.

    With no states, zeros shaped like ``like`` (a release of noise alone needs them)."""
    if not states:
        if like is None:
            raise ValueError("nothing to sum and no shapes to sum into")
        return {key: torch.zeros(value.shape, dtype=torch.float64) for key, value in like.items()}
    return {key: _in_order_sum([c * s[key].double() for s, c in zip(states, coefficients)])
            for key in states[0]}


def _in_order_sum(terms: Sequence[torch.Tensor]) -> torch.Tensor:
    """``0 + terms[0] + terms[1] + ...`` left to right, exactly as ``sum()`` adds them
    (the leading ``+0`` included: it turns a -0.0 into 0.0), typed as a tensor."""
    total = torch.zeros_like(terms[0])
    for term in terms:
        total = total + term
    return total


def weighted_mean(states: Sequence[Mapping[str, torch.Tensor]],
                  weights: Sequence[float]) -> State:
    """``sum_i (w_i / W) s_i`` key by key, ``W = sum_i w_i`` (McMahan et al., FedAvg, 2017).

    Computed in float64; returns each tensor in the dtype of ``states[0]`` (float64 for
    changes)."""
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
    summed = weighted_sum(states, [w / total for w in weights])
    return {key: summed[key].to(value.dtype) for key, value in states[0].items()}


def group_by_persona(updates: Sequence[ClientUpdate]) -> dict[str, list[ClientUpdate]]:
    """Updates by persona, in first-seen order ("" holds the clients without one)."""
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


def by_level(global_change: State, persona_changes: Mapping[str, State]) -> Changes:
    """``(global, persona -> change)`` as level -> change; the clients without a persona
    ("") count for global only."""
    return {GLOBAL: global_change,
            **{level_name(p): c for p, c in persona_changes.items() if p and c}}


def mean_changes(changes: Sequence[ClientUpdate]) -> Changes:
    """The example-weighted mean change of each level with members this round.

    ``changes`` are :func:`client_change` results; none gives no level (nothing moves)."""
    if not changes:
        return {}
    return by_level(*hierarchical_mean(changes))
