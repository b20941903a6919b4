"""A finished run's released adapters on the device's model: what serving, the
cold-start choice and the evaluation all score a user's lines with."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

import torch

from shared.config import RunConfig
from shared.model.adapters import LEVELS, activate, load_adapter_state, load_level
from shared.model.lm import EncodedRecords, encode_records, evaluate_stats, per_record_loss
from shared.model.runtime import Runtime, get_runtime
from shared.util.metrics import TokenStats


class RunAdapters:
    """One run's released adapters (global, each persona) held beside the device's model,
    loaded into its slots on demand, and the model's losses under any stack of them."""

    def __init__(self, run_dir: Path, cfg: RunConfig):
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self.runtime: Runtime = get_runtime(cfg)
        self.global_state = load_adapter_state(self.run_dir / "adapters" / "global")
        persona_root = self.run_dir / "adapters" / "persona"
        self.persona_states = {p.name: load_adapter_state(p) for p in sorted(
            persona_root.iterdir())} if persona_root.is_dir() else {}
        # B is initialised to zero: an adapter whose every B is still zero never trained
        self.untrained_personas = frozenset(
            p for p, state in self.persona_states.items()
            if not any(bool(t.any()) for k, t in state.items() if "lora_B" in k))

    def encode(self, records) -> EncodedRecords:
        return encode_records(records, self.runtime.tokenizer, self.cfg.seq_len)

    def test_data(self, user) -> EncodedRecords:
        records = user.test[:self.cfg.eval_max_records] if self.cfg.eval_max_records \
            else user.test
        return self.encode(records)

    def load(self, *, persona: str | None = None, user_state=None) -> None:
        model, initial = self.runtime.model, self.runtime.initial
        load_level(model, "global", self.global_state)
        load_level(model, "persona", self.persona_states[persona] if persona else
                   initial["persona"])
        load_level(model, "user", user_state if user_state is not None else initial["user"])

    def clean(self) -> None:
        """Every level at its initial state (B = 0: the base model's outputs)."""
        for level in LEVELS:
            load_level(self.runtime.model, level, self.runtime.initial[level])

    def stats(self, data: EncodedRecords, levels: Sequence[str], *,
              batch_size: int = 8) -> TokenStats:
        model = self.runtime.model
        if not levels:
            with model.disable_adapter():
                return evaluate_stats(model, data, batch_size=batch_size)
        activate(model, levels)
        return evaluate_stats(model, data, batch_size=batch_size)

    @torch.no_grad()
    def record_losses(self, data: EncodedRecords, levels: Sequence[str], *,
                      batch_size: int = 32) -> torch.Tensor:
        """``(N,)`` mean NLL of each record under ``levels`` (``()``: the base model)."""
        model = self.runtime.model
        model.eval()
        if levels:
            activate(model, levels)
        out = []
        with contextlib.nullcontext() if levels else model.disable_adapter():
            for start in range(0, len(data), batch_size):
                index = torch.arange(start, min(start + batch_size, len(data)))
                out.append(per_record_loss(model, data.select(index)).float().cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def mean_loss(self, data: EncodedRecords, levels: Sequence[str]) -> float:
        return float(self.record_losses(data, levels).mean())

    def fit_losses(self, records) -> tuple[dict[str, float], float]:
        """Mean loss on ``records`` of global + each persona, and of global alone: what the
        loss-based cold-start choice compares (no training). Leaves clean slots."""
        data = self.encode(records)
        losses = {}
        for persona in self.persona_states:
            self.load(persona=persona)
            losses[persona] = self.mean_loss(data, ("global", "persona"))
        self.load()
        return losses, self.mean_loss(data, ("global",))
