"""What a device serves (client.serving.stack): the stacks it can serve, the choice by held-out
loss, and which lines the choice is made on. The tiny tokenizer is byte-level."""

from __future__ import annotations

import math

import pytest
from helpers import tokenizer

from client.serving.stack import candidates, choose_levels, serve_from_held_out, stack_name
from shared.data.userdata import Record
from shared.model.lm import IGNORE_INDEX
from shared.util.metrics import TokenStats

G, GP, GPU, GU = ("global",), ("global", "persona"), ("global", "persona", "user"), \
    ("global", "user")


@pytest.mark.parametrize(("has_persona", "has_user", "expected"), [
    (True, True, [(), G, GP, GPU]),  # the user adapter was fitted under its persona: no g+u
    (True, False, [(), G, GP]),
    (False, True, [(), G, GU]),
    (False, False, [(), G]),
])
def test_candidates_are_the_stacks_the_device_holds(has_persona, has_user, expected):
    assert candidates(has_persona=has_persona, has_user=has_user) == expected


def test_the_lowest_finite_loss_wins_and_a_tie_goes_to_fewer_levels():
    assert choose_levels({(): 3.1, G: 3.0, GP: 2.5, GPU: 2.7}) == GP
    assert choose_levels({G: 2.5, GP: 2.5, GPU: 2.6}) == G
    assert choose_levels({(): 2.5, G: 2.5}) == ()  # an adapter that does not help is not served
    assert choose_levels({G: math.nan, GP: 4.0, GPU: math.inf}) == GP
    assert choose_levels({G: math.nan, GP: math.nan}) == ()
    assert [stack_name(s) for s in ((), G, GPU)] == ["base", "global", "global+persona+user"]


def _responses(data) -> list[str]:
    """The scored text of each encoded row (the labelled tokens, eos dropped)."""
    rows = []
    for labels in data.labels:
        scored = [int(t) for t in labels if t != IGNORE_INDEX]
        rows.append(tokenizer().decode(scored[:-1]))
    return rows


def test_the_choice_is_made_on_the_last_lines_after_the_earlier_ones_as_context():
    # Arrange: 10 lines, 20% held out -> the last 2; a scorer that favours g+p
    train = [Record(f"line {i}") for i in range(10)]
    seen = []

    def score(data, levels):
        seen.append((levels, _responses(data), int(data.attention_mask.sum())))
        return TokenStats({G: 30.0, GP: 20.0, GPU: 25.0}[levels], 0, 10)

    # Act
    served = serve_from_held_out(train, [G, GP, GPU], score, tokenizer(), seq_len=16,
                                 context_tokens=21, holdout_fraction=0.2, max_records=0)

    # Assert: every stack scored on the same two held-out lines; the context (3 lines of
    # 7 tokens fit 21) comes from the 8 earlier lines only
    assert served.levels == GP and served.held_out_records == 2
    assert served.held_out_loss == {"global": 3.0, "global+persona": 2.0,
                                    "global+persona+user": 2.5}
    assert [s[0] for s in seen] == [G, GP, GPU]
    assert all(s[1] == ["line 8", "line 9"] for s in seen)
    assert all(s[2] == 2 * (1 + 21 + 7) for s in seen)  # bos + context + the line + eos


def test_at_most_max_records_of_the_latest_held_out_lines_are_scored():
    train = [Record(f"line {i}") for i in range(10)]
    seen = []

    def score(data, levels):
        seen.append(_responses(data))
        return TokenStats(1.0, 0, 1)

    serve_from_held_out(train, [G, GP], score, tokenizer(), seq_len=16, context_tokens=0,
                        holdout_fraction=0.5, max_records=2)

    assert seen == [["line 8", "line 9"]] * 2


@pytest.mark.parametrize("train", [[], [Record("only one line")]])
def test_without_held_out_lines_the_fullest_stack_is_served_unchecked(train):
    def score(data, levels):
        raise AssertionError("nothing to score")

    served = serve_from_held_out(train, [(), G, GP], score, tokenizer(), seq_len=16,
                                 context_tokens=21, holdout_fraction=0.2, max_records=0)

    # (the cold-start order's choice: the candidates end with it)
    assert served.levels == GP and served.held_out_loss == {} and served.held_out_records == 0
