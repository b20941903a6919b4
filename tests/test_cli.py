"""The fedpersona command: user errors are one line and a non-zero exit code."""

import json
import os
import subprocess
import sys

import pytest

from shared.config import ConfigError
from simulations import cli
from simulations.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "simulations.cli", *args], capture_output=True,
                          text=True, cwd=cwd or REPO, env={**os.environ, **(env or {})},
                          timeout=300)


def test_data_shakespeare_writes_population_and_summary(tmp_path):
    out = tmp_path / "pop"

    result = run_cli("data", "shakespeare", "--out", str(out), "--tokenizer", "tiny",
                     "min-records=60")

    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "population.json").read_text())
    assert len(manifest["users"]) == 149
    assert "| total" in result.stdout and "train tokens" in result.stdout
    assert (out / "users" / "hamlet--hamlet" / "data.jsonl").is_file()


def test_existing_output_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "pop"
    out.mkdir()
    (out / "keep.txt").write_text("mine")

    code = main(["data", "shakespeare", "--out", str(out), "--tokenizer", "tiny"])

    assert code == 1
    assert "already exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("args, message", [
    (["simulate", "num-rounds=zero"], "num-rounds must be an integer"),
    (["simulate", "no-such-setting=1"], "unknown setting 'no-such-setting'"),
    (["simulate", "model=/no/such/model"], "neither 'smollm2', 'tiny' nor"),
    (["simulate", "data-dir=/no/such/dir"], "data directory does not exist"),
    (["simulate", "justaword"], "not of the form key=value"),
])
def test_bad_input_is_one_line_and_nonzero(args, message, tmp_path, capsys):
    code = main([*args, "model=tiny"] if "model=" not in " ".join(args) else args)

    err = capsys.readouterr().err.strip()
    assert code == 1
    assert message in err
    assert len(err.splitlines()) == 1 and err.startswith("fedpersona: error:")


@pytest.mark.parametrize("args, message", [
    (["   "], "the prompt is empty"),
    (["--max-new-tokens", "0", "hi"], "--max-new-tokens must be >= 1, got 0"),
    (["--context-tokens", "-3", "hi"], "--context-tokens must be >= 0, got -3"),
    (["--temperature", "-1", "hi"], "--temperature must be >= 0, got -1"),
    (["--k", "-3"], "--k must be >= 0, got -3"),
    (["--cold-start-users", "-1"], "--cold-start-users must be >= 0, got -1"),
    (["--context-tokens", "-1"], "--context-tokens must be >= 0, got -1"),
])
def test_generate_and_evaluate_refuse_bad_arguments_before_loading_anything(
        args, message, tmp_path, capsys):
    # the run directory does not exist: the arguments are checked first
    command = ["generate", "--user-dir", str(tmp_path / "no-user")] \
        if args[-1] == "hi" or args == ["   "] else ["evaluate"]
    code = main([*command, "--run", str(tmp_path / "no-run"), *args])

    err = capsys.readouterr().err.strip()
    assert code == 1 and message in err and len(err.splitlines()) == 1


