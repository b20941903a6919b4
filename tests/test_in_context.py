"""The in-context baselines' pure parts: the context-prefixed encoding
(shared.model.lm.encode_in_context) and the bag-of-words retrieval (simulations.in_context).
The tiny tokenizer is byte-level: one token per character, bos 1, eos 2."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import RECORDS, tokenizer

from client.serving.in_context import (
    bag_of_words,
    cosine,
    in_context_data,
    most_similar,
    retrieval_query,
)
from shared.data.userdata import Record
from shared.model.lm import IGNORE_INDEX, encode_in_context, encode_records

BOS, EOS = 1, 2


def ids(text: str) -> list[int]:
    return tokenizer()(text, add_special_tokens=False)["input_ids"]


# -- encode_in_context -------------------------------------------------------------------------

@pytest.mark.parametrize("seq_len", [6, 12, 40])  # 6 and 12 cut records, 40 does not
def test_without_context_a_row_is_encode_records_row_padded_wider(seq_len):
    plain = encode_records(RECORDS, tokenizer(), seq_len)

    wide = encode_in_context(RECORDS, [[]] * len(RECORDS), tokenizer(), seq_len=seq_len,
                             context_tokens=16)

    assert wide.input_ids.shape == (len(RECORDS), 16 + seq_len)
    assert torch.equal(wide.input_ids[:, :seq_len], plain.input_ids)
    assert torch.equal(wide.attention_mask[:, :seq_len], plain.attention_mask)
    assert torch.equal(wide.labels[:, :seq_len], plain.labels)
    assert not wide.attention_mask[:, seq_len:].any()
    assert (wide.labels[:, seq_len:] == IGNORE_INDEX).all()


def test_context_keeps_the_first_candidates_that_fit_most_wanted_last_and_unscored():
    # Arrange: candidates cost 4, 3, 6 and 2 tokens (text + eos), budget 9
    record = Record("yo", prompt="q:")
    candidates = [Record("abc"), Record("de"), Record("fghij"), Record("k")]

    # Act
    row = encode_in_context([record], [candidates], tokenizer(), seq_len=8, context_tokens=9)

    # Assert: "abc" and "de" fit (7 tokens); "fghij" does not and ends the context, so "k"
    # (which would fit) is not taken; "abc", the most wanted, sits right before the record
    context = ids("de") + [EOS] + ids("abc") + [EOS]
    expected_ids = [BOS] + context + ids("q:") + ids("yo") + [EOS]
    n = len(expected_ids)
    assert row.input_ids[0, :n].tolist() == expected_ids
    assert row.attention_mask[0].sum() == n
    assert row.labels[0, :n].tolist() == [IGNORE_INDEX] * (1 + len(context) + 2) + ids("yo") \
        + [EOS]
    assert (row.labels[0, n:] == IGNORE_INDEX).all()


def test_context_never_exceeds_its_budget_and_the_record_keeps_its_own_width():
    record = Record("a long line of text to be scored")
    candidates = [Record("one two"), Record("three four five"), Record("six")]

    for budget in range(0, 30):
        row = encode_in_context([record], [candidates], tokenizer(), seq_len=10,
                                context_tokens=budget)
        scored = int((row.labels[0] != IGNORE_INDEX).sum())
        context = int(row.attention_mask[0].sum()) - 10  # the record: bos + 9 tokens
        assert 0 <= context <= budget
        assert scored == 9  # the record's 9 response tokens after bos, whatever the context


def test_contexts_must_match_records():
    with pytest.raises(ValueError, match="2 records but 1 contexts"):
        encode_in_context(RECORDS[:2], [[]], tokenizer(), seq_len=8, context_tokens=4)


# -- the bag-of-words retrieval ----------------------------------------------------------------

def test_cosine_of_bags_of_words_on_hand_values():
    query = bag_of_words("The king is DEAD")

    assert query == {"the": 1, "king": 1, "is": 1, "dead": 1}
    assert cosine(query, bag_of_words("dead king")) == pytest.approx(1 / math.sqrt(2))
    assert cosine(query, bag_of_words("hello world")) == 0.0
    assert cosine(query, bag_of_words("")) == 0.0


def test_most_similar_orders_by_cosine_then_by_recency():
    records = [Record("long live the queen"),                # 1 / (2 * 2) = 0.25
               Record("the king is dead long live the king"),  # 6 / (2 sqrt 12) = 0.87
               Record("dead king"),                          # 2 / (2 sqrt 2) = 0.71
               Record("hello world")]                        # 0

    assert most_similar("the king is dead", records) == [1, 2, 0, 3]
    # equal scores: the later (more recent) record first
    assert most_similar("a", [Record("a b"), Record("c"), Record("a b")]) == [2, 0, 1]
    # a record's prompt counts as its text
    assert most_similar("cue", [Record("x"), Record("y", prompt="cue")]) == [1, 0]


def test_retrieval_looks_at_the_prompt_never_the_response():
    train = [Record("first"), Record("latest line")]

    assert retrieval_query(Record("secret answer", prompt="the cue"), train) == "the cue"
    assert retrieval_query(Record("secret answer"), train) == "latest line"
    assert retrieval_query(Record("secret answer"), []) == ""


def test_in_context_data_recent_and_retrieved_contexts():
    train = [Record("ab"), Record("zz"), Record("cd")]  # chronological: "cd" is the latest
    test = [Record("zz!", prompt="zz")]

    recent = in_context_data(test, train, tokenizer(), seq_len=8, context_tokens=6,
                             retrieve=False)
    retrieved = in_context_data(test, train, tokenizer(), seq_len=8, context_tokens=6,
                                retrieve=True)

    # 3 tokens each: two fit. Recent: "cd" then "zz" (latest last). Retrieved: "zz" is the
    # only match, then by recency "cd"
    assert recent.input_ids[0, :7].tolist() == [BOS, *ids("zz"), EOS, *ids("cd"), EOS]
    assert retrieved.input_ids[0, :7].tolist() == [BOS, *ids("cd"), EOS, *ids("zz"), EOS]
