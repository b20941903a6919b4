"""GPU: tokens per second and model FLOP utilisation of the DP step, bfloat16, real model.

Runs only where CUDA is visible; elsewhere it says so and measures nothing.
FLOPs per trained token are counted as ``4 N``, with ``N`` the parameters of
every matrix multiply (the frozen linears and the LM head): ``2N`` forward and
``2N`` for the activation gradients backward; a frozen base needs no weight
gradients, and the LoRA matrices and attention scores (sequence 64) add little.
"""

from __future__ import annotations

from pathlib import Path

import torch

from shared.config import RunConfig
from shared.model.runtime import get_runtime
from simulations.bench.common import Row, interleaved, spread
from simulations.bench.data import bench_records, fixed_batch
from simulations.bench.dp import make_step

# Dense bfloat16 peak FLOP/s (vendor data sheets, SXM parts, no sparsity).
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
             "A10": 125e12}


def matmul_parameters(model) -> int:
    """Parameters that enter a matrix multiply per token (linears and the LM head)."""
    return sum(m.weight.numel() for m in model.modules()
               if isinstance(m, torch.nn.Linear) and "lora_" not in type(m).__name__)


def peak_flops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_BF16.items() if k in device_name), None)


def run(cfg: RunConfig, out: Path, *, quick: bool = False) -> dict:
    if not torch.cuda.is_available():
        return {"rows": [Row("gpu", "DP step on the GPU", None, "", None,
                             "skipped: no CUDA device on this machine")], "raw": {}}
    gcfg = cfg.replace(device="cuda", dtype="bfloat16")
    name = torch.cuda.get_device_name(0)
    peak = peak_flops(name)
    model = get_runtime(gcfg).model
    n = matmul_parameters(model.get_base_model())
    data = bench_records(gcfg)
    rows, raw = [], {"device": name, "peak_flops": peak, "matmul_parameters": n}
    for batch_size in (gcfg.batch_size, 8 * gcfg.batch_size):
        batch = fixed_batch(data, min(batch_size, len(data)), gcfg.seed)
        tokens = int(batch.attention_mask.sum())
        times = interleaved({m: make_step(gcfg, m, batch, 10) for m in ("no-dp", "hooks")},
                            2 if quick else 5)
        for mode, seconds in times.items():
            per_step = spread(seconds)["median"]
            flops = 4 * n * tokens / per_step
            mfu = flops / peak if peak else None
            rows.append(Row("gpu", f"{mode}, batch {len(batch)}: tokens/s", None, "", None,
                            f"{tokens / per_step:,.0f} tokens/s, "
                            + (f"MFU {100 * mfu:.1f}%" if mfu is not None else "peak unknown")
                            + f" on {name}", {"mfu": mfu, "seconds_per_step": seconds}))
        raw[f"batch-{len(batch)}"] = times
    return {"rows": rows, "raw": raw}
