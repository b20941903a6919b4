"""Using the personalized model: ``generate`` and ``chat`` (a user named by id, a forced
stack, a seed), and untrained persona adapters never presented as serving."""

from __future__ import annotations

import io

import pytest
from helpers import write_finished_run

from client.serving.coldstart import SERVED_FITTED, SERVED_GLOBAL, choose_adapters
from simulations.cli import main


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished tiny run: a trained global and persona "a", persona "b" never trained
    (its B all zero, as initialised), and user u1's own adapter on its device."""
    return write_finished_run(tmp_path_factory.mktemp("serving-cli"), trained_personas=("a",),
                              untrained_personas=("b",))


def test_an_untrained_persona_is_never_chosen_and_its_user_is_told():
    declared = choose_adapters(has_user_adapter=False, declared_persona="b",
                               known_personas=("a", "b"), untrained_personas=frozenset({"b"}))
    fitted = choose_adapters(has_user_adapter=False, declared_persona=None,
                             known_personas=("a", "b"), persona_losses={"a": 2.0, "b": 1.0},
                             global_loss=3.0, untrained_personas=frozenset({"b"}))

    assert declared.served_by == SERVED_GLOBAL and declared.persona is None
    assert "persona 'b' never trained" in declared.reason
    assert (fitted.served_by, fitted.persona) == (SERVED_FITTED, "a")  # b's 1.0 is not served


def test_run_adapters_know_which_personas_never_trained(tiny_run):
    from client.serving.run_adapters import RunAdapters

    cfg, run = tiny_run
    assert RunAdapters(run, cfg).untrained_personas == frozenset({"b"})


def test_generate_names_a_user_by_id_and_says_an_untrained_persona_does_not_serve(
        tiny_run, capsys):
    _, run = tiny_run

    code = main(["generate", "--run", str(run), "--user", "u2", "--explain",
                 "--max-new-tokens", "4", "to be"])

    out = capsys.readouterr().out
    assert code == 0, out
    assert "persona 'b' never trained" in out  # u2 declares b
    assert "(persona b)" not in out


def test_generate_with_a_forced_level_and_a_seed_is_reproducible(tiny_run, capsys):
    _, run = tiny_run
    args = ["generate", "--run", str(run), "--user", "u1", "--level", "global+persona+user",
            "--temperature", "1.0", "--max-new-tokens", "6", "--explain"]

    outputs = []
    for seed in ("1", "1", "2"):
        assert main([*args, "--seed", seed, "ab ab"]) == 0
        outputs.append(capsys.readouterr().out)

    assert "stack: global+persona+user, as --level asks" in outputs[0]
    assert outputs[0] == outputs[1]  # same seed, same sample


def test_generate_refuses_an_unknown_user_or_a_stack_the_user_lacks(tiny_run, capsys):
    _, run = tiny_run

    assert main(["generate", "--run", str(run), "--user", "u9", "hi"]) == 1
    err = capsys.readouterr().err
    assert "no user 'u9'" in err and "did you mean" in err and len(err.strip().splitlines()) == 1
    assert main(["generate", "--run", str(run), "--user", "u2", "--level",
                 "global+persona+user", "hi"]) == 1  # u2 has no user adapter
    err = capsys.readouterr().err
    assert "this user has no such stack" in err and len(err.strip().splitlines()) == 1


def test_chat_answers_each_line_with_the_model_loaded_once(tiny_run, capsys, monkeypatch):
    _, run = tiny_run
    from client.serving.run_adapters import RunAdapters

    loads = []
    real = RunAdapters.__init__

    def counting(self, *args, **kwargs):
        loads.append(1)
        real(self, *args, **kwargs)

    monkeypatch.setattr(RunAdapters, "__init__", counting)
    monkeypatch.setattr("sys.stdin", io.StringIO("ab ab\nba ba\n\nnever read\n"))

    assert main(["chat", "--run", str(run), "--user", "u1", "--max-new-tokens", "3"]) == 0

    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("served by:")
    answers = out[out.index("one prompt per line; an empty line or end of input stops") + 1:]
    assert len(answers) == 2 and len(loads) == 1
