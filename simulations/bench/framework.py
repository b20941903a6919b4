"""Framework overhead: fedpersona's local training against a bare torch + peft loop.

Both train, without DP, the B matrices of two stacked LoRA adapters (global and
persona under FFA) on the same records in the same order, one round's
``local-steps`` per call. fedpersona's side is ``client.trainer.train_released``
as a client runs it (adapter activation, snapshots, the moved-adapter check,
its per-record loss); the bare side is the loop a person would write with peft
and the model's own loss. Throughput is tokens per second over the same tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from client.trainer import DPSettings, train_released
from shared.config import RunConfig
from shared.model.base import load_base_model
from shared.model.runtime import _DTYPES, get_runtime
from simulations.bench.common import interleaved, ratio_row, spread, timed
from simulations.bench.data import bench_records, reset_released

TARGET = ">= 0.9"


def batch_indices(num_records: int, batch_size: int, steps: int, seed: int) -> list:
    """The batches ``train_released`` draws without DP (same generator, same calls)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randperm(num_records, generator=generator)[:batch_size] for _ in range(steps)]


def bare_peft_model(cfg: RunConfig):
    """The run's base model with two LoRA adapters, both active, only B trainable."""
    device = get_runtime(cfg).device
    base = load_base_model(cfg.model, device=device, dtype=_DTYPES[cfg.dtype], seed=cfg.seed)
    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                      target_modules=list(cfg.lora_target_modules))
    model = get_peft_model(base, lora, adapter_name="first")
    model.add_adapter("second", lora)
    model.base_model.set_adapter(["first", "second"])
    params = []
    for name, parameter in model.named_parameters():
        parameter.requires_grad_("lora_B" in name)
        if "lora_B" in name:
            params.append(parameter)
    return model, params


def run(cfg: RunConfig, out: Path, *, quick: bool = False) -> dict:
    repeats = 2 if quick else 5
    steps = cfg.local_steps
    runtime = get_runtime(cfg)
    data = bench_records(cfg)
    batches = batch_indices(len(data), cfg.batch_size, steps, cfg.seed)
    tokens = sum(int(data.attention_mask[index].sum()) for index in batches)
    bare, bare_params = bare_peft_model(cfg)
    device = runtime.device
    no_dp = DPSettings(False, cfg.noise_multiplier, cfg.max_grad_norm)

    def fedpersona() -> float:
        reset_released(runtime)
        return timed(lambda: train_released(
            runtime.model, data, steps=steps, batch_size=cfg.batch_size, lr=cfg.learning_rate,
            dp=no_dp, scheme=cfg.lora_scheme, generator=torch.Generator().manual_seed(cfg.seed),
            grad_sample_mode=cfg.grad_sample_mode))

    def bare_loop() -> float:
        optimizer = torch.optim.Adam(bare_params, lr=cfg.learning_rate)
        bare.train()

        def loop() -> None:
            for index in batches:
                mask = data.attention_mask[index]
                width = int(mask.sum(dim=1).max())
                optimizer.zero_grad()
                loss = bare(input_ids=data.input_ids[index, :width].to(device),
                            attention_mask=mask[:, :width].to(device),
                            labels=data.labels[index, :width].to(device)).loss
                loss.backward()
                optimizer.step()
        return timed(loop)

    print(f"framework: {steps} steps x {cfg.batch_size} records ({tokens} tokens), "
          f"{repeats} repeats")
    times = interleaved({"fedpersona": fedpersona, "bare torch+peft": bare_loop}, repeats)
    fed, plain = times["fedpersona"], times["bare torch+peft"]
    row = ratio_row("framework", "tokens/s, fedpersona / bare torch+peft (no DP)", plain, fed,
                    TARGET, f"{tokens / spread(fed)['median']:.0f} vs "
                    f"{tokens / spread(plain)['median']:.0f} tokens/s")
    return {"rows": [row], "raw": {"seconds": times, "tokens": tokens}}
