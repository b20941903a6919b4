"""Scale: simulations with 100, 300 and 1,000 clients on the tiny model, and the server's
memory at each.

Each size runs in a fresh process (a process's memory high-water mark only
goes up). Every size trains the same number of clients per round, so what can
grow with the fleet is only what the server keeps per client (its node table)
and the simulation engine's per-node bookkeeping; the adapters it keeps grow
with the personas. The server's own adapter state is also measured exactly, as
the bytes of its checkpoint.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from shared.config import RunConfig
from shared.data.userdata import Population, Profile, Record, UserData, write_population
from simulations.bench.common import Row, memory_kib

SIZES = (100, 300, 1000)
QUICK_SIZES = (10, 20)
PERSONAS = ("p0", "p1", "p2", "p3")
MEMORY_TARGET = "<= 1.15"
_WORDS = [
    "now", "is", "the", "winter", "of", "our", "discontent", "made", "glorious", "summer", "by",
    "this", "sun", "of", "york", "and", "all", "the", "clouds", "that", "lowered", "upon",
    "our", "house"]


def synthetic_population(out: Path, num_users: int) -> Population:
    """``num_users`` users over four personas, 8 train and 2 test records each."""
    def records(offset: int, n: int) -> tuple[Record, ...]:
        return tuple(Record(" ".join(_WORDS[(offset + i + j) % len(_WORDS)]
                                     for j in range(4 + i % 5))) for i in range(n))
    users = [("train", UserData(Profile(f"u{i:04d}", PERSONAS[i % len(PERSONAS)]),
                                records(i, 8), records(i + 3, 2)))
             for i in range(num_users)]
    return write_population(out, users, {"personas": list(PERSONAS)})


def scale_config(out: Path, num_users: int, clients_per_round: int) -> RunConfig:
    return RunConfig(model="tiny", data_dir=str(out / "population"), max_users=0,
                     num_rounds=2, clients_per_round=clients_per_round, local_steps=1,
                     user_steps=1, batch_size=4, seq_len=32, eval_max_records=2,
                     lora_rank=4, lora_alpha=8.0, device="cpu", run_dir=str(out / "run"))


def probe(out: Path, num_users: int, clients_per_round: int) -> dict:
    """Run one size here; this process's memory before and at its peak."""
    from simulations.run.simulate import simulate

    synthetic_population(out / "population", num_users)
    cfg = scale_config(out, num_users, clients_per_round)
    before = memory_kib()["VmRSS"]
    started = time.monotonic()
    report = simulate(cfg, final_evaluation=False, num_cpus=2)
    seconds = time.monotonic() - started
    checkpoint = sum(f.stat().st_size for f in (out / "run" / "checkpoint").rglob("*")
                     if f.is_file() and "round-" in str(f))
    return {"clients": num_users, "seconds": seconds, "rss_before_kib": before,
            "peak_kib": memory_kib()["VmHWM"],
            "accepted": [r["accepted"] for r in report["rounds"]],
            "evaluated_users": report["levels"]["global"]["users"],
            "checkpoint_bytes": checkpoint}


def run(cfg: RunConfig, out: Path, *, quick: bool = False) -> dict:
    sizes = QUICK_SIZES if quick else SIZES
    per_round = min(sizes) // 2
    results = {}
    for n in sizes:
        print(f"scale: {n} clients ({per_round} per round, 2 rounds)", flush=True)
        results[n] = _probe_in_subprocess(out / f"clients-{n}", n, per_round)
        r = results[n]
        print(f"  {r['seconds']:.0f} s, server process peak {r['peak_kib'] / 1024:.0f} MiB, "
              f"accepted {r['accepted']}, evaluated {r['evaluated_users']}", flush=True)
    small, large = results[sizes[0]], results[sizes[-1]]
    growth = large["peak_kib"] / small["peak_kib"]
    per_client_kib = ((large["peak_kib"] - small["peak_kib"]) / (sizes[-1] - sizes[0]))
    rows = [
        Row("scale", f"{sizes[-1]} clients: completed", None, "", all(
            r["evaluated_users"] == n for n, r in results.items()),
            f"{large['seconds']:.0f} s; every client queried and evaluated, "
            f"{per_round} trained per round"),
        Row("scale", f"server process peak memory, {sizes[-1]} / {sizes[0]} clients",
            {"min": growth, "median": growth, "max": growth}, MEMORY_TARGET,
            growth <= 1.15, ", ".join(f"{n}: {r['peak_kib'] / 1024:.0f} MiB"
                                       for n, r in results.items())
            + f"; {per_client_kib:.1f} KiB per extra client"),
        Row("scale", "server adapter state (checkpoint)", None, "", None,
            ", ".join(f"{n}: {r['checkpoint_bytes'] / 1024:.0f} KiB"
                      for n, r in results.items()) + f" for {len(PERSONAS)} personas"),
    ]
    return {"rows": rows, "raw": {str(n): r for n, r in results.items()}}


def _probe_in_subprocess(out: Path, num_users: int, clients_per_round: int) -> dict:
    done = subprocess.run([sys.executable, "-m", "simulations.bench.scale", "--probe",
                           str(num_users), "--per-round", str(clients_per_round),
                           "--out", str(out)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-3:]
        raise RuntimeError(f"scale probe with {num_users} clients failed: {tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description="one size of the scale benchmark")
    parser.add_argument("--probe", type=int, required=True, help="number of clients")
    parser.add_argument("--per-round", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    print(json.dumps(probe(args.out, args.probe, args.per_round)))


if __name__ == "__main__":
    main()
