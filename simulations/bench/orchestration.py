"""Orchestration overhead: a simulation round's wall time against its clients' compute.

A client mod times every handler call inside the ClientApp (what the client
computes, model loading included) and records each message's serialised size;
the server's history gives each round's wall time. Both are measured in the
same simulation, so the ratio is free of the machine's drift between runs.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from pathlib import Path

from flwr.common.serde import message_to_proto

from shared.config import RunConfig
from shared.protocol.records import record_bytes
from shared.protocol.wire import KEY_CONFIG, KEY_ROUND, read_run_config
from simulations.bench.common import Row, ratio_row

TARGET = "<= 1.15"
LOG_NAME = "bench-messages.jsonl"
_RUNS: dict[tuple, dict] = {}  # one instrumented simulation per config, per process


def timing_mod(msg, context, call_next):
    """Time the handler (and the mods inside this one) and log the message sizes."""
    start = time.perf_counter()
    reply = call_next(msg, context)
    seconds = time.perf_counter() - start
    cfg = read_run_config(msg.content[KEY_CONFIG])
    entry = {"type": msg.metadata.message_type, "seconds": seconds, "pid": os.getpid(),
             "round": int(msg.content[KEY_ROUND]["server-round"]),
             "bytes_in": message_to_proto(msg).ByteSize(),
             "bytes_out": message_to_proto(reply).ByteSize(),
             "arrays_in": sum(record_bytes(r) for r in msg.content.array_records.values()),
             "arrays_out": sum(record_bytes(r) for r in reply.content.array_records.values())}
    with open(Path(cfg.run_dir) / LOG_NAME, "a") as log:  # one short line: O_APPEND-atomic
        log.write(json.dumps(entry) + "\n")
    return reply


def bench_config(cfg: RunConfig, out: Path, *, quick: bool, **changes) -> RunConfig:
    """The run's per-round settings (clients per round, local and user steps, DP) for two
    rounds (the default rounds are alike) over 8 users, so that every user trains each
    round and the final evaluation stays short, in ``out``."""
    rounds = {"num_rounds": 2, "max_users": cfg.clients_per_round}
    if quick:
        rounds.update(max_users=4, clients_per_round=4)
    return cfg.replace(**{**rounds, **changes, "run_dir": str(out)})


def instrumented_run(cfg: RunConfig) -> dict:
    """Simulate ``cfg`` with the timing mod; the report and the message log (cached)."""
    from client.client_app import make_client_app
    from simulations.run.simulate import simulate

    key = tuple(sorted(cfg.to_flower().items()))
    if key not in _RUNS:
        run_dir = Path(cfg.run_dir)
        if run_dir.exists() and any(run_dir.iterdir()):
            raise FileExistsError(f"{run_dir} is not empty: the benchmark needs a fresh run")
        run_dir.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        report = simulate(cfg, final_evaluation=False, client_app=make_client_app(timing_mod))
        messages = [json.loads(line) for line in (run_dir / LOG_NAME).read_text().splitlines()]
        _RUNS[key] = {"report": report, "messages": messages,
                      "seconds": time.monotonic() - started}
    return _RUNS[key]


def round_compute(messages: list[dict]) -> dict[int, dict[str, float]]:
    """Per round: the sum of the train handlers' seconds and the busiest worker's share."""
    per_round: dict[int, dict[int, float]] = defaultdict(lambda: defaultdict(float))
    for m in messages:
        if m["type"] == "train":
            per_round[m["round"]][m["pid"]] += m["seconds"]
    return {r: {"sum": sum(w.values()), "busiest": max(w.values()), "workers": len(w)}
            for r, w in sorted(per_round.items())}


def run(cfg: RunConfig, out: Path, *, quick: bool = False) -> dict:
    result = instrumented_run(bench_config(cfg, out / "float32", quick=quick))
    compute = round_compute(result["messages"])
    rounds = {h["round"]: h["seconds"] for h in result["report"]["rounds"]}
    walls = [rounds[r] for r in compute]
    sums = [compute[r]["sum"] for r in compute]
    busiest = [compute[r]["busiest"] for r in compute]
    workers = max(c["workers"] for c in compute.values())
    rows = [
        ratio_row("orchestration", "round wall time / sum of its clients' compute", walls, sums,
                  TARGET, f"{len(walls)} rounds; clients run on {workers} workers at once, so "
                  "this is below 1 when they overlap"),
        ratio_row("orchestration", "round wall time / busiest worker's compute", walls,
                  busiest, TARGET, "the critical path: what the round adds to the slowest "
                  "worker (dispatch, serialisation, validation, aggregation, checkpoint)"),
        Row("orchestration", "whole simulation", None, "", None,
            f"{result['seconds']:.0f} s for {len(walls)} rounds of "
            f"{result['report']['rounds'][0]['clients']} clients, start-up and final "
            "evaluation included"),
    ]
    return {"rows": rows, "raw": {"round_wall": rounds, "compute": compute}}
