"""Language-model metrics (shared.util.metrics)."""

from __future__ import annotations

import math

import pytest

from shared.util.metrics import TokenStats, macro_summary


def test_perplexity_is_exp_of_mean_nll():
    stats = TokenStats(nll_sum=6.0, correct=1, tokens=4)

    assert stats.perplexity == math.exp(1.5)


def test_perplexity_of_a_perfect_model_is_one():
    assert TokenStats(0.0, 3, 3).perplexity == 1.0


def test_token_accuracy():
    assert TokenStats(nll_sum=1.0, correct=3, tokens=4).token_accuracy == 0.75


def test_empty_stats_are_nan():
    empty = TokenStats(0.0, 0, 0)

    assert math.isnan(empty.perplexity)
    assert math.isnan(empty.token_accuracy)


def test_addition_sums_fields_and_pools_perplexity():
    # Arrange
    a, b = TokenStats(2.0, 1, 2), TokenStats(4.0, 3, 4)

    # Act
    total = a + b

    # Assert: pooled over tokens, not an average of perplexities
    assert total == TokenStats(6.0, 4, 6)
    assert total.perplexity == math.exp(1.0)
    assert total.token_accuracy == 4 / 6


def test_macro_summary_mean_and_ci95():
    summary = macro_summary({"u1": 1.0, "u2": 2.0, "u3": 3.0})

    # sample stdev of [1, 2, 3] is 1
    assert summary["mean"] == 2.0
    assert summary["ci95"] == pytest.approx(1.96 / math.sqrt(3), rel=1e-12)
    assert summary["n"] == 3


def test_macro_summary_ignores_nan_and_inf():
    summary = macro_summary({"a": 1.0, "b": float("nan"), "c": 3.0, "d": float("inf")})

    assert summary["mean"] == 2.0
    assert summary["n"] == 2
    assert summary["ci95"] == pytest.approx(1.96 * math.sqrt(2) / math.sqrt(2), rel=1e-12)


def test_macro_summary_of_one_user_has_zero_width():
    assert macro_summary({"a": 5.0}) == {"mean": 5.0, "ci95": 0.0, "n": 1}


def test_macro_summary_of_no_finite_values():
    summary = macro_summary({"a": float("nan")})

    assert math.isnan(summary["mean"]) and math.isnan(summary["ci95"]) and summary["n"] == 0
