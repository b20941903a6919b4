"""``fedpersona simulate``: the federated run on Flower's Simulation Engine (Ray).

Settings come from ``[tool.flwr.app.config]`` of the ``pyproject.toml`` in the
current directory when it is this app's (else the built-in defaults, which are
the same), then from ``key=value`` overrides. One simulated SuperNode per
training user; ``partition-id`` names the user on both sides.

Why ``flwr.simulation.run_simulation``, which Flower 1.42 marks deprecated, and not
``flwr run`` against a local SuperLink (which works for this app too:
``tests/test_flwr_run.py``): ``flwr run`` starts the ServerApp and the ClientApps
in processes of the SuperLink's, from the app's declared components, so what this
command does in its own process does not come along (it would take a second app
per variant):

- a ClientApp other than the device's (the fault injector, the placement log on a
  Ray cluster, the misbehaving clients of the tests) and the server's SecAgg+
  observer (the tests' view of every protocol reply);
- Ray started here before the signal handlers, so that Ctrl-C and SIGTERM stop
  after a checkpoint (:mod:`simulations.run.stop`), and a Ray cluster joined with
  ``--ray-address``;
- the run's settings as one object, checked against the run directory before any
  worker starts, and the evaluation in this process after the rounds.

This module is the only user of ``run_simulation``;
``tests/test_simulation.py::test_the_deprecated_engine_this_command_uses_is_there``
fails when Flower removes it or changes what is passed to it.
"""

from __future__ import annotations

import json
import logging
import os
import tomllib
from collections.abc import Callable
from pathlib import Path

from shared.config import ConfigError, RunConfig, parse_overrides
from simulations.run.stop import RunStopped, StopRequest


def app_config_defaults(pyproject: Path) -> dict:
    """``[tool.flwr.app.config]`` of a fedpersona pyproject, or ``{}``."""
    if not pyproject.is_file():
        return {}
    try:
        data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{pyproject}: malformed TOML ({err})") from None
    flwr = data.get("tool", {}).get("flwr", {})
    if flwr.get("app", {}).get("publisher") != "fedpersona":
        return {}
    return dict(flwr.get("app", {}).get("config", {}))


def resolve_config(out: Path | None, settings: list[str], *,
                   pyproject: Path = Path("pyproject.toml")) -> RunConfig:
    values = app_config_defaults(pyproject)
    values.update(parse_overrides(settings))
    if out is not None:
        values["run-dir"] = str(Path(out).resolve())
    return RunConfig.from_mapping(values)


