"""Cold-start fallback order, each branch, and a loss-based choice with a known answer."""

import pytest
import torch
from helpers import tiny_peft, tokenizer

from client.coldstart import (
    SERVED_DECLARED,
    SERVED_FITTED,
    SERVED_GLOBAL,
    SERVED_USER,
    choose_adapters,
)
from shared.adapters import activate, level_state, load_level
from shared.lm import encode_records, per_record_loss
from shared.userdata import Record

KNOWN = ("comedies", "tragedies")


def test_user_adapter_comes_first_with_the_declared_persona():
    choice = choose_adapters(has_user_adapter=True, declared_persona="tragedies",
                             known_personas=KNOWN, persona_losses={"comedies": 1.0})

    assert choice.served_by == SERVED_USER
    assert choice.levels == ("global", "persona", "user") and choice.persona == "tragedies"


def test_user_adapter_without_any_persona_serves_global_plus_user():
    choice = choose_adapters(has_user_adapter=True, declared_persona=None, known_personas=KNOWN)

    assert choice.levels == ("global", "user") and choice.persona is None


def test_declared_persona_comes_before_examples():
    choice = choose_adapters(has_user_adapter=False, declared_persona="comedies",
                             known_personas=KNOWN, persona_losses={"tragedies": 0.1},
                             global_loss=9.0)

    assert choice.served_by == SERVED_DECLARED
    assert choice.levels == ("global", "persona") and choice.persona == "comedies"
    assert "declares" in choice.reason


def test_lowest_loss_persona_when_nothing_is_declared():
    choice = choose_adapters(has_user_adapter=False, declared_persona=None, known_personas=KNOWN,
                             persona_losses={"comedies": 3.2, "tragedies": 2.9}, global_loss=3.5)

    assert choice.served_by == SERVED_FITTED and choice.persona == "tragedies"
    assert "2.900" in choice.reason and "3.500" in choice.reason


def test_unknown_declared_persona_falls_through_and_says_so():
    choice = choose_adapters(has_user_adapter=False, declared_persona="pastoral",
                             known_personas=KNOWN, persona_losses={"comedies": 4.0},
                             global_loss=3.0)

    assert choice.served_by == SERVED_GLOBAL and choice.levels == ("global",)
    assert "'pastoral' is unknown" in choice.reason


@pytest.mark.parametrize("losses, global_loss", [({"comedies": 3.0, "tragedies": 3.1}, 3.0),
                                                 (None, None), ({}, 2.0)])
def test_global_only_when_no_persona_fits(losses, global_loss):
    choice = choose_adapters(has_user_adapter=False, declared_persona=None, known_personas=KNOWN,
                             persona_losses=losses, global_loss=global_loss)

    assert choice.served_by == SERVED_GLOBAL and choice.levels == ("global",)
    assert choice.reason


def _fit_persona(model, records, steps=30):
    """Non-private training of the persona slot on ``records``; returns its state."""
    data = encode_records(records, tokenizer(), 32)
    load_level(model, "persona", {k: torch.zeros_like(v)
                                  for k, v in level_state(model, "persona").items()
                                  if "lora_B" in k})
    params = activate(model, ("global", "persona"), train=("persona",), scheme="ffa")
    optimizer = torch.optim.Adam(params, lr=0.05)
    for _ in range(steps):
        optimizer.zero_grad()
        per_record_loss(model, data.select(torch.arange(len(data)))).mean().backward()
        optimizer.step()
    return level_state(model, "persona")


def test_loss_based_choice_finds_the_persona_trained_on_the_users_style():
    model = tiny_peft(seed=0)
    styles = {"ab": [Record("abab abab abab " * 2) for _ in range(6)],
              "digits": [Record("1234 5678 9012 " * 2) for _ in range(6)]}
    states = {name: _fit_persona(model, records) for name, records in styles.items()}
    shots = encode_records([Record("abab abab abab abab")] * 3, tokenizer(), 32)

    losses = {}
    for name, state in states.items():
        load_level(model, "persona", state)
        activate(model, ("global", "persona"))
        with torch.no_grad():
            losses[name] = float(per_record_loss(model, shots.select(torch.arange(3))).mean())
    activate(model, ("global",))
    with torch.no_grad():
        global_loss = float(per_record_loss(model, shots.select(torch.arange(3))).mean())
    choice = choose_adapters(has_user_adapter=False, declared_persona=None,
                             known_personas=tuple(states), persona_losses=losses,
                             global_loss=global_loss)

    assert choice.persona == "ab" and choice.served_by == SERVED_FITTED
    assert losses["ab"] < global_loss and losses["ab"] < losses["digits"]
