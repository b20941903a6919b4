"""Communication: bytes per client per round against the base model's float32 size, and
what float16 transport saves and costs (the final perplexity of the same run)."""

from __future__ import annotations

import statistics
from pathlib import Path

from shared.config import RunConfig
from shared.model.runtime import get_runtime
from simulations.bench.common import Row
from simulations.bench.orchestration import bench_config, instrumented_run

UPLOAD_TARGET = 0.005  # of the base model's float32 bytes


def model_bytes(cfg: RunConfig) -> int:
    """The frozen base model's parameters at 4 bytes each (adapters excluded)."""
    model = get_runtime(cfg).model
    return 4 * sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)


def per_client(messages: list[dict]) -> dict[str, float]:
    train = [m for m in messages if m["type"] == "train"]
    return {"upload": statistics.median(m["bytes_out"] for m in train),
            "download": statistics.median(m["bytes_in"] for m in train),
            "upload_arrays": statistics.median(m["arrays_out"] for m in train)}


def _ppl(report: dict, level: str) -> float:
    return float(report["levels"][level]["perplexity"])


def run(cfg: RunConfig, out: Path, *, quick: bool = False) -> dict:
    size = model_bytes(cfg)
    arms = {dtype: instrumented_run(bench_config(cfg, out.parent / "orchestration" / dtype,
                                                 quick=quick, transport_dtype=dtype))
            for dtype in ("float32", "float16")}
    traffic = {dtype: per_client(arm["messages"]) for dtype, arm in arms.items()}
    rows = []
    for dtype, t in traffic.items():
        share = t["upload"] / size
        rows.append(Row("communication", f"upload per client per round ({dtype}) / fp32 model",
                        {"min": share, "median": share, "max": share}, f"<= {UPLOAD_TARGET}",
                        share <= UPLOAD_TARGET,
                        f"{t['upload'] / 1e6:.3f} MB up, {t['download'] / 1e6:.3f} MB down; "
                        f"model {size / 1e6:.0f} MB"))
    half = traffic["float16"]["upload"] / traffic["float32"]["upload"]
    rows.append(Row("communication", "upload, float16 / float32 transport",
                    {"min": half, "median": half, "max": half}, "", None,
                    "whole messages (metrics, headers) included"))
    levels = arms["float32"]["report"]["levels"]
    for level in ("global", "global+persona", "global+persona+user"):
        if level in levels:
            ratio = _ppl(arms["float16"]["report"], level) / _ppl(arms["float32"]["report"], level)
            rows.append(Row("communication", f"perplexity ({level}), float16 / float32 transport",
                            {"min": ratio, "median": ratio, "max": ratio}, "", None,
                            f"{_ppl(arms['float16']['report'], level):.2f} vs "
                            f"{_ppl(arms['float32']['report'], level):.2f}; independent DP draws"))
    return {"rows": rows, "raw": {"model_bytes": size, "per_client": traffic}}