def simulate(cfg: RunConfig, *, num_cpus: int | None = None, final_evaluation: bool = True,
             cold_start_k: int = 5, client_app=None, secagg_observer=None,
             progress: Callable[[str], None] = print, ray_address: str | None = None) -> dict:
    """Run the simulation to the end; return the report (raises what the server raised).

    ``final_evaluation`` adds the baselines and the cold-start evaluation
    (:mod:`simulations.run.evaluate`) to the report, with plots. ``client_app``
    replaces the simulation's ClientApp (the device app with the fault injector; tests
    pass one that misbehaves); ``secagg_observer``
    is shown every reply of the server's SecAgg+ rounds (tests check what it held).

    The run directory is checked before anything starts (a new run in an empty one, or
    a resume that changes only what may change: :mod:`server.run_record`). SIGINT or
    SIGTERM stops it after the current round's checkpoint, a second one at once
    (:mod:`simulations.run.stop`); either raises :class:`RunStopped`.

    ``ray_address`` (host:port): run the clients on that Ray cluster instead of a Ray
    started here, and add to the report where each ran
    (:mod:`simulations.run.ray_cluster`)."""
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from client.client_app import make_client_app
    from server.report import write_report
    from server.run import run_dir_of
    from server.run_record import check_run_dir, new_run_dir
    from server.server_app import StoppedBetweenRounds, run_server
    from shared.data.federation import load_run_population, training_users
    from shared.data.userdata import load_user
    from shared.model.base import resolve_model
    from simulations.faults import inject_faults
    from simulations.run.evaluate import evaluate_run
    from simulations.run.ray_cluster import connect, placement_mod, placement_summary

    if not cfg.run_dir:
        cfg = cfg.replace(run_dir=str(new_run_dir()))
    resolve_model(cfg.model)  # a missing model fails here, in one line, before Ray starts
    population = load_run_population(cfg)
    run_dir = run_dir_of(cfg)
    check_run_dir(run_dir, cfg, data_dir=population.root)
    users = training_users(population, cfg)
    if not users:
        raise ConfigError("the population has no training users")
    for entry in users:  # fail fast, with the file and line, before any worker starts
        load_user(population.user_dir(entry.user_id))
    num_users = len(users)
    progress(f"population: {num_users} training users of {len(population.users)} "
             f"({population.root}); model {cfg.model}; {cfg.num_rounds} rounds of "
             f"{min(cfg.clients_per_round, num_users)} clients")
    note = sampling_note(cfg, num_users)
    if note:
        progress(note)
    outcome: dict = {}
    stop = StopRequest()

    server_app = ServerApp()

    @server_app.main()
    def _main(grid, context) -> None:  # the config is ours, not the empty one Flower passes
        try:
            outcome["report"] = run_server(grid, cfg, progress, secagg_observer=secagg_observer,
                                           should_stop=stop.is_set)
        except StoppedBetweenRounds as stopped:  # not an error: the run ends here, resumable
            outcome["stopped"] = stopped.after_round
        except BaseException as err:  # surfaced in the calling thread below
            outcome["error"] = err
            raise

    cpus = num_cpus or os.cpu_count() or 1
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
               "init_args": {"num_cpus": cpus, "logging_level": "error",
                             "log_to_driver": True}}
    logging.getLogger("flwr").setLevel(logging.INFO)
    nodes = None
    try:
        if ray_address:
            nodes = connect(ray_address, backend["init_args"])
            progress(f"Ray cluster at {ray_address}: {len(nodes)} nodes, "
                     f"{sum(n['resources'].get('CPU', 0) for n in nodes.values()):g} CPUs")
            client_app = client_app or make_client_app(inject_faults, placement_mod)
        else:
            start_ray(backend["init_args"])
        with stop.on_signals(progress):
            run_simulation(server_app=server_app,
                           client_app=client_app or make_client_app(inject_faults),
                           num_supernodes=num_users, backend_config=backend)
    except KeyboardInterrupt:  # the second signal: the round in flight is dropped
        raise RunStopped(run_dir, after_round=None, at_once=True) from None
    finally:
        stop_ray()
    if "stopped" in outcome:
        raise RunStopped(run_dir, after_round=outcome["stopped"], at_once=False)
    if "error" in outcome:
        raise outcome["error"]
    if "report" not in outcome:
        raise RuntimeError(f"simulation ended without a report (see the log; run dir "
                           f"{run_dir})")
    report = plot_round_by_round(run_dir, outcome["report"])
    if nodes is not None:
        report = {**report, "ray_placement": placement_summary(run_dir, nodes)}
        write_report(run_dir, report)
    if final_evaluation:
        report = finish_report(run_dir, report, evaluate_run(
            run_dir, include_levels=False, cold_start_k=cold_start_k, progress=progress))
    return report


def start_ray(init_args: dict) -> None:
    """Start Ray as Flower's Ray backend would (it starts Ray only when none is up), here,
    so that the signal handlers installed after it are ours: Ray's C++ core installs a
    failure handler for SIGTERM that dumps a stack and aborts the driver (exit 134)."""
    import ray

    from simulations.run.ray_cluster import worker_environment

    if ray.is_initialized():
        return
    ray.init(runtime_env=worker_environment(), include_dashboard=False, **init_args)


