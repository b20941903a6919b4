"""Serving a user on the device: pick adapters by the cold-start order, let the device's
own held-out lines choose the stack (:mod:`client.serving.stack`), then generate after the
user's most recent lines."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from client.serving.coldstart import AdapterChoice, choose_adapters
from client.serving.stack import ServedStack, candidates, serve_for_config, stack_name
from client.store import DeviceStore
from shared.config import ConfigError
from shared.data.userdata import Record, load_user
from shared.model.adapters import activate
from shared.model.lm import prompt_ids

MAX_SHOTS = 5


@dataclass(frozen=True)
class Serving:
    choice: AdapterChoice  # the cold-start order's choice (which persona, which adapters)
    stack: ServedStack  # the levels served, as the device's held-out lines chose them
    context: tuple[Record, ...]  # the user's training lines, the most recent first
    context_tokens: int

    @property
    def levels(self) -> tuple[str, ...]:
        return self.stack.levels


@torch.no_grad()
def choose_for_user(evaluator, user_dir: Path, *, shots: int = MAX_SHOTS) -> AdapterChoice:
    """The fallback choice for the user in ``user_dir`` under a run's adapters.

    ``evaluator`` holds the run's adapters on the loaded model
    (:class:`client.serving.run_adapters.RunAdapters`). Loss-based choice uses the user's first
    ``shots`` records, on the device; nothing is trained.
    """
    user = load_user(user_dir, allow_empty=True)
    user_state = DeviceStore.of_run(evaluator.cfg, user.profile.user_id,
                                    user_dir).load_user_adapter()
    known = tuple(p for p in evaluator.persona_states if p not in evaluator.untrained_personas)
    losses, global_loss = None, None
    declared = user.profile.persona if user.profile.persona in known else None
    if not declared and user.train and shots:
        losses, global_loss = evaluator.fit_losses(user.train[:shots])
    choice = choose_adapters(has_user_adapter=user_state is not None,
                             declared_persona=user.profile.persona, known_personas=known,
                             persona_losses=losses, global_loss=global_loss,
                             untrained_personas=evaluator.untrained_personas)
    evaluator.load(persona=choice.persona, user_state=user_state)
    return choice


@torch.no_grad()
def serve_user(evaluator, user_dir: Path, *, context_tokens: int) -> Serving:
    """Everything the device serves its user with: the cold-start choice, then among the
    stacks it allows the one the user's held-out lines favour under the recent context,
    and that context (up to ``context_tokens`` tokens of the user's latest lines)."""
    choice = choose_for_user(evaluator, user_dir)
    train = load_user(user_dir, allow_empty=True).train
    stacks = candidates(has_persona=choice.persona is not None,
                        has_user="user" in choice.levels)
    stack = serve_for_config(
        evaluator.cfg, train, stacks,
        lambda data, levels: evaluator.stats(data, levels, batch_size=4),
        evaluator.runtime.tokenizer, context_tokens=context_tokens)
    return Serving(choice, stack, tuple(reversed(train)), context_tokens)


def force_level(serving: Serving, level: str) -> Serving:
    """``serving`` with the stack named ``level`` instead of the one the held-out lines
    chose; only a stack of the adapters the fallback loaded (a persona only when one
    was chosen, the user level only when the device has one)."""
    levels = () if level == "base" else tuple(level.split("+"))
    allowed = candidates(has_persona=serving.choice.persona is not None,
                         has_user="user" in serving.choice.levels)
    if levels not in allowed:
        raise ConfigError(f"--level {level}: this user has no such stack (can serve "
                          f"{', '.join(stack_name(c) for c in allowed)})")
    return replace(serving, stack=ServedStack(levels, {}, 0))


@torch.no_grad()
def generate_text(evaluator, serving: Serving | AdapterChoice, prompt: str, *,
                  max_new_tokens: int = 40, temperature: float = 0.0, seed: int = 0) -> str:
    """The model's continuation of ``prompt`` (after the served context, if any)."""
    runtime = evaluator.runtime
    context, budget = (serving.context, serving.context_tokens) \
        if isinstance(serving, Serving) else ((), 0)
    ids = prompt_ids(prompt, context, runtime.tokenizer, context_tokens=budget)
    if not ids:
        raise ConfigError("the prompt is empty and there is no context to continue")
    model = runtime.model
    if serving.levels:
        activate(model, serving.levels)
    inputs = torch.tensor([ids], device=runtime.device)
    torch.manual_seed(seed)
    with contextlib.nullcontext() if serving.levels else model.disable_adapter():
        output = model.generate(
            input_ids=inputs, attention_mask=torch.ones_like(inputs),
            max_new_tokens=max_new_tokens, do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else None, top_p=None, top_k=None,
            pad_token_id=runtime.tokenizer.pad_token_id)
    return runtime.tokenizer.decode(output[0, inputs.shape[1]:], skip_special_tokens=True)
