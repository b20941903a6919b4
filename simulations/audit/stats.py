"""The statistics of the privacy audits: exposure, ROC, and the one-run epsilon bound.

Pure functions over numbers, so each is tested against cases whose answer is known.

- Exposure (Carlini et al., "The Secret Sharer", 2019): how far up a random
  secret ranks among candidates of the same format under the model's loss.
  A secret the model never saw has an expected rank-exposure of about
  ``1/ln 2 = 1.44`` bits; one that is memorised reaches ``log2(n + 1)``.
- Membership inference: ROC AUC (the Mann-Whitney statistic) and the true
  positive rate at a fixed low false positive rate (Carlini et al., "Membership
  Inference Attacks From First Principles", 2022: report the low-FPR regime).
- One-run audit (Steinke, Nasr and Jagielski, "Privacy Auditing with One (1)
  Training Run", 2023): m canaries each included with probability 1/2; the
  auditor guesses the inclusion of the r canaries it is surest of; v correct
  guesses give an epsilon lower bound at a chosen confidence (their Theorem 5.2,
  with the delta term of their Proposition 5.7).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import optimize, special, stats

CHANCE_EXPOSURE = 1 / math.log(2)  # E[log2((n+1)/U)], U uniform on 1..n+1, n large


# -- exposure ---------------------------------------------------------------------------------

def rank_exposure(canary_loss: float, candidate_losses: Sequence[float]) -> float:
    """``log2(n+1) - log2(rank)``: rank 1 = the canary beats all ``n`` candidates.

    Ties count half (a model that cannot tell the secret from the others must
    not score as if it ranked it first)."""
    losses = np.asarray(candidate_losses, dtype=float)
    if losses.size == 0 or not math.isfinite(canary_loss) or not np.isfinite(losses).all():
        raise ValueError("exposure needs finite losses and at least one candidate")
    rank = 1 + np.sum(losses < canary_loss) + 0.5 * np.sum(losses == canary_loss)
    return float(math.log2(losses.size + 1) - math.log2(rank))


def fitted_exposure(canary_loss: float, candidate_losses: Sequence[float], *,
                    space_bits: float) -> float:
    """``-log2 P[candidate loss <= canary loss]`` under a skew-normal fitted to the
    candidates (the Secret Sharer's extrapolation past the sampled ranks), capped
    at the size of the secret space."""
    losses = np.asarray(candidate_losses, dtype=float)
    shape, loc, scale = stats.skewnorm.fit(losses)
    log_cdf = float(stats.skewnorm.logcdf(canary_loss, shape, loc, scale))
    return float(min(max(-log_cdf / math.log(2), 0.0), space_bits))


# -- membership inference ---------------------------------------------------------------------

def roc_auc(member_scores: Sequence[float], nonmember_scores: Sequence[float]) -> float:
    """P[score(member) > score(non-member)] + P[tie] / 2; 0.5 is chance."""
    members = np.asarray(member_scores, dtype=float)
    others = np.asarray(nonmember_scores, dtype=float)
    if members.size == 0 or others.size == 0:
        raise ValueError("AUC needs at least one member and one non-member score")
    ranks = stats.rankdata(np.concatenate([members, others]))  # average ranks for ties
    u = ranks[:members.size].sum() - members.size * (members.size + 1) / 2
    return float(u / (members.size * others.size))


def tpr_at_fpr(member_scores: Sequence[float], nonmember_scores: Sequence[float],
               fpr: float) -> float:
    """The highest true positive rate of a threshold rule ``score >= t`` whose false
    positive rate is at most ``fpr`` (0 FPR allowed: then only scores above every
    non-member count)."""
    members = np.asarray(member_scores, dtype=float)
    others = np.sort(np.asarray(nonmember_scores, dtype=float))[::-1]
    allowed = math.floor(fpr * others.size + 1e-9)  # non-members we may flag
    # the threshold sits just above the (allowed+1)-th highest non-member score
    if allowed >= others.size:
        return 1.0
    bar = others[allowed]
    return float(np.mean(members > bar))


def roc_points(member_scores: Sequence[float], nonmember_scores: Sequence[float]
               ) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) of every threshold, from (0, 0) to (1, 1), for plotting."""
    members = np.asarray(member_scores, dtype=float)
    others = np.asarray(nonmember_scores, dtype=float)
    thresholds = np.unique(np.concatenate([members, others]))[::-1]
    fpr = [0.0] + [float(np.mean(others >= t)) for t in thresholds]
    tpr = [0.0] + [float(np.mean(members >= t)) for t in thresholds]
    return np.asarray(fpr), np.asarray(tpr)


# -- one-run audit ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Guesses:
    guesses: int  # r: canaries the auditor guessed (the rest it abstained on)
    correct: int  # v


def guess_inclusion(scores: Sequence[float], included: Sequence[bool], *, k_plus: int,
                    k_minus: int) -> Guesses:
    """Guess "included" for the ``k_plus`` highest scores, "excluded" for the
    ``k_minus`` lowest, abstain on the rest; count the correct guesses."""
    scores_arr = np.asarray(scores, dtype=float)
    truth = np.asarray(included, dtype=bool)
    if scores_arr.shape != truth.shape or k_plus + k_minus > scores_arr.size:
        raise ValueError(f"{k_plus}+{k_minus} guesses over {scores_arr.size} canaries "
                         f"({truth.size} labels)")
    order = np.argsort(-scores_arr, kind="stable")
    top, bottom = order[:k_plus], order[scores_arr.size - k_minus:]
    correct = int(truth[top].sum() + (~truth[bottom]).sum())
    return Guesses(k_plus + k_minus, correct)


def one_run_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[at least ``v`` of ``r`` guesses correct] for any (epsilon, delta)-DP
    mechanism over ``m`` canaries (Steinke et al. 2023, Prop. 5.7)."""
    if not (0 <= v <= r <= m and epsilon >= 0 and 0 <= delta <= 1):
        raise ValueError(f"bad one-run audit arguments m={m} r={r} v={v} "
                         f"epsilon={epsilon} delta={delta}")
    q = 1 / (1 + math.exp(-epsilon))  # accuracy of epsilon-DP randomized response
    tail = float(stats.binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    # window_i = P[v - i <= Binomial(r, q) < v], i = 1..v; alpha = max_i window_i / i
    window = np.cumsum(stats.binom.pmf(np.arange(v - 1, -1, -1), r, q))
    alpha = float(np.max(window / np.arange(1, v + 1))) if v else 0.0
    return min(tail + 2 * m * delta * alpha, 1.0)


def one_run_epsilon_lower_bound(m: int, r: int, v: int, *, delta: float,
                                confidence: float = 0.95) -> float:
    """The largest epsilon that ``v`` correct of ``r`` guesses rejects at ``confidence``:
    with that probability the mechanism is not (epsilon', delta)-DP for any smaller
    epsilon'. 0 when the guesses are no better than chance."""
    p = 1 - confidence
    if one_run_p_value(m, r, v, 0.0, delta) >= p:
        return 0.0
    low, high = 0.0, 1.0
    while one_run_p_value(m, r, v, high, delta) < p:
        high *= 2
        if high > 1e3:
            return math.inf
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if one_run_p_value(m, r, v, mid, delta) < p else (low, mid)
    return low


# -- Gaussian DP: an estimate from the scores' separation ------------------------------------

def gaussian_dp_delta(mu: float, epsilon: float) -> float:
    """delta(epsilon) of mu-Gaussian DP (Dong, Roth and Su, "Gaussian Differential
    Privacy", 2022, Corollary 2.13): ``Phi(-e/mu + mu/2) - e^e Phi(-e/mu - mu/2)``."""
    first = special.ndtr(-epsilon / mu + mu / 2)
    second = math.exp(epsilon + special.log_ndtr(-epsilon / mu - mu / 2))
    return float(first - second)


def gaussian_dp_epsilon(mu: float, delta: float) -> float:
    """The epsilon at ``delta`` of mu-Gaussian DP (a Gaussian mechanism of sensitivity 1
    and noise std ``1/mu``); 0 when ``mu <= 0``, inf when ``mu`` is infinite."""
    if not mu > 0:
        return 0.0
    if math.isinf(mu):
        return math.inf
    if gaussian_dp_delta(mu, 0.0) <= delta:
        return 0.0
    high = 1.0
    while gaussian_dp_delta(mu, high) > delta:
        high *= 2
    return float(optimize.brentq(lambda e: gaussian_dp_delta(mu, e) - delta, 0.0, high,
                                 xtol=1e-9))


def score_separation(scores: Sequence[float], included: Sequence[bool], *,
                     confidence: float = 0.95) -> tuple[float, float]:
    """``mu = (mean of included - mean of excluded) / std of excluded``, and its one-sided
    lower confidence limit (normal approximation): how far apart a Gaussian mechanism's
    outputs with and without a canary lie, in units of its noise. An estimate under the
    assumption that the scores are Gaussian, not a certificate."""
    values = np.asarray(scores, dtype=float)
    truth = np.asarray(included, dtype=bool)
    inside, outside = values[truth], values[~truth]
    if inside.size < 2 or outside.size < 2:
        raise ValueError("the separation needs two included and two excluded scores")
    spread = float(outside.std(ddof=1))
    if spread == 0:
        return math.inf, math.inf
    mu = float(inside.mean() - outside.mean()) / spread
    error = math.sqrt(1 / inside.size + 1 / outside.size + mu ** 2 / (2 * outside.size))
    return mu, mu - float(stats.norm.ppf(confidence)) * error
