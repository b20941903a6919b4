"""The ``fedpersona`` command: data, simulate, bench, compare, evaluate, generate, sweep,
deploy and audit.

Every failure a user can cause (bad setting, missing model, malformed data)
ends as one line on stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from shared.config import BROKEN_MECHANISMS

EXIT_USAGE = 2


class UserFacingError(Exception):
    """An error whose message is the whole story for the user."""


def _user_errors() -> tuple[type[BaseException], ...]:
    """What a user can cause, each raised with a message that names the problem. Not a
    bare ValueError: one from our own code is a bug, and keeps its traceback."""
    from client.serving.export import ExportError
    from client.store import LedgerError
    from server.checkpoint import CheckpointError
    from shared.config import ConfigError
    from shared.data.shakespeare import CorpusNotFoundError
    from shared.data.userdata import DataFormatError
    from shared.model.adapters import AdapterFormatError
    from shared.model.base import ModelLoadError, ModelNotFoundError
    from simulations.audit.plant import AuditSetupError
    from simulations.deploy.certs import CredentialsError
    from simulations.deploy.command import DeployError
    from simulations.run.evaluate import EvaluationError

    return (UserFacingError, ConfigError, DataFormatError, AdapterFormatError, LedgerError,
            CheckpointError, CredentialsError, ModelLoadError, ModelNotFoundError,
            CorpusNotFoundError, AuditSetupError, DeployError, EvaluationError, ExportError,
            FileExistsError, FileNotFoundError)


def _positive_float(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {raw!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedpersona", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"fedpersona {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    config = commands.add_parser("config", help="every run setting: default and meaning")
    config.add_argument("--section", help="only this section's settings")

    data = commands.add_parser("data", help="write a population in the on-device format")
    sources = data.add_subparsers(dest="source", required=True)
    shakes = sources.add_parser("shakespeare", help="Shakespeare's characters as users")
    shakes.add_argument("--out", required=True, type=Path)
    shakes.add_argument("--force", action="store_true", help="replace an existing population")
    shakes.add_argument("--tokenizer", default="smollm2",
                        help="model whose tokenizer counts tokens in the summary")
    shakes.add_argument("settings", nargs="*", metavar="key=value",
                        help="dataset settings, e.g. min-records=40 personas=play")
    lamp = sources.add_parser("lamp", help="a LaMP questions + outputs file pair as users")
    lamp.add_argument("--questions", required=True, type=Path)
    lamp.add_argument("--outputs", required=True, type=Path)
    lamp.add_argument("--out", required=True, type=Path)
    lamp.add_argument("--force", action="store_true")
    lamp.add_argument("--tokenizer", default="smollm2")
    own = sources.add_parser(
        "import", help="your own users: a folder of <user>.txt / <user>.jsonl files, or one "
                       "JSONL file with a user field (format: docs/data.md)")
    own.add_argument("path", metavar="SOURCE", type=Path, help="the folder or the JSONL file")
    own.add_argument("--out", required=True, type=Path)
    own.add_argument("--user-field", default="user",
                     help="the field naming the user in a single JSONL file")
    own.add_argument("--persona-field", default="persona",
                     help="the field naming a record's persona (optional)")
    own.add_argument("--personas", type=Path,
                     help="a JSON object or CSV 'user,persona' lines giving users' personas")
    own.add_argument("--test-fraction", type=float, default=0.2,
                     help="the last fraction of each user's records held out for evaluation")
    own.add_argument("--min-records", type=int, default=2,
                     help="users with fewer records are left out (and listed)")
    own.add_argument("--force", action="store_true", help="replace an existing population")
    own.add_argument("--tokenizer", default="smollm2")

    simulate = commands.add_parser("simulate", help="run the federated simulation")
    simulate.add_argument("--out", type=Path, help="run directory (adapters, reports); a new "
                          "or empty one (default: a new one under the cache)")
    simulate.add_argument("--resume", action="store_true",
                          help="continue the run in --out from its last checkpoint (a resume "
                               "may change only num-rounds and where things live)")
    simulate.add_argument("--ray-address", metavar="HOST:PORT",
                          help="run the clients on this Ray cluster (started with `ray start`) "
                               "instead of a Ray started here; the report says where each ran")
    simulate.add_argument("-v", "--verbose", action="store_true",
                          help="show the libraries' output too (else it goes to RUN/run.log)")
    simulate.add_argument("settings", nargs="*", metavar="key=value",
                          help="overrides of [tool.flwr.app.config], e.g. num-rounds=3")

    bench = commands.add_parser(
        "bench", help="performance ratios measured side by side (DP, framework, "
        "orchestration, communication, scale, GPU)")
    bench.add_argument("names", nargs="+", metavar="name",
                       help="all, dp, framework, orchestration, communication, scale, gpu; "
                       "then optional key=value run settings")
    bench.add_argument("--out", type=Path, default=Path("bench"),
                       help="folder for bench.json, bench.md and the runs (default ./bench)")
    bench.add_argument("--quick", action="store_true",
                       help="fewer repeats and smaller runs (a smoke test, not a measurement)")

    compare = commands.add_parser("compare", help="several simulations side by side")
    compare.add_argument("--out", required=True, type=Path)
    compare.add_argument("--variant", action="append", required=True, dest="variants",
                         metavar="NAME:k=v,k=v", help="one variant (repeat the flag)")
    compare.add_argument("settings", nargs="*", metavar="key=value",
                         help="settings shared by every variant")

    evaluate = commands.add_parser("evaluate", help="levels, baselines and cold start of a run")
    evaluate.add_argument("--run", required=True, type=Path, help="a finished run directory")
    evaluate.add_argument("--k", type=int, default=5, help="examples for the k-shot fallback")
    evaluate.add_argument("--cold-start-users", type=int, default=8,
                          help="cold-start users per kind (0 = all)")
    evaluate.add_argument("--baseline-users", type=int, default=8,
                          help="users for the slow local-only-dp-global strawman (0 = all)")
    evaluate.add_argument("--full", action="store_true",
                          help="add the slow rows: local-only-all-steps and the strawman")
    evaluate.add_argument("--context-tokens", type=int, default=448,
                          help="context budget of the in-context baselines, in tokens")

    generate = commands.add_parser("generate", help="generate text for a user (cold-start aware)")
    chat = commands.add_parser("chat", help="generate for a user, prompt after prompt, with the "
                                            "model loaded once")
    for serving in (generate, chat):
        serving.add_argument("--run", required=True, type=Path, help="a finished run directory")
        who = serving.add_mutually_exclusive_group(required=True)
        who.add_argument("--user", help="a user of the run's population, by id (e.g. "
                                        "hamlet--hamlet)")
        who.add_argument("--user-dir", type=Path, help="a user's directory on the device")
        serving.add_argument("--level", choices=("base", "global", "global+persona",
                                                 "global+persona+user"),
                             help="serve this stack instead of the one the user's held-out "
                                  "lines choose")
        serving.add_argument("--explain", action="store_true",
                             help="say which adapters serve, and why")
        serving.add_argument("--max-new-tokens", type=int, default=40)
        serving.add_argument("--temperature", type=float, default=0.0,
                             help="0: greedy; above 0: sampled")
        serving.add_argument("--seed", type=int, default=0, help="the sampling seed")
        serving.add_argument("--context-tokens", type=int, default=448,
                             help="the user's most recent lines before the prompt, in tokens "
                                  "(0: none)")
    generate.add_argument("prompt")

    export = commands.add_parser(
        "export", help="a run's adapter stack as one standard peft LoRA adapter")
    export.add_argument("--run", required=True, type=Path, help="a finished run directory")
    export.add_argument("--out", required=True, type=Path, help="a new folder to write into")
    export.add_argument("--persona", help="the persona adapter to stack on global")
    export.add_argument("--user-dir", type=Path,
                        help="a device's user directory: its user adapter goes on top (the "
                             "export then belongs on that device only)")
    export.add_argument("--merge", action="store_true",
                        help="also write the base model with the adapter merged in")

    sweep = commands.add_parser("sweep", help="the simulation at several privacy budgets")
    sweep.add_argument("--epsilons", default="1,4,8,inf")
    sweep.add_argument("--out", required=True, type=Path)
    sweep.add_argument("settings", nargs="*", metavar="key=value")

    deploy = commands.add_parser("deploy", help="a real SuperLink and SuperNodes (TLS and "
                                 "node authentication on by default)")
    steps = deploy.add_subparsers(dest="step", required=True)
    certs = steps.add_parser("certs", help="a CA, the SuperLink's certificate, SuperNode keys")
    certs.add_argument("--out", required=True, type=Path)
    certs.add_argument("--supernodes", default="", help="comma-separated SuperNode names")
    certs.add_argument("--host", action="append", dest="hosts",
                       help="SuperLink host name or IP for the certificate (repeat); "
                            "default 127.0.0.1 and localhost")
    link = steps.add_parser("superlink", help="start flower-superlink")
    link.add_argument("--certs", type=Path, help="the 'deploy certs' directory")
    link.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to accept remote devices")
    link.add_argument("--port", type=int, default=9100)
    link.add_argument("--database", type=Path, help="SuperLink state on disk (default: "
                      "CERTS/superlink.db)")
    link.add_argument("--insecure", action="store_true",
                      help="no TLS, no node authentication (local experiments only)")
    connect = steps.add_parser("connect", help="add the SuperLink to $FLWR_HOME/config.toml")
    connect.add_argument("--address", default="127.0.0.1:9100")
    connect.add_argument("--ca", type=Path, help="the CA certificate (ca.crt)")
    connect.add_argument("--name", default="fedpersona", help="the connection's name")
    connect.add_argument("--insecure", action="store_true")
    register = steps.add_parser("register", help="register a SuperNode's public key")
    register.add_argument("public_key", type=Path)
    register.add_argument("--name", default="fedpersona", help="the connection's name")
    node = steps.add_parser("supernode", help="start flower-supernode for one user's device")
    node.add_argument("--user-dir", required=True, type=Path)
    node.add_argument("--superlink", default="127.0.0.1:9100")
    node.add_argument("--port", type=int, default=9200,
                      help="this SuperNode's local Runtime API port (one per SuperNode)")
    node.add_argument("--ca", type=Path, help="the CA certificate (ca.crt)")
    node.add_argument("--key", type=Path, help="this SuperNode's private key")
    node.add_argument("--max-wait", type=float, help="give up connecting after this many s")
    node.add_argument("--rejoin-wait", type=float, default=120.0,
                      help="when refused at start (e.g. restarted after a crash, before the "
                           "SuperLink let go of the old session), retry for this many s")
    node.add_argument("--epsilon-budget", type=_positive_float,
                      help="the device's own cap on the epsilon it ever spends, over every "
                           "run it joins (a run's target-epsilon can only tighten it)")
    node.add_argument("--threads", type=int, help="CPU threads for this SuperNode's "
                      "training (default: all; split the cores when SuperNodes share a machine)")
    node.add_argument("--insecure", action="store_true")
    soak = steps.add_parser("soak", help="a loopback deployment hurt at random (SuperNodes "
                            "and the SuperLink killed and restarted), then checked")
    soak.add_argument("--out", required=True, type=Path, help="a new directory")
    soak.add_argument("--nodes", type=int, default=6, help="SuperNodes (one user each)")
    soak.add_argument("--rounds", type=int, default=10)
    soak.add_argument("--seed", type=int, default=0, help="the fault schedule's seed")
    soak.add_argument("--max-minutes", type=_positive_float, default=45.0,
                      help="stop everything after this long, complete or not")
    soak.add_argument("settings", nargs="*", metavar="key=value",
                      help="more run settings (the soak sets the model, rounds and nodes)")
    run = steps.add_parser("run", help="start a run on the SuperLink (flwr run)")
    run.add_argument("--name", default="fedpersona", help="the connection's name")
    run.add_argument("--no-stream", action="store_true", help="return once the run starts")
    run.add_argument("settings", nargs="*", metavar="key=value")

    audit = commands.add_parser("audit", help="privacy audits (ledger, wire, canary, mia, "
                                "one-run, all) and planting an audit population")
    checks = audit.add_subparsers(dest="check", required=True)
    for check, text in AUDIT_CHECKS.items():
        _add_audit_arguments(checks.add_parser(check, help=text), plant=check == "plant")
    for check, text in SERVER_VIEW_CHECKS.items():
        _add_server_view_arguments(checks.add_parser(check, help=text), breaks=check == "breaks")
    return parser


AUDIT_CHECKS = {
    "plant": "write an audit population: canaries planted, half the records held out",
    "ledger": "recompute every device's epsilon from its accountant history",
    "wire": "check every reply the devices sent against what may leave them",
    "canary": "exposure of planted secrets (Carlini et al., the Secret Sharer)",
    "mia": "membership inference: ROC AUC and TPR at 1%% and 0.1%% FPR",
    "one-run": "empirical epsilon lower bound from one training run (Steinke et al.)",
    "all": "every check, no-DP and DP side by side",
}


SERVER_VIEW_CHECKS = {
    "server-view": "white-box: one client's update in one round, against its accounted epsilon",
    "breaks": "the server-view and ledger checks on the correct DP and on each DP broken "
              "on purpose: which check catches which break",
}


def _add_server_view_arguments(parser: argparse.ArgumentParser, *, breaks: bool) -> None:
    parser.add_argument("--run", type=Path, dest="run_dir",
                        help="audit a round of this run's settings (default: the audit "
                             "federation's defaults)")
    parser.add_argument("--out", type=Path, required=breaks,
                        help="write the results (JSON and markdown) here")
    parser.add_argument("--canaries", type=int, default=10000,
                        help="gradient canaries, each in the data with probability 1/2")
    parser.add_argument("--clients", type=int, default=1,
                        help="updates summed, as SecAgg+ shows the server (1: the plain path)")
    if breaks:
        parser.add_argument("--only", action="append", default=[], dest="variants",
                            metavar="MECHANISM", help="only this variant (repeatable): "
                            "correct, " + ", ".join(BROKEN_MECHANISMS))
    parser.add_argument("settings", nargs="*", metavar="key=value",
                        help="run settings of the audited federation, e.g. target-epsilon=4")


def _add_audit_arguments(parser: argparse.ArgumentParser, *, plant: bool) -> None:
    if plant:
        parser.add_argument("--out", type=Path, required=True, help="population directory")
        parser.add_argument("--force", action="store_true", help="replace a population")
    else:
        parser.add_argument("--run", type=Path, action="append", default=[], dest="runs",
                            help="a finished run to check (repeat for several)")
        parser.add_argument("--out", type=Path,
                            help="audit directory: plant, then train the no-DP and DP runs "
                                 "there (finished ones are reused)")
        parser.add_argument("--candidates", type=int, default=1000,
                            help="random secrets each canary is ranked against")
        parser.add_argument("--user-dir", type=Path, action="append", default=[],
                            dest="user_dirs", help="ledger, wire: check these device "
                            "directories (a deployment) instead of the run's population")
    parser.add_argument("--one-run-canaries", type=int, default=1000,
                        help="Bernoulli(1/2) canaries of the one-run audit (1,000: all correct "
                        "guesses on 400 of them certify epsilon >= 4)")
    parser.add_argument("--repeated-canaries", type=int, default=8)
    parser.add_argument("--copies", type=int, default=4, help="copies of a repeated canary")
    parser.add_argument("--holdout-fraction", type=float, default=0.5,
                        help="chance that a training record is held out as a non-member")
    parser.add_argument("settings", nargs="*", metavar="key=value",
                        help="run settings of the audited federation, e.g. num-rounds=3")


def main(argv: list[str] | None = None) -> int:
    from simulations.run.stop import RunStopped

    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except _user_errors() as err:
        print(f"fedpersona: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fedpersona: interrupted", file=sys.stderr)
        return 130
    except RunStopped as stopped:
        print(f"fedpersona: {stopped}", file=sys.stderr, flush=True)
        if stopped.at_once:  # the server's thread is still in its round: do not wait for it
            sys.stdout.flush()
            os._exit(130)
        return 130


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fedpersona")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "(not installed)"


def _config(args: argparse.Namespace) -> int:
    from shared.config import SECTIONS, RunConfig
    from shared.util.tables import markdown_table

    if args.section and args.section not in SECTIONS:
        raise UserFacingError(f"unknown section {args.section!r}; sections: "
                              f"{', '.join(SECTIONS)}")
    settings = RunConfig.describe()
    for name, section in SECTIONS.items():
        if args.section and name != args.section:
            continue
        rows = [{"setting": s["key"], "default": json.dumps(s["default"]), "meaning": s["doc"]}
                for s in settings if s["section"] == name]
        print(f"## {name}: {section.doc}"
              + ("" if section.training_input else " (not a training input)") + "\n")
        print(markdown_table(rows) + "\n")
    print("Set any of them in [tool.flwr.app.config] of pyproject.toml or as key=value "
          "after a command, e.g. fedpersona simulate num-rounds=3")
    return 0


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "config":
        return _config(args)
    if args.command == "data":
        return _data(args)
    if args.command == "simulate":
        from simulations.run.simulate import run_simulation_command

        return run_simulation_command(args.out, args.settings, verbose=args.verbose,
                                      resume=args.resume, ray_address=args.ray_address)
    if args.command == "compare":
        from simulations.run.compare import run_compare_command

        return run_compare_command(args.out, args.variants, args.settings)
    if args.command == "evaluate":
        return _evaluate(args)
    if args.command in ("generate", "chat"):
        return _generate(args)
    if args.command == "export":
        return _export(args)
    if args.command == "sweep":
        from simulations.run.sweep import run_sweep_command

        return run_sweep_command(args.out, args.epsilons, args.settings)
    if args.command == "audit":
        return _audit(args)
    if args.command == "deploy":
        return _deploy(args)
    if args.command == "bench":
        return _bench(args)
    raise UserFacingError(f"unknown command {args.command}")


def _bench(args: argparse.Namespace) -> int:
    from simulations.bench.command import BENCHES, run_bench_command

    names = [n for n in args.names if "=" not in n]
    settings = [n for n in args.names if "=" in n]
    unknown = sorted(set(names) - {"all", *BENCHES})
    if unknown or not names:
        raise UserFacingError(f"unknown benchmark {', '.join(unknown) or '(none given)'}; "
                              f"choose from all, {', '.join(BENCHES)}")
    return run_bench_command(names, args.out, settings, quick=args.quick)


def _deploy(args: argparse.Namespace) -> int:
    import subprocess

    from simulations.deploy import command as deploy
    if args.step == "certs":
        from simulations.deploy.certs import DEFAULT_HOSTS, write_credentials

        names = [n.strip() for n in args.supernodes.split(",") if n.strip()]
        paths = write_credentials(args.out, supernodes=names, hosts=args.hosts or DEFAULT_HOSTS)
        for what, path in paths.items():
            print(f"{what:>24}: {path}")
        return 0
    if args.step == "superlink":
        if args.insecure:
            print("fedpersona: warning: --insecure: no TLS and no SuperNode authentication; "
                  "anyone who reaches the port can join and read the adapters",
                  file=sys.stderr)
        elif args.certs is None:
            raise UserFacingError("deploy superlink needs --certs DIR (or --insecure)")
        database = args.database or (args.certs / "superlink.db" if args.certs else None)
        deploy.exec_command(deploy.superlink_command(
            None if args.insecure else args.certs, host=args.host, port=args.port,
            database=database))
    if args.step == "connect":
        if not args.insecure and args.ca is None:
            raise UserFacingError("deploy connect needs --ca ca.crt (or --insecure)")
        path = deploy.write_connection(args.name, args.address,
                                       ca=None if args.insecure else args.ca)
        print(f"wrote [superlink.{args.name}] ({args.address}) to {path}")
        return 0
    if args.step == "register":
        command = deploy.register_command(args.public_key, args.name)
        return subprocess.run(command, env=deploy.environment(), check=False).returncode
    if args.step == "supernode":
        if args.insecure:
            print("fedpersona: warning: --insecure: the adapters travel unencrypted",
                  file=sys.stderr)
        elif args.ca is None or args.key is None:
            raise UserFacingError("deploy supernode needs --ca and --key (or --insecure)")
        return deploy.supervise_supernode(deploy.supernode_command(
            superlink=args.superlink, user_dir=args.user_dir, port=args.port,
            ca=None if args.insecure else args.ca, key=None if args.insecure else args.key,
            max_wait=args.max_wait, epsilon_budget=args.epsilon_budget),
            rejoin_wait=args.rejoin_wait,
            extra_env=deploy.thread_limits(args.threads))
    if args.step == "soak":
        from simulations.deploy.soak import SoakPlan, run_soak

        result = run_soak(args.out, SoakPlan(nodes=args.nodes, rounds=args.rounds,
                                             seed=args.seed, max_minutes=args.max_minutes),
                          extra_settings=tuple(args.settings))
        print()
        print((args.out / "soak.md").read_text())
        print(f"wrote {args.out / 'soak.json'} and .md")
        return 0 if result["passed"] else 1
    from shared.config import parse_overrides

    if parse_overrides(args.settings).get("audit-only-broken-mechanism"):
        raise UserFacingError("audit-only-broken-mechanism breaks DP on purpose and is refused "
                              "in a deployment (use it in fedpersona audit or a simulation)")
    command = deploy.run_command(deploy.app_dir(), args.settings, connection=args.name,
                                 stream=not args.no_stream)
    print("+ " + " ".join(command), flush=True)
    return subprocess.run(command, env=deploy.environment(), cwd=deploy.app_dir(),
                          check=False).returncode


def _audit(args: argparse.Namespace) -> int:
    from simulations.audit.command import AuditFailed, run_audit_command
    from simulations.audit.plant import PlantSettings

    if args.check in SERVER_VIEW_CHECKS:
        return _audit_server_view(args)

    _check_at_least(args, one_run_canaries=0, repeated_canaries=0,
                    **({} if args.check == "plant" else {"candidates": 1}))
    settings = PlantSettings(one_run_canaries=args.one_run_canaries,
                             repeated_canaries=args.repeated_canaries, copies=args.copies,
                             holdout_fraction=args.holdout_fraction)
    if args.check == "plant":
        from simulations.audit.command import AUDIT_DEFAULTS
        from simulations.audit.plant import plant
        from simulations.run.simulate import resolve_config

        cfg = resolve_config(None, [f"{k}={v}" for k, v in AUDIT_DEFAULTS.items()]
                             + args.settings)
        population, plan = plant(cfg, args.out, settings, force=args.force)
        included = sum(c.included for c in plan.canaries)
        print(f"planted {len(plan.canaries)} canaries ({included} included) in "
              f"{len(population.users)} users at {population.root}; train on it with "
              f"data-dir={population.root}")
        return 0
    try:
        return run_audit_command(args.check, runs=args.runs, out=args.out,
                                 settings=args.settings, plant_settings=settings,
                                 candidates=args.candidates, user_dirs=args.user_dirs)
    except AuditFailed as err:
        print(f"fedpersona: {err}", file=sys.stderr)
        return 1


def _audit_server_view(args: argparse.Namespace) -> int:
    from shared.config import ConfigError
    from simulations.audit.breaks import CORRECT, run_breaks_command, run_server_view_command
    from simulations.audit.command import AuditFailed

    _check_at_least(args, canaries=20, clients=1)
    try:
        if args.check == "server-view":
            return run_server_view_command(args.settings, run_dir=args.run_dir, out=args.out,
                                           canaries=args.canaries, clients=args.clients)
        unknown = [v for v in args.variants if v not in (CORRECT, *BROKEN_MECHANISMS)]
        if unknown:
            raise ConfigError(f"--only {unknown[0]}: not one of {CORRECT}, "
                              + ", ".join(BROKEN_MECHANISMS))
        return run_breaks_command(args.settings, out=args.out, canaries=args.canaries,
                                  clients=args.clients, run_dir=args.run_dir,
                                  variants=args.variants)
    except AuditFailed as err:
        print(f"fedpersona: {err}", file=sys.stderr)
        return 1


def _check_at_least(args: argparse.Namespace, **minimum: float) -> None:
    """Refuse, naming the option, any of ``args`` below its minimum (before any work)."""
    from shared.config import ConfigError

    for name, least in minimum.items():
        value = getattr(args, name)
        if value < least:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= {least:g}, got {value:g}")


def _evaluate(args: argparse.Namespace) -> int:
    from server.report import (
        SERVED_GAIN_TITLE,
        baselines_lines,
        federation_gain_lines,
        levels_table,
        served_stack_lines,
    )
    from server.run_record import require_writable
    from shared.util.atomic import write_json_atomic
    from simulations.run.evaluate import evaluate_run

    # (0 cold-start or strawman users means all of them)
    _check_at_least(args, k=0, cold_start_users=0, baseline_users=0, context_tokens=0)
    if args.run.is_dir():  # evaluation.json goes there: say so before the work, not after
        require_writable(args.run)
    result = evaluate_run(args.run, cold_start_k=args.k, cold_start_users=args.cold_start_users,
                          baseline_users=args.baseline_users, context_tokens=args.context_tokens,
                          full=args.full)
    write_json_atomic(args.run / "evaluation.json", result, sort_keys=False)
    print(levels_table(result["levels"]))
    print()
    print("\n".join(baselines_lines(result)))
    print("\n".join(federation_gain_lines(result["federation_gain"])))
    print("\n".join(federation_gain_lines(result.get("served_gain"), SERVED_GAIN_TITLE)))
    print("\n".join(served_stack_lines(result.get("served_stacks"))))
    for key in ("cold_start", "cold_start_held_out_plays"):
        if key not in result:
            continue
        print(f"\n{key}")
        print(levels_table(result[key], "served by"))
    print(f"\nwrote {args.run / 'evaluation.json'}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    """``generate`` (one prompt) and ``chat`` (a prompt per line of input, the model loaded
    once): what the device serves its user with."""
    from client.serving.generate import force_level, generate_text, serve_user
    from client.serving.run_adapters import RunAdapters
    from shared.config import ConfigError
    from simulations.run.evaluate import load_run_config

    if args.command == "generate" and not args.prompt.strip():
        raise ConfigError("the prompt is empty: give the text to continue")
    _check_at_least(args, max_new_tokens=1, context_tokens=0, temperature=0)
    cfg = load_run_config(args.run)
    user_dir = args.user_dir or _user_dir_by_name(cfg, args.user)
    evaluator = RunAdapters(args.run, cfg)
    serving = serve_user(evaluator, user_dir, context_tokens=args.context_tokens)
    if args.level:
        serving = force_level(serving, args.level)
    if args.explain or args.command == "chat":
        choice = serving.choice
        print(f"served by: {choice.served_by}; adapters: {serving.stack.name}"
              + (f" (persona {choice.persona})" if choice.persona else ""))
        print(f"why: {choice.reason}")
        if args.level:
            print(f"stack: {args.level}, as --level asks")
        elif serving.stack.held_out_loss:
            losses = ", ".join(f"{k} {v:.3f}" for k, v in serving.stack.held_out_loss.items())
            print(f"stack: the lowest loss on the user's {serving.stack.held_out_records} "
                  f"held-out lines under the recent context ({losses})")
        print(f"context: the user's latest lines, up to {args.context_tokens} tokens")

    def answer(prompt: str) -> str:
        return generate_text(evaluator, serving, prompt, max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature, seed=args.seed)

    if args.command == "generate":
        print(answer(args.prompt))
        return 0
    print("one prompt per line; an empty line or end of input stops", flush=True)
    for line in sys.stdin:
        if not line.strip():
            break
        print(answer(line.rstrip("\n")), flush=True)
    return 0


def _user_dir_by_name(cfg, name: str) -> Path:
    """A user of the run's population by id (the simulation's devices live there)."""
    import difflib

    from shared.data.federation import load_run_population

    population = load_run_population(cfg)
    ids = [entry.user_id for entry in population.users]
    if name not in ids:
        close = difflib.get_close_matches(name, ids, n=3, cutoff=0.4)
        raise UserFacingError(f"no user {name!r} in the run's population ({population.root})"
                              + (f"; did you mean {' or '.join(close)}?" if close else ""))
    return population.user_dir(name)


def _export(args: argparse.Namespace) -> int:
    from client.serving.export import MANIFEST, export_stack
    from client.serving.run_adapters import RunAdapters
    from simulations.run.evaluate import load_run_config

    cfg = load_run_config(args.run)  # a missing or broken report.json is a one-line error
    report = json.loads((args.run / "report.json").read_text())
    manifest = export_stack(RunAdapters(args.run, cfg), args.out, persona=args.persona,
                            user_dir=args.user_dir, merge=args.merge, report=report)
    stack = " + ".join(s["level"] + (f" ({s['name']})" if "name" in s else "")
                       for s in manifest["stack"])
    check = manifest["check"]
    print(f"exported {stack} as one LoRA of rank {manifest['adapter']['rank']}: "
          f"{args.out / manifest['adapter']['path']}")
    print(f"check: max |logit difference| {check['max_abs_logit_diff']:.2e} against the "
          f"stack (logits up to {check['max_abs_logit']:.1f}) on {check['tokens']} tokens; "
          f"the stack summed in the other order differs by "
          f"{check['reordered_stack_diff']:.2e}")
    if manifest["merged"]:
        print(f"merged model: {args.out / manifest['merged']}")
    print(f"manifest: {args.out / MANIFEST}")
    return 0


def _data(args: argparse.Namespace) -> int:
    from shared.config import RunConfig, parse_overrides
    from shared.data.summary import summarize
    from shared.util.tables import markdown_table

    if args.source == "shakespeare":
        from shared.data.shakespeare import (
            settings_from_config,
            write_shakespeare_population,
        )

        cfg = RunConfig.from_mapping(parse_overrides(args.settings))
        population = write_shakespeare_population(
            args.out, settings_from_config(cfg), force=args.force)
    elif args.source == "import":
        from shared.data.importer import ImportSettings, import_population, read_persona_map

        settings = ImportSettings(user_field=args.user_field, persona_field=args.persona_field,
                                  test_fraction=args.test_fraction, min_records=args.min_records)
        population = import_population(
            args.path, args.out, settings, force=args.force,
            personas=read_persona_map(args.personas) if args.personas else None)
        if population.meta["skipped_users"]:
            print(f"left out (fewer than {args.min_records} records): "
                  f"{', '.join(population.meta['skipped_users'])}")
    else:
        from shared.data.lamp import write_lamp_population

        population = write_lamp_population(args.questions, args.outputs, args.out,
                                           force=args.force)
    count = _token_counter(args.tokenizer)
    print(f"wrote {len(population.users)} users to {population.root}")
    print(markdown_table(summarize(population, count)))
    return 0


def _token_counter(spec: str):
    from shared.model.base import load_tokenizer

    tokenizer = load_tokenizer(spec)
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


if __name__ == "__main__":
    sys.exit(main())
