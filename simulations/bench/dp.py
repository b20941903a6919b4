"""DP overhead: one local DP-SGD step against the same step without DP, same data.

Variants, on the run's model, batch size and sequence length: plain Adam (no
DP), Opacus ``hooks`` (per-record gradients) and ghost clipping. Time is
interleaved in this process; peak memory needs a fresh process per variant
(``--probe``), since a process's high-water mark only goes up.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from client.trainer import DPSettings, ReleasedOptimizer
from shared.config import RunConfig
from shared.model.adapters import RELEASED_LEVELS, activate
from shared.model.runtime import get_runtime
from simulations.bench.common import (
    Row,
    interleaved,
    memory_kib,
    ratio_row,
    reset_peak_memory,
    spread,
    timed,
)
from simulations.bench.data import bench_records, fixed_batch, reset_released

VARIANTS = ("no-dp", "hooks", "ghost")
TIME_TARGET, MEMORY_TARGET = "<= 1.15", "<= 1.3"


def make_step(cfg: RunConfig, variant: str, batch, steps: int):
    """A callable timing ``steps`` optimizer steps of ``variant`` (wrapping and one warm-up
    step excluded, as a round's steps share one wrapping)."""
    runtime = get_runtime(cfg)

    def run() -> float:
        reset_released(runtime)
        model = runtime.model
        params = activate(model, RELEASED_LEVELS, train=RELEASED_LEVELS, scheme=cfg.lora_scheme)
        model.train()
        dp = DPSettings(variant != "no-dp", cfg.noise_multiplier, cfg.max_grad_norm)
        optimizer = ReleasedOptimizer(
            model, params, lr=cfg.learning_rate, dp=dp, batch_size=cfg.batch_size,
            generator=torch.Generator().manual_seed(cfg.seed),
            grad_sample_mode="hooks" if variant == "no-dp" else variant)
        try:
            optimizer.step(batch)
            return timed(lambda: [optimizer.step(batch) for _ in range(steps)]) / steps
        finally:
            optimizer.close()
            model.eval()
    return run


def probe_memory(cfg: RunConfig, variant: str, steps: int) -> dict:
    """Peak resident memory of ``steps`` steps of ``variant`` (run in a fresh process)."""
    batch = fixed_batch(bench_records(cfg), cfg.batch_size, cfg.seed)
    run = make_step(cfg, variant, batch, steps)
    reset_peak_memory()
    before = memory_kib()["VmRSS"]
    run()
    return {"variant": variant, "rss_before_kib": before, "peak_kib": memory_kib()["VmHWM"]}


def run(cfg: RunConfig, out: Path, *, quick: bool = False) -> dict:
    repeats, steps = (2, 1) if quick else (5, 3)
    batch = fixed_batch(bench_records(cfg), cfg.batch_size, cfg.seed)
    tokens = int(batch.attention_mask.sum())
    print(f"DP step: model {cfg.model}, batch {len(batch)} x {batch.input_ids.shape[1]} tokens, "
          f"{repeats} repeats of {steps} steps")
    times = interleaved({v: make_step(cfg, v, batch, steps) for v in VARIANTS}, repeats)
    memory = {v: _probe_in_subprocess(cfg, v, steps) for v in VARIANTS}
    base = memory["no-dp"]
    rows = []
    for variant in ("hooks", "ghost"):
        rows.append(ratio_row("dp", f"step time, {variant} / no DP", times[variant],
                              times["no-dp"], TIME_TARGET,
                              f"{spread(times[variant])['median']:.3f} s vs "
                              f"{spread(times['no-dp'])['median']:.3f} s per step"))
        m = memory[variant]
        peak = m["peak_kib"] / base["peak_kib"]
        step_growth = ((m["peak_kib"] - m["rss_before_kib"])
                       / max(base["peak_kib"] - base["rss_before_kib"], 1))
        rows.append(Row("dp", f"peak memory, {variant} / no DP",
                        {"min": peak, "median": peak, "max": peak}, MEMORY_TARGET,
                        peak <= 1.3,
                        f"process peak {m['peak_kib'] / 1024:.0f} vs "
                        f"{base['peak_kib'] / 1024:.0f} MiB; the step's own growth "
                        f"{step_growth:.2f}x", {"step_growth_ratio": step_growth}))
    faster = min(("hooks", "ghost"), key=lambda v: spread(times[v])["median"])
    rows.append(Row("dp", "faster DP mode", None, "", None,
                    f"{faster} (default grad-sample-mode: {cfg.grad_sample_mode}); "
                    f"{tokens} tokens per batch"))
    return {"rows": rows, "raw": {"seconds_per_step": times, "memory_kib": memory,
                                  "tokens_per_batch": tokens}}


def _probe_in_subprocess(cfg: RunConfig, variant: str, steps: int) -> dict:
    settings = json.dumps(cfg.to_flower())
    done = subprocess.run([sys.executable, "-m", "simulations.bench.dp", "--probe", variant,
                           "--steps", str(steps), "--config", settings],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory probe {variant} failed: "
                           f"{done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description="memory probe of one DP-step variant")
    parser.add_argument("--probe", choices=VARIANTS, required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--config", required=True, help="the run config as JSON")
    args = parser.parse_args()
    cfg = RunConfig.from_mapping(json.loads(args.config))
    print(json.dumps(probe_memory(cfg, args.probe, args.steps)))


if __name__ == "__main__":
    main()