def _commands(parser, prefix=()):
    """Every command path of the parser, sub-commands included."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name)
                yield from _commands(sub, (*prefix, name))


def test_every_command_prints_its_help(capsys):
    # (`audit --help` used to raise a TypeError: a bare % in a help string)
    from simulations.cli import build_parser

    commands = list(_commands(build_parser()))
    assert ("audit", "mia") in commands and ("deploy", "supernode") in commands
    for command in [(), *commands]:
        with pytest.raises(SystemExit) as exit_info:
            main([*command, "--help"])
        assert exit_info.value.code == 0, command
        assert "usage: fedpersona" in capsys.readouterr().out


def test_malformed_user_data_fails_the_simulation_cleanly(tmp_path, capsys):
    pop = tmp_path / "pop"
    assert main(["data", "shakespeare", "--out", str(pop), "--tokenizer", "tiny",
                 "min-records=150"]) == 0
    manifest = json.loads((pop / "population.json").read_text())
    victim = next(u["user_id"] for u in manifest["users"] if u["role"] == "train")
    (pop / "users" / victim / "data.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    capsys.readouterr()

    code = main(["simulate", "--out", str(tmp_path / "run"), f"data-dir={pop}", "model=tiny",
                 "num-rounds=1", "max-users=0", "clients-per-round=1000"])

    assert code == 1
    err = capsys.readouterr().err
    assert f"{victim}/data.jsonl:2: malformed JSON" in err


def test_a_bug_keeps_its_traceback_and_a_user_error_is_one_line(monkeypatch, capsys):
    # Arrange: the command fails inside our own code, first with a bug, then with a
    # user error
    def raising(error):
        def data_command(args):
            raise error
        return data_command

    argv = ["data", "shakespeare", "--out", "unused"]

    # Act / Assert: a bare ValueError is a bug: it propagates, with its traceback
    monkeypatch.setattr(cli, "_data", raising(ValueError("boom")))
    with pytest.raises(ValueError, match="boom"):
        main(argv)
    assert capsys.readouterr().err == ""

    # Act / Assert: a ConfigError (a ValueError too) is the user's: one line, exit 1
    monkeypatch.setattr(cli, "_data", raising(ConfigError("min-records must be >= 1, got 0")))
    assert main(argv) == 1
    assert capsys.readouterr().err == "fedpersona: error: min-records must be >= 1, got 0\n"


@pytest.mark.parametrize("args, message", [
    (["deploy", "certs", "--supernodes", "../evil"], "bad SuperNode name '../evil'"),
    (["deploy", "certs", "--host", ""], "bad host ''"),
    (["deploy", "connect", "--insecure"], "config.toml: malformed TOML"),
    (["audit", "ledger"], "give --run DIR (a finished run) or --out DIR"),
    (["audit", "canary", "--run", "no-run", "--candidates", "0"],
     "--candidates must be >= 1, got 0"),
])
def test_user_errors_that_were_bare_value_errors_are_still_one_line(args, message, tmp_path,
                                                                     monkeypatch, capsys):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr"))
    (tmp_path / "flwr").mkdir()
    (tmp_path / "flwr" / "config.toml").write_text("[superlink\n")
    if args[:2] == ["deploy", "certs"]:
        args = [*args, "--out", str(tmp_path / "certs")]

    code = main(args)

    err = capsys.readouterr().err
    assert code == 1 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "certs").exists()  # refused before anything was written


# -- conventions a CLI user expects -------------------------------------------------------


def test_version_names_the_package(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])

    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("fedpersona ")


def test_an_unknown_setting_suggests_the_closest_ones(capsys):
    assert main(["simulate", "num-round=3"]) == 1

    err = capsys.readouterr().err
    assert "unknown setting 'num-round' (did you mean num-rounds" in err
    assert len(err.strip().splitlines()) == 1


def test_config_lists_every_setting_with_its_default_and_meaning(capsys):
    import dataclasses

    from shared.config import RunConfig

    assert main(["config"]) == 0

    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "setting" not in line]
    assert len(rows) == len(dataclasses.fields(RunConfig))
    cells = {row.split("|")[1].strip(): [c.strip() for c in row.split("|")[2:4]] for row in rows}
    assert cells["num-rounds"] == ["5", "federated rounds"]
    assert cells["dp"][0] == "true" and cells["model"][0] == '"smollm2"'
    assert all(meaning for _, meaning in cells.values())
    assert main(["config", "--section", "nope"]) == 1


def test_more_clients_per_round_than_users_is_said():
    from shared.config import RunConfig
    from simulations.run.simulate import sampling_note

    assert "samples all 2" in sampling_note(RunConfig(clients_per_round=100), 2)
    assert sampling_note(RunConfig(clients_per_round=2), 2) is None
