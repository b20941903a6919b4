"""Serving a user on the device: pick adapters by the cold-start order, then generate."""

from __future__ import annotations

from pathlib import Path

import torch

from client.coldstart import AdapterChoice, choose_adapters
from client.store import DeviceStore
from shared.adapters import activate
from shared.userdata import load_user

MAX_SHOTS = 5


@torch.no_grad()
def choose_for_user(evaluator, user_dir: Path, *, shots: int = MAX_SHOTS) -> AdapterChoice:
    """The fallback choice for the user in ``user_dir`` under a run's adapters.

    ``evaluator`` is a :class:`simulations.evaluate.RunEvaluator` (the run's
    adapters on the loaded model). Loss-based choice uses the user's first
    ``shots`` records, on the device; nothing is trained.
    """
    user = load_user(user_dir, allow_empty=True)
    user_state = DeviceStore(user_dir, evaluator.cfg.federation_key).load_user_adapter()
    known = tuple(evaluator.persona_states)
    losses, global_loss = None, None
    declared = user.profile.persona if user.profile.persona in known else None
    if not declared and user.train and shots:
        losses, global_loss = evaluator.fit_losses(user.train[:shots])
    choice = choose_adapters(has_user_adapter=user_state is not None,
                             declared_persona=user.profile.persona, known_personas=known,
                             persona_losses=losses, global_loss=global_loss)
    evaluator.load(persona=choice.persona, user_state=user_state)
    return choice


@torch.no_grad()
def generate_text(evaluator, choice: AdapterChoice, prompt: str, *, max_new_tokens: int = 40,
                  temperature: float = 0.0, seed: int = 0) -> str:
    runtime = evaluator.runtime
    activate(runtime.model, choice.levels)
    inputs = runtime.tokenizer(prompt, return_tensors="pt").to(runtime.device)
    torch.manual_seed(seed)
    output = runtime.model.generate(
        **inputs, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else None, top_p=None, top_k=None,
        pad_token_id=runtime.tokenizer.pad_token_id)
    return runtime.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:],
                                    skip_special_tokens=True)
