"""``fedpersona bench``: performance as ratios of two things measured side by side.

This machine is noisy (shared cores, other jobs), so no figure here is an
absolute time on its own: every target is a ratio of two variants timed in the
same process, in alternating order, repeated, and reported as min / median /
max over the repeats. Each benchmark module returns rows built with the helpers
here; :mod:`simulations.bench.command` runs them, writes ``bench.json`` and
``bench.md`` and prints the table.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shared.util.atomic import write_json_atomic, write_text_atomic

BENCHES = ("dp", "framework", "orchestration", "communication", "scale", "gpu")


@dataclass
class Row:
    """One measured figure: a ratio (min / median / max over repeats) against a target."""

    bench: str
    measure: str
    ratio: dict[str, float] | None  # {"min", "median", "max"}; None when not a ratio
    target: str  # e.g. "<= 1.15"; "" when there is none
    met: bool | None
    detail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def spread(values: list[float]) -> dict[str, float]:
    if not values:
        raise ValueError("no measurements")
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def judged(value: float, target: str) -> bool | None:
    """Whether ``value`` meets ``target`` ("<= 1.15", ">= 0.9"); None without a target."""
    if not target:
        return None
    op, bound = target.split()
    return value <= float(bound) if op == "<=" else value >= float(bound)


def ratio_row(bench: str, measure: str, numerators: list[float], denominators: list[float],
              target: str, detail: str = "", **extra) -> Row:
    """A row from paired measurements: the ratio is taken per repeat, then summarised."""
    if len(numerators) != len(denominators):
        raise ValueError("ratios need paired measurements")
    ratios = spread([a / b for a, b in zip(numerators, denominators)])
    return Row(bench, measure, ratios, target, judged(ratios["median"], target), detail,
               {"numerator": spread(numerators), "denominator": spread(denominators), **extra})


def interleaved(variants: dict[str, Callable[[], float]], repeats: int,
                progress: Callable[[str], None] = print) -> dict[str, list[float]]:
    """Run each variant once untimed, then once per repeat, rotating which goes first; each
    call returns its own measured seconds (setup excluded). A slow spell then hits every
    variant alike."""
    names = list(variants)
    for name in names:  # warm-up: first-call allocations and lazy initialisation
        variants[name]()
    results: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            results[name].append(variants[name]())
        progress(f"  repeat {repeat + 1}/{repeats}: " + ", ".join(
            f"{name} {results[name][-1]:.3f}s" for name in names))
    return results


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# -- process memory (Linux /proc; the CPU has no allocator statistics like CUDA's) ----------

def memory_kib() -> dict[str, int]:
    """Resident set now (``VmRSS``) and its high-water mark (``VmHWM``), in KiB."""
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0])
    return values


def reset_peak_memory() -> None:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0), so a peak is of what follows."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


# -- the table and the files ------------------------------------------------------------------

def _fmt(value: float) -> str:
    if abs(value) < 0.1:
        return f"{value:.4f}"  # e.g. a share of the model's bytes
    return f"{value:.3f}" if abs(value) < 100 else f"{value:,.0f}"


def render_table(rows: list[Row]) -> str:
    lines = ["| benchmark | measure | ratio median (min-max) | target | met | detail |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        ratio = ("" if row.ratio is None else
                 f"{_fmt(row.ratio['median'])} ({_fmt(row.ratio['min'])}-"
                 f"{_fmt(row.ratio['max'])})")
        met = {True: "yes", False: "**no**", None: ""}[row.met]
        lines.append(f"| {row.bench} | {row.measure} | {ratio} | {row.target} | {met} | "
                     f"{row.detail} |")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    import os

    import torch
    return {"platform": platform.platform(), "processor": platform.processor(),
            "cpus": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def write_results(out: Path, rows: list[Row], raw: dict[str, Any], seconds: float) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    info = machine()
    table = render_table(rows)
    header = (f"fedpersona bench, {stamp}, {info['cpus']} CPUs ({info['platform']}), "
              f"torch {info['torch']}, GPU: {info['cuda'] or 'none'}; {seconds / 60:.1f} min")
    write_json_atomic(out / "bench.json", {"date": stamp, "machine": info, "seconds": seconds,
                                          "rows": [asdict(r) for r in rows], "raw": raw})
    write_text_atomic(out / "bench.md", f"{header}\n\n{table}\n")
    return f"{header}\n\n{table}"


def dump(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, default=str))
