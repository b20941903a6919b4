"""``fedpersona bench``: run the named benchmarks and write their table and JSON.

The benchmarks (:mod:`simulations.bench.dp`, ``framework``, ``orchestration``,
``comm``, ``scale``, ``gpu``) share their measuring helpers through
:mod:`simulations.bench.common`; only this module imports them all.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from simulations.bench.common import BENCHES, Row, render_table, write_results


def run_bench_command(names: list[str], out: Path, settings: list[str], *,
                      quick: bool = False) -> int:
    """Run the named benchmarks (``all`` = every one) with the run settings ``key=value``."""
    from simulations.bench import comm, dp, framework, gpu, orchestration, scale
    from simulations.run.simulate import resolve_config

    modules = {"dp": dp, "framework": framework, "orchestration": orchestration,
               "communication": comm, "scale": scale, "gpu": gpu}
    chosen = list(BENCHES) if "all" in names else names
    cfg = resolve_config(None, settings)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    raw: dict[str, Any] = {}
    started = time.monotonic()
    for name in chosen:
        print(f"== bench {name}", flush=True)
        t0 = time.monotonic()
        result = modules[name].run(cfg, out / name, quick=quick)
        rows.extend(result["rows"])
        raw[name] = result.get("raw", {})
        print(render_table(result["rows"]) + f"\n({time.monotonic() - t0:.0f} s)\n", flush=True)
    print(write_results(out, rows, raw, time.monotonic() - started))
    print(f"wrote {out / 'bench.json'} and {out / 'bench.md'}")
    return 0
