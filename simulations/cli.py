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
    from shared.userdata import DataFormatError

    return (UserFacingError, ConfigError, ModelNotFoundError, CorpusNotFoundError,
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
    return parser


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
    raise UserFacingError(f"unknown command {args.command}")


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
