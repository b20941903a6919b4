"""The ServerApp: rounds of hierarchical DP-LoRA, checkpoints, evaluation and the report.

The Flower entry only; a run's state and plans are :mod:`server.run`, a round is
:mod:`server.rounds`, what is measured :mod:`server.evaluation`, the nodes
:mod:`server.nodes`, what is sent :mod:`server.messages`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from server.evaluation import final_report
from server.rounds import RoundAbandoned, run_round
from server.run import start_run
from server.run_record import new_run_dir
from shared.config import RunConfig

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = RunConfig.from_mapping(context.run_config)
    if not cfg.run_dir:  # every run its own directory, which the devices are told
        cfg = cfg.replace(run_dir=str(new_run_dir()))
    run_server(grid, cfg)


class StoppedBetweenRounds(Exception):
    """The run was asked to stop; every round up to ``after_round`` is checkpointed."""

    def __init__(self, after_round: int):
        super().__init__(f"stopped after round {after_round}")
        self.after_round = after_round


def run_server(grid: Grid, cfg: RunConfig, progress: Callable[[str], None] = print, *,
               secagg_observer: Callable[[str, Message], None] | None = None,
               should_stop: Callable[[], bool] = lambda: False) -> dict:
    """Train for ``num-rounds`` (resuming from the run directory's checkpoint), evaluate,
    and write the report. Returns the report. ``secagg_observer`` is shown every reply
    of the SecAgg+ protocol (:class:`server.secagg.SecureRound`). ``should_stop`` is
    asked after every round's checkpoint: true ends the run there
    (:class:`StoppedBetweenRounds`), to be resumed."""
    started = time.monotonic()
    run = start_run(grid, cfg, progress)
    first, rounds_started = run.state.round, time.monotonic()
    for server_round in range(first + 1, cfg.num_rounds + 1):
        left = cfg.num_rounds - server_round

        def with_eta(line: str, done: int = server_round - first, left: int = left) -> None:
            per_round = (time.monotonic() - rounds_started) / done
            progress(line + (f"; about {remaining(per_round * left)} left" if left else ""))

        try:
            run_round(grid, run, server_round, with_eta, secagg_observer=secagg_observer,
                      stopping=should_stop)
        except RoundAbandoned:
            raise StoppedBetweenRounds(server_round - 1) from None
        if should_stop():  # after the last round too: a resume then only evaluates
            raise StoppedBetweenRounds(server_round)
    return final_report(grid, run, started, progress)


def remaining(seconds: float) -> str:
    """A duration as a person reads an estimate of it."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
