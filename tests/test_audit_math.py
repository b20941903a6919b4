"""The audit statistics on inputs whose answers are known."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from scipy import stats

from simulations.audit.stats import (
    CHANCE_EXPOSURE,
    fitted_exposure,
    guess_inclusion,
    one_run_epsilon_lower_bound,
    one_run_p_value,
    rank_exposure,
    roc_auc,
    roc_points,
    tpr_at_fpr,
)

# -- exposure ------------------------------------------------------------------------------------


def test_rank_exposure_of_known_ranks():
    candidates = [1.0, 2.0, 3.0]  # n = 3, so log2(n + 1) = 2
    assert rank_exposure(0.5, candidates) == 2.0  # beats every candidate: rank 1
    assert rank_exposure(2.5, candidates) == pytest.approx(2 - math.log2(3))  # rank 3
    assert rank_exposure(9.0, candidates) == 0.0  # worst of all: rank n + 1
    assert rank_exposure(2.0, candidates) == pytest.approx(2 - math.log2(2.5))  # a tie: half


def test_rank_exposure_of_an_unseen_secret_averages_the_chance_value():
    rng = np.random.default_rng(0)
    candidates = rng.normal(size=2000)
    exposures = [rank_exposure(float(x), candidates) for x in rng.normal(size=4000)]
    assert np.mean(exposures) == pytest.approx(CHANCE_EXPOSURE, abs=0.08)


def test_rank_exposure_rejects_empty_or_non_finite_input():
    with pytest.raises(ValueError):
        rank_exposure(1.0, [])
    with pytest.raises(ValueError):
        rank_exposure(float("nan"), [1.0])


def test_fitted_exposure_extrapolates_past_the_sampled_ranks():
    candidates = np.random.default_rng(1).normal(loc=5.0, scale=0.5, size=5000)
    canary = 5.0 - 4 * 0.5  # 4 sigma below: P = Phi(-4) = 3.2e-5, about 14.9 bits
    expected = -math.log2(stats.norm.cdf(-4))
    assert fitted_exposure(canary, candidates, space_bits=20) == pytest.approx(expected, abs=1)
    assert rank_exposure(canary, candidates) == pytest.approx(math.log2(5001))  # saturated
    assert fitted_exposure(0.0, candidates, space_bits=20) == 20  # capped at the space


# -- membership inference ---------------------------------------------------------------------


def test_auc_of_perfect_reversed_tied_and_hand_counted_scores():
    assert roc_auc([3, 4], [1, 2]) == 1.0
    assert roc_auc([1, 2], [3, 4]) == 0.0
    assert roc_auc([1, 1], [1, 1]) == 0.5
    # pairs (m, o): (2,1) win, (2,3) loss, (4,1) win, (4,3) win -> 3/4
    assert roc_auc([2, 4], [1, 3]) == 0.75


def test_auc_is_the_area_under_the_roc_points():
    rng = np.random.default_rng(2)
    members, others = rng.normal(0.5, 1, 300), rng.normal(0, 1, 400)
    fpr, tpr = roc_points(members, others)
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc(members, others), abs=1e-9)


def test_tpr_at_fpr_counts_only_members_above_the_allowed_non_members():
    others = list(range(100))  # non-member scores 0..99
    members = [99.5, 98.5, 97.5, 50.0]
    assert tpr_at_fpr(members, others, 0.0) == 0.25  # above 99 only: 99.5
    assert tpr_at_fpr(members, others, 0.01) == 0.5  # one non-member may pass: above 98
    assert tpr_at_fpr(members, others, 0.03) == 0.75
    assert tpr_at_fpr(members, others, 1.0) == 1.0


# -- one-run audit ---------------------------------------------------------------------------------


@pytest.mark.parametrize("r", [10, 40, 100])
def test_all_guesses_right_gives_the_randomized_response_bound(r):
    # with delta = 0, P[r of r right] = q^r for q = e^eps / (1 + e^eps); at 95% the bound
    # solves q^r = 0.05
    q = 0.05 ** (1 / r)
    expected = math.log(q / (1 - q))
    assert one_run_epsilon_lower_bound(1000, r, r, delta=0.0) == pytest.approx(expected,
                                                                                 rel=1e-6)


def test_bound_sits_where_the_p_value_crosses_the_confidence():
    bound = one_run_epsilon_lower_bound(500, 60, 55, delta=1e-5)
    assert one_run_p_value(500, 60, 55, bound - 1e-3, 1e-5) < 0.05
    assert one_run_p_value(500, 60, 55, bound + 1e-3, 1e-5) >= 0.05


def test_bound_grows_with_correct_guesses_and_shrinks_with_delta():
    bounds = [one_run_epsilon_lower_bound(1000, 100, v, delta=0.0) for v in (60, 75, 90, 100)]
    assert bounds == sorted(bounds) and bounds[0] < bounds[-1]
    assert one_run_epsilon_lower_bound(1000, 100, 100, delta=1e-4) < bounds[-1]
    assert one_run_epsilon_lower_bound(1000, 100, 50, delta=0.0) == 0.0  # chance


def test_one_run_p_value_rejects_impossible_counts():
    with pytest.raises(ValueError):
        one_run_p_value(10, 5, 6, 1.0, 0.0)
    with pytest.raises(ValueError):
        one_run_p_value(10, 11, 5, 1.0, 0.0)


def test_bound_is_valid_for_an_epsilon_dp_mechanism():
    """Randomized response is exactly eps-DP per bit; the 95% bound must stay below eps
    in (about) 95% of runs or more. 40 seeded runs: at most 4 may exceed it."""
    eps, m = 2.0, 400
    keep = math.exp(eps) / (1 + math.exp(eps))
    above = 0
    for seed in range(40):
        rng = random.Random(seed)
        included = [rng.random() < 0.5 for _ in range(m)]
        released = [b if rng.random() < keep else not b for b in included]  # eps-DP output
        scores = [float(x) + rng.random() * 1e-3 for x in released]
        g = guess_inclusion(scores, included, k_plus=50, k_minus=50)
        above += one_run_epsilon_lower_bound(m, g.guesses, g.correct, delta=0.0) > eps
    assert above <= 4


def test_guess_inclusion_counts_top_and_bottom():
    scores = [0.9, 0.1, 0.8, 0.2, 0.5]
    included = [True, False, False, True, True]
    g = guess_inclusion(scores, included, k_plus=2, k_minus=2)
    # top two: 0.9 (in: right), 0.8 (out: wrong); bottom two: 0.1 (out: right), 0.2 (in: wrong)
    assert (g.guesses, g.correct) == (4, 2)
    with pytest.raises(ValueError):
        guess_inclusion(scores, included, k_plus=3, k_minus=3)
