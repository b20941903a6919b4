"""The ``fedpersona`` command: data, simulate, and (later) evaluate, audit, deploy.

Every failure a user can cause (bad setting, missing model, malformed data)
ends as one line on stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_USAGE = 2


class UserFacingError(Exception):
    """An error whose message is the whole story for the user."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from shared.config import ConfigError
    from shared.model import ModelNotFoundError
    from shared.shakespeare import CorpusNotFoundError
    from shared.adapters import AdapterFormatError
    from shared.userdata import DataFormatError
    from simulations.audit_plant import AuditSetupError
    from simulations.evaluate import EvaluationError

    return (UserFacingError, AuditSetupError, AdapterFormatError, EvaluationError, ConfigError, ModelNotFoundError, CorpusNotFoundError,
            DataFormatError, FileExistsError, FileNotFoundError, ValueError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedpersona", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

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

    simulate = commands.add_parser("simulate", help="run the federated simulation")
    simulate.add_argument("--out", type=Path, help="run directory (adapters, reports)")
    simulate.add_argument("settings", nargs="*", metavar="key=value",
                          help="overrides of [tool.flwr.app.config], e.g. num-rounds=3")

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
                          help="users for the local-only baseline (0 = all)")

    generate = commands.add_parser("generate", help="generate text for a user (cold-start aware)")
    generate.add_argument("--run", required=True, type=Path)
    generate.add_argument("--user-dir", required=True, type=Path)
    generate.add_argument("--explain", action="store_true", help="say which adapters serve, why")
    generate.add_argument("--max-new-tokens", type=int, default=40)
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.add_argument("prompt")

    sweep = commands.add_parser("sweep", help="the simulation at several privacy budgets")
    sweep.add_argument("--epsilons", default="1,4,8,inf")
    sweep.add_argument("--out", required=True, type=Path)
    sweep.add_argument("settings", nargs="*", metavar="key=value")

    audit = commands.add_parser("audit", help="privacy audits (ledger, wire, canary, mia, "
                                "one-run, all) and planting an audit population")
    checks = audit.add_subparsers(dest="check", required=True)
    for check, text in AUDIT_CHECKS.items():
        _add_audit_arguments(checks.add_parser(check, help=text), plant=check == "plant")
    return parser


AUDIT_CHECKS = {
    "plant": "write an audit population: canaries planted, half the records held out",
    "ledger": "recompute every device's epsilon from its accountant history",
    "wire": "check every reply the devices sent against what may leave them",
    "canary": "exposure of planted secrets (Carlini et al., the Secret Sharer)",
    "mia": "membership inference: ROC AUC and TPR at 1% and 0.1% FPR",
    "one-run": "empirical epsilon lower bound from one training run (Steinke et al.)",
    "all": "every check, no-DP and DP side by side",
}


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
    parser.add_argument("--one-run-canaries", type=int, default=100)
    parser.add_argument("--repeated-canaries", type=int, default=8)
    parser.add_argument("--copies", type=int, default=4, help="copies of a repeated canary")
    parser.add_argument("--holdout-fraction", type=float, default=0.5,
                        help="chance that a training record is held out as a non-member")
    parser.add_argument("settings", nargs="*", metavar="key=value",
                        help="run settings of the audited federation, e.g. num-rounds=3")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except _user_errors() as err:
        print(f"fedpersona: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fedpersona: interrupted", file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "data":
        return _data(args)
    if args.command == "simulate":
        from simulations.simulate import run_simulation_command

        return run_simulation_command(args.out, args.settings)
    if args.command == "compare":
        from simulations.compare import run_compare_command

        return run_compare_command(args.out, args.variants, args.settings)
    if args.command == "evaluate":
        return _evaluate(args)
    if args.command == "generate":
        return _generate(args)
    if args.command == "sweep":
        from simulations.sweep import run_sweep_command

        return run_sweep_command(args.out, args.epsilons, args.settings)
    if args.command == "audit":
        return _audit(args)
    raise UserFacingError(f"unknown command {args.command}")


def _audit(args: argparse.Namespace) -> int:
    from simulations.audit import AuditFailed, run_audit_command
    from simulations.audit_plant import PlantSettings

    settings = PlantSettings(one_run_canaries=args.one_run_canaries,
                             repeated_canaries=args.repeated_canaries, copies=args.copies,
                             holdout_fraction=args.holdout_fraction)
    if args.check == "plant":
        from simulations.audit import AUDIT_DEFAULTS
        from simulations.audit_plant import plant
        from simulations.simulate import resolve_config

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
                                 candidates=args.candidates)
    except AuditFailed as err:
        print(f"fedpersona: {err}", file=sys.stderr)
        return 1


def _evaluate(args: argparse.Namespace) -> int:
    from server.report import levels_table
    from shared.atomic import write_json_atomic
    from simulations.evaluate import evaluate_run

    result = evaluate_run(args.run, cold_start_k=args.k, cold_start_users=args.cold_start_users,
                          baseline_users=args.baseline_users)
    write_json_atomic(args.run / "evaluation.json", result, sort_keys=False)
    print(levels_table(result["levels"]))
    print()
    print(levels_table(result["baselines"], "baseline"))
    for key in ("cold_start", "cold_start_held_out_plays"):
        print(f"\n{key}")
        print(levels_table(result[key], "served by"))
    print(f"\nwrote {args.run / 'evaluation.json'}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from client.generate import choose_for_user, generate_text
    from simulations.evaluate import RunEvaluator, load_run_config

    evaluator = RunEvaluator(args.run, load_run_config(args.run))
    choice = choose_for_user(evaluator, args.user_dir)
    if args.explain:
        print(f"served by: {choice.served_by}; adapters: {' + '.join(choice.levels)}"
              + (f" (persona {choice.persona})" if choice.persona else ""))
        print(f"why: {choice.reason}")
    print(generate_text(evaluator, choice, args.prompt, max_new_tokens=args.max_new_tokens,
                        temperature=args.temperature))
    return 0


def _data(args: argparse.Namespace) -> int:
    from shared.config import RunConfig, parse_overrides
    from shared.population_summary import summarize
    from shared.tables import markdown_table

    if args.source == "shakespeare":
        from shared.shakespeare import settings_from_config, write_shakespeare_population

        cfg = RunConfig.from_mapping(parse_overrides(args.settings))
        population = write_shakespeare_population(
            args.out, settings_from_config(cfg), force=args.force)
    else:
        from shared.lamp import write_lamp_population

        population = write_lamp_population(args.questions, args.outputs, args.out,
                                           force=args.force)
    count = _token_counter(args.tokenizer)
    print(f"wrote {len(population.users)} users to {population.root}")
    print(markdown_table(summarize(population, count)))
    return 0


def _token_counter(spec: str):
    from shared.model import load_tokenizer

    tokenizer = load_tokenizer(spec)
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


if __name__ == "__main__":
    sys.exit(main())