def stop_ray() -> None:
    """Ray down after a run (Flower's backend does it when the run ends normally)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def sampling_note(cfg: RunConfig, num_users: int) -> str | None:
    """A warning when ``clients-per-round`` cannot mean what it says, else ``None``."""
    if cfg.clients_per_round > num_users:
        return (f"warning: clients-per-round = {cfg.clients_per_round} but the run has "
                f"{num_users} training users: every round samples all {num_users}")
    return None


def finish_report(run_dir: Path, report: dict, evaluation: dict) -> dict:
    """Merge the side-by-side evaluation into the report (the levels from the Flower
    evaluation round on the baselines' users, and the federation gain against them), draw
    the plots, rewrite both files."""
    from server.report import write_report
    from simulations.run.evaluate import against_levels
    from simulations.run.plots import plot_federation_gain, plot_improvement, plot_levels

    report = {**report, **{k: v for k, v in evaluation.items() if k != "seconds"}}
    compared = against_levels(report["levels"], report["baselines"],
                              report.get("untrained_users", ()))
    report["baselines"] = {**report["baselines"], **compared["same_users"]}
    report["federation_gain"] = compared["federation_gain"]
    report["served_gain"] = compared.get("served_gain")
    report["evaluation_seconds"] = evaluation.get("seconds")
    report["plots"] = {
        **report.get("plots", {}),
        "perplexity per level": plot_levels(report, run_dir / "levels.png").name,
        "per-user improvement": plot_improvement(report, run_dir / "improvement.png").name,
        "federation gain per user": plot_federation_gain(
            report["federation_gain"], run_dir / "federation_gain.png").name}
    if report["served_gain"] and report["served_gain"]["users"]:
        report["plots"]["served gain per user"] = plot_federation_gain(
            report["served_gain"], run_dir / "served_gain.png", "Served gain").name
    write_report(run_dir, report)
    return report


def plot_round_by_round(run_dir: Path, report: dict) -> dict:
    """Draw ``rounds.png`` when the rounds were measured (round-eval-users > 0) and
    rewrite both files to show it; else the report as it is."""
    from server.report import ROUND_PLOT, write_report
    from simulations.run.plots import plot_rounds

    if not report.get("round_eval"):
        return report
    report = {**report, "plots": {**report.get("plots", {}),
                                  ROUND_PLOT: plot_rounds(report, run_dir / "rounds.png").name}}
    write_report(run_dir, report)
    return report


def run_simulation_command(out: Path | None, settings: list[str], *, verbose: bool = False,
                           resume: bool = False, ray_address: str | None = None) -> int:
    """The simulation with our lines on the console and the libraries' in ``run.log``
    (``verbose``: everything on the console). A run directory that holds a run is
    continued only with ``resume``; one that holds anything else is refused."""
    from server.checkpoint import checkpoint_round
    from server.report import levels_table
    from server.run import run_dir_of
    from server.run_record import check_run_dir, holds_run, new_run_dir
    from shared.data.federation import load_run_population
    from shared.model.base import resolve_model
    from shared.util.tables import markdown_table
    from simulations.run.console import RUN_LOG, quiet_libraries

    cfg = resolve_config(out, settings)
    resolve_model(cfg.model)  # bad input fails before any directory is made
    population = load_run_population(cfg)
    if not cfg.run_dir:
        if resume:
            raise ConfigError("--resume needs the run's --out")
        cfg = cfg.replace(run_dir=str(new_run_dir()))
    run_dir = run_dir_of(cfg)
    exists = run_dir.is_dir() and holds_run(run_dir)
    if exists and not resume:
        raise ConfigError(f"{run_dir} holds a run (at round {checkpoint_round(run_dir)}); add "
                          "--resume to continue it, or choose a new --out")
    if resume and not exists:
        raise ConfigError(f"{run_dir}: no run to resume")
    # before run.log is written into it: a directory that is not a run stays untouched
    check_run_dir(run_dir, cfg, data_dir=population.root)
    print(f"fedpersona simulate: run dir {run_dir}" + (
        "" if verbose else f" (library output in {run_dir / RUN_LOG}; -v shows it here)"))
    with quiet_libraries(run_dir / RUN_LOG, verbose=verbose) as say:
        report = simulate(cfg, progress=say, ray_address=ray_address)
    print()
    print(levels_table(report["levels"]))
    if report.get("ray_placement"):
        print("\nwhere the clients ran (Ray nodes)\n" + markdown_table(report["ray_placement"]))
    privacy = report["privacy"]
    if privacy["dp"]:
        print(f"\nepsilon max {privacy['epsilon_max']:.3f} at delta {privacy['delta']:g} "
              f"(budget {privacy['target_epsilon']:g})")
    else:
        print("\nno DP")
    print(json.dumps({"run_dir": str(run_dir_of(cfg)), "seconds": report["seconds"]}))
    return 0
