"""The cold-start fallback (client.serving.coldstart) and serving a user from a run's adapters
(client.serving.generate): each branch of the order, then loss-based choices on the tiny model in
constructed cases whose right answer is known."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import fit_persona, randomize_level, tiny_lora, tiny_peft, tokenizer

from client.serving.coldstart import (
    SERVED_DECLARED,
    SERVED_FITTED,
    SERVED_GLOBAL,
    SERVED_USER,
    AdapterChoice,
    choose_adapters,
)
from client.serving.generate import choose_for_user, generate_text, serve_user
from client.serving.run_adapters import RunAdapters
from client.store import DeviceStore
from shared.config import RunConfig
from shared.data.userdata import Profile, Record, UserData, write_user
from shared.model.adapters import activate, level_state, load_level, save_adapter
from shared.model.lm import encode_records, per_record_loss

KNOWN = ("comedies", "tragedies")
SERVED_LABELS = {SERVED_USER, SERVED_DECLARED, SERVED_FITTED, SERVED_GLOBAL}
SEQ_LEN = 24

# Two styles a byte-level model tells apart at once: letters "ab" versus "z" and digits.
STYLE_X = (Record("abab abab abab"), Record("ab abab ab abab")) * 2
STYLE_Y = (Record("zzzz 1234 zzzz"), Record("9876 zzzz 5432")) * 2
SHOTS_X = (Record("abab ab abab abab"), Record("ab ab abab"))


def _assert_explained(choice: AdapterChoice) -> None:
    assert choice.served_by in SERVED_LABELS
    assert isinstance(choice.reason, str) and choice.reason.strip()


# -- the fallback order, branch by branch ------------------------------------------------------

def test_user_adapter_with_declared_persona_serves_all_three_levels():
    # Act: a lower-loss other persona must not override the declared one
    choice = choose_adapters(has_user_adapter=True, declared_persona="tragedies",
                             known_personas=KNOWN, persona_losses={"comedies": 0.1,
                                                                   "tragedies": 5.0},
                             global_loss=9.0)

    # Assert
    assert choice == AdapterChoice(("global", "persona", "user"), "tragedies", SERVED_USER,
                                   choice.reason)
    assert "user adapter" in choice.reason and "tragedies" in choice.reason
    _assert_explained(choice)


def test_user_adapter_without_any_persona_serves_global_and_user():
    choice = choose_adapters(has_user_adapter=True, declared_persona=None, known_personas=KNOWN)

    assert choice.levels == ("global", "user") and choice.persona is None
    assert choice.served_by == SERVED_USER
    _assert_explained(choice)


def test_user_adapter_with_an_unknown_declared_persona_and_no_fit_serves_global_and_user():
    choice = choose_adapters(has_user_adapter=True, declared_persona="pastoral",
                             known_personas=KNOWN, persona_losses={"comedies": 4.0},
                             global_loss=3.0)

    assert choice.levels == ("global", "user") and choice.persona is None
    assert choice.served_by == SERVED_USER


def test_user_adapter_without_declared_persona_takes_the_best_fitting_persona():
    choice = choose_adapters(has_user_adapter=True, declared_persona=None, known_personas=KNOWN,
                             persona_losses={"comedies": 2.0, "tragedies": 1.5},
                             global_loss=3.0)

    assert choice.levels == ("global", "persona", "user") and choice.persona == "tragedies"
    assert choice.served_by == SERVED_USER


def test_known_declared_persona_serves_global_and_persona_before_any_loss():
    choice = choose_adapters(has_user_adapter=False, declared_persona="comedies",
                             known_personas=KNOWN, persona_losses={"tragedies": 0.01},
                             global_loss=9.0)

    assert choice.levels == ("global", "persona") and choice.persona == "comedies"
    assert choice.served_by == SERVED_DECLARED
    assert "comedies" in choice.reason
    _assert_explained(choice)


def test_unknown_declared_persona_without_a_better_persona_falls_to_global_and_says_so():
    choice = choose_adapters(has_user_adapter=False, declared_persona="pastoral",
                             known_personas=KNOWN, persona_losses={"comedies": 4.0,
                                                                   "tragedies": 5.0},
                             global_loss=3.0)

    assert choice.levels == ("global",) and choice.persona is None
    assert choice.served_by == SERVED_GLOBAL
    assert "pastoral" in choice.reason and "unknown" in choice.reason
    _assert_explained(choice)


def test_unknown_declared_persona_without_examples_falls_to_global_and_says_so():
    choice = choose_adapters(has_user_adapter=False, declared_persona="pastoral",
                             known_personas=KNOWN)

    assert choice.levels == ("global",) and choice.served_by == SERVED_GLOBAL
    assert "'pastoral' is unknown" in choice.reason


def test_unknown_declared_persona_falls_to_the_lowest_loss_persona():
    choice = choose_adapters(has_user_adapter=False, declared_persona="pastoral",
                             known_personas=KNOWN, persona_losses={"comedies": 2.0,
                                                                   "tragedies": 2.5},
                             global_loss=3.0)

    assert choice.levels == ("global", "persona") and choice.persona == "comedies"
    assert choice.served_by == SERVED_FITTED
    _assert_explained(choice)


def test_unknown_declared_persona_is_mentioned_when_a_persona_is_fitted():
    choice = choose_adapters(has_user_adapter=False, declared_persona="pastoral",
                             known_personas=KNOWN, persona_losses={"comedies": 2.0},
                             global_loss=3.0)

    assert "pastoral" in choice.reason


def test_lowest_loss_persona_is_chosen_and_the_reason_gives_the_numbers():
    choice = choose_adapters(has_user_adapter=False, declared_persona=None, known_personas=KNOWN,
                             persona_losses={"comedies": 3.25, "tragedies": 2.75},
                             global_loss=3.5)

    assert choice.levels == ("global", "persona") and choice.persona == "tragedies"
    assert choice.served_by == SERVED_FITTED
    assert "2.750" in choice.reason and "3.500" in choice.reason and "2 personas" in choice.reason


def test_lowest_loss_without_a_global_loss_still_picks_and_omits_the_comparison():
    choice = choose_adapters(has_user_adapter=False, declared_persona=None, known_personas=KNOWN,
                             persona_losses={"comedies": 1.0, "tragedies": 2.0})

    assert choice.persona == "comedies" and choice.served_by == SERVED_FITTED
    assert "global alone" not in choice.reason


def test_equal_losses_pick_the_first_persona_by_name():
    choice = choose_adapters(has_user_adapter=False, declared_persona=None,
                             known_personas=("b", "a"), persona_losses={"b": 1.0, "a": 1.0},
                             global_loss=2.0)

    assert choice.persona == "a"


@pytest.mark.parametrize("losses, global_loss", [
    ({"comedies": 3.0, "tragedies": 3.1}, 3.0),  # a tie with global is not "better"
    ({"comedies": 4.0, "tragedies": 3.9}, 3.0),
])
def test_no_persona_better_than_global_serves_global_only(losses, global_loss):
    choice = choose_adapters(has_user_adapter=False, declared_persona=None, known_personas=KNOWN,
                             persona_losses=losses, global_loss=global_loss)

    assert choice.levels == ("global",) and choice.persona is None
    assert choice.served_by == SERVED_GLOBAL
    assert "better than global" in choice.reason


@pytest.mark.parametrize("losses, why", [(None, "no examples"),
                                          ({}, "no persona adapter to compare")])
def test_no_examples_or_no_personas_serve_global_only(losses, why):
    choice = choose_adapters(has_user_adapter=False, declared_persona=None, known_personas=KNOWN,
                             persona_losses=losses)

    assert choice.levels == ("global",) and choice.persona is None
    assert choice.served_by == SERVED_GLOBAL
    assert why in choice.reason


def test_a_nan_persona_loss_is_never_chosen_whatever_the_names():
    for losses in ({"a": float("nan"), "b": 2.0}, {"b": float("nan"), "a": 2.0}):
        choice = choose_adapters(has_user_adapter=False, declared_persona=None,
                                 known_personas=("a", "b"), persona_losses=losses,
                                 global_loss=3.0)

        assert choice.persona == next(p for p, v in losses.items() if v == 2.0)


# -- loss-based choices on the tiny model ------------------------------------------------------

@pytest.fixture(scope="module")
def styled():
    """The tiny model plus persona "a" fitted to style X and persona "b" to style Y."""
    model = tiny_peft(seed=0)
    start = level_state(model, "persona")
    states = {"a": fit_persona(model, STYLE_X, start),
              "b": fit_persona(model, STYLE_Y, start)}
    return model, states


@torch.no_grad()
def _mean_loss(model, records, levels) -> float:
    data = encode_records(records, tokenizer(), SEQ_LEN)
    activate(model, levels)
    return float(per_record_loss(model, data.select(torch.arange(len(data)))).mean())


def test_loss_based_choice_picks_the_persona_trained_on_the_users_style(styled):
    # Arrange
    model, states = styled
    losses = {}
    for persona, state in states.items():
        load_level(model, "persona", state)
        losses[persona] = _mean_loss(model, SHOTS_X, ("global", "persona"))
    global_loss = _mean_loss(model, SHOTS_X, ("global",))

    # Act
    choice = choose_adapters(has_user_adapter=False, declared_persona=None,
                             known_personas=tuple(states), persona_losses=losses,
                             global_loss=global_loss)

    # Assert
    assert losses["a"] < global_loss < losses["b"]
    assert choice.persona == "a" and choice.served_by == SERVED_FITTED
    assert choice.levels == ("global", "persona")


def test_loss_based_choice_of_a_user_in_the_other_style(styled):
    model, states = styled
    shots = (Record("zzzz 1234"), Record("5678 zzzz zzzz"))
    losses = {}
    for persona, state in states.items():
        load_level(model, "persona", state)
        losses[persona] = _mean_loss(model, shots, ("global", "persona"))

    choice = choose_adapters(has_user_adapter=False, declared_persona=None,
                             known_personas=tuple(states), persona_losses=losses,
                             global_loss=_mean_loss(model, shots, ("global",)))

    assert choice.persona == "b"


# -- choose_for_user through a RunAdapters on a run directory ---------------------------------

@pytest.fixture(scope="module")
def evaluator(styled, tmp_path_factory):
    """A finished-looking run: report.json plus global and persona adapters "a" and "b"."""
    model, states = styled
    root = tmp_path_factory.mktemp("coldstart_run")
    run = root / "run"
    cfg = RunConfig(model="tiny", data_dir=str(root / "pop"), max_users=0, seq_len=SEQ_LEN,
                    run_dir=str(run), device="cpu", lora_rank=4, lora_alpha=8.0)
    run.mkdir()
    (run / "report.json").write_text(json.dumps({"config": cfg.to_flower()}))
    save_adapter(run / "adapters" / "global", level_state(model, "global"),
                 tiny_lora())
    for persona, state in states.items():
        save_adapter(run / "adapters" / "persona" / persona, state, tiny_lora())
    return RunAdapters(run, cfg)


def _user(root, user_id, persona, train=()):
    user_dir = root / user_id
    write_user(user_dir, UserData(Profile(user_id, persona), tuple(train)))
    return user_dir


def _slot(evaluator, level):
    return level_state(evaluator.runtime.model, level)


def _same_state(a, b) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_choose_for_user_fits_a_new_user_by_loss_and_loads_that_persona(evaluator, tmp_path):
    # Arrange: no declared persona, a few examples in style X
    user_dir = _user(tmp_path, "newcomer", None, SHOTS_X)

    # Act
    choice = choose_for_user(evaluator, user_dir)

    # Assert
    assert choice.persona == "a" and choice.served_by == SERVED_FITTED
    assert choice.levels == ("global", "persona")
    assert _same_state(_slot(evaluator, "persona"), evaluator.persona_states["a"])
    assert _same_state(_slot(evaluator, "global"), evaluator.global_state)


def test_choose_for_user_with_a_known_declared_persona_needs_no_examples(evaluator, tmp_path):
    user_dir = _user(tmp_path, "declared", "b", SHOTS_X)  # style X, but the profile says "b"

    choice = choose_for_user(evaluator, user_dir)

    assert choice.persona == "b" and choice.served_by == SERVED_DECLARED
    assert _same_state(_slot(evaluator, "persona"), evaluator.persona_states["b"])


def test_choose_for_user_without_examples_serves_global_only(evaluator, tmp_path):
    user_dir = _user(tmp_path, "empty", None)

    choice = choose_for_user(evaluator, user_dir)

    assert choice.levels == ("global",) and choice.served_by == SERVED_GLOBAL
    assert _same_state(_slot(evaluator, "persona"), evaluator.runtime.initial["persona"])


def test_choose_for_user_with_zero_shots_ignores_the_examples(evaluator, tmp_path):
    user_dir = _user(tmp_path, "noshots", None, SHOTS_X)

    choice = choose_for_user(evaluator, user_dir, shots=0)

    assert choice.served_by == SERVED_GLOBAL and choice.persona is None


def test_choose_for_user_serves_the_stored_user_adapter_first(evaluator, tmp_path):
    # Arrange: a user adapter on the device, a declared persona and examples
    user_dir = _user(tmp_path, "returning", "a", SHOTS_X)
    user_state = randomize_level(evaluator.runtime.model, "user", scale=0.05, seed=3)
    DeviceStore.on_device(user_dir, evaluator.cfg.federation_key).save_user_adapter(
        user_state, evaluator.runtime.lora)

    # Act
    choice = choose_for_user(evaluator, user_dir)

    # Assert
    assert choice.served_by == SERVED_USER
    assert choice.levels == ("global", "persona", "user") and choice.persona == "a"
    assert _same_state(_slot(evaluator, "user"), user_state)

    evaluator.load()  # the next test starts from clean slots
    assert _same_state(_slot(evaluator, "user"), evaluator.runtime.initial["user"])


def test_a_user_adapter_of_another_federation_is_not_used(evaluator, tmp_path):
    user_dir = _user(tmp_path, "elsewhere", None)
    DeviceStore.on_device(user_dir, "some-other-federation").save_user_adapter(
        randomize_level(evaluator.runtime.model, "user", scale=0.05, seed=4),
        evaluator.runtime.lora)

    choice = choose_for_user(evaluator, user_dir)

    assert choice.served_by == SERVED_GLOBAL


def test_greedy_generation_under_a_choice_is_reproducible(evaluator, tmp_path):
    choice = choose_for_user(evaluator, _user(tmp_path, "writer", "a"))

    first = generate_text(evaluator, choice, "abab", max_new_tokens=6)
    second = generate_text(evaluator, choice, "abab", max_new_tokens=6)

    assert isinstance(first, str) and first == second


def test_serving_chooses_a_stack_on_held_out_lines_and_generates_after_the_context(
        evaluator, tmp_path):
    # Arrange: a returning user with a user adapter and ten lines of style X
    user_dir = _user(tmp_path, "served", "a", SHOTS_X * 2)
    DeviceStore.on_device(user_dir, evaluator.cfg.federation_key).save_user_adapter(
        randomize_level(evaluator.runtime.model, "user", scale=0.05, seed=5),
        evaluator.runtime.lora)

    # Act
    with_context = serve_user(evaluator, user_dir, context_tokens=40)
    without = serve_user(evaluator, user_dir, context_tokens=0)

    # Assert: the three stacks it holds were scored, the lowest served; the context
    # is what generation continues (reproducibly)
    losses = with_context.stack.held_out_loss
    assert set(losses) == {"base", "global", "global+persona", "global+persona+user"}
    assert with_context.stack.name == min(losses, key=losses.get)
    assert with_context.context[0] == SHOTS_X[-1]  # the most recent line first
    assert generate_text(evaluator, with_context, "ab", max_new_tokens=8) == \
        generate_text(evaluator, with_context, "ab", max_new_tokens=8)
    assert without.stack.held_out_loss.keys() == losses.keys()
    evaluator.load()
