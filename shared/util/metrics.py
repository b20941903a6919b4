"""Language-model metrics: per-user perplexity and next-token accuracy, macro averages."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class TokenStats:
    """Sums over a user's predicted tokens: negative log-likelihood (nats) and hits."""

    nll_sum: float
    correct: int
    tokens: int

    def __add__(self, other: TokenStats) -> TokenStats:
        return TokenStats(self.nll_sum + other.nll_sum, self.correct + other.correct,
                          self.tokens + other.tokens)

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_sum / self.tokens) if self.tokens else float("nan")

    @property
    def token_accuracy(self) -> float:
        return self.correct / self.tokens if self.tokens else float("nan")


def per_user_summary(per_user: Mapping[str, Mapping[str, float]]) -> dict:
    """Macro perplexity and token accuracy, each with its 95% CI, over
    ``user -> {"perplexity": .., "token_accuracy": ..}``, and those values by user."""
    ppl = macro_summary({u: v["perplexity"] for u, v in per_user.items()})
    acc = macro_summary({u: v["token_accuracy"] for u, v in per_user.items()})
    return {"perplexity": ppl["mean"], "perplexity_ci95": ppl["ci95"],
            "token_accuracy": acc["mean"], "token_accuracy_ci95": acc["ci95"],
            "users": ppl["n"], "per_user": dict(per_user)}


def stats_summary(per_user: Mapping[str, TokenStats]) -> dict:
    """:func:`per_user_summary` of each user's token statistics (users in name order)."""
    return per_user_summary({u: {"perplexity": s.perplexity, "token_accuracy": s.token_accuracy}
                             for u, s in sorted(per_user.items())})


def macro_summary(per_user: Mapping[str, float]) -> dict[str, float]:
    """Mean over users with a normal-approximation 95% confidence interval."""
    values = [v for v in per_user.values() if math.isfinite(v)]
    if not values:
        return {"mean": float("nan"), "ci95": float("nan"), "n": 0}
    mean = statistics.fmean(values)
    half = 1.96 * statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return {"mean": mean, "ci95": half, "n": len(values)}
