"""The attacks, over a run's scores (:mod:`simulations.audit.scores`): canary exposure,
membership inference, and the one-run epsilon lower bound. No model, no I/O."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from simulations.audit.canaries import secret_space_bits
from simulations.audit.stats import (
    CHANCE_EXPOSURE,
    fitted_exposure,
    guess_inclusion,
    one_run_epsilon_lower_bound,
    rank_exposure,
    roc_auc,
    tpr_at_fpr,
)

ATTACKED_LEVELS = ("global", "global+persona")
LOW_FPRS = (0.01, 0.001)


def _candidates(scores: dict, level: str, persona: str | None) -> np.ndarray:
    key = f"global+persona:{persona}" if level == "global+persona" and persona else (
        "global" if level == "global+persona" else level)
    return np.asarray(scores["candidates"][key], dtype=float)


def canary_exposure(scores: dict) -> dict:
    """Exposure of every canary under each released level, summarised by copies
    (0 = never in any data: the null; chance is about 1.44 bits)."""
    space = secret_space_bits()
    per_canary = []
    for canary in scores["canaries"]:
        row = {k: canary[k] for k in ("id", "kind", "copies", "user", "persona")}
        for level in ATTACKED_LEVELS:
            candidates = _candidates(scores, level, canary["persona"])
            row[f"{level}/rank"] = rank_exposure(canary[level], candidates)
            row[f"{level}/fitted"] = fitted_exposure(canary[level], candidates,
                                                     space_bits=space)
        per_canary.append(row)
    groups = {}
    for copies in sorted({c["copies"] for c in per_canary}):
        rows = [c for c in per_canary if c["copies"] == copies]
        groups[str(copies)] = {"canaries": len(rows), **{
            f"{level}/{stat}": fn([r[f"{level}/{kind}"] for r in rows])
            for level in ATTACKED_LEVELS
            for kind, stat, fn in (("rank", "mean_rank_exposure", np.mean),
                                   ("rank", "max_rank_exposure", np.max),
                                   ("fitted", "mean_fitted_exposure", np.mean))}}
    n = len(next(iter(scores["candidates"].values())))
    return {"candidates": n, "max_rank_exposure": math.log2(n + 1),
            "chance_rank_exposure": CHANCE_EXPOSURE, "secret_space_bits": space,
            "by_copies": {k: {s: float(v) if not isinstance(v, int) else v
                              for s, v in g.items()} for k, g in groups.items()},
            "per_canary": per_canary}


def attack_scores(records: Sequence[dict], level: str, attack: str) -> np.ndarray:
    """Higher = more likely a member. ``loss``: minus the loss under the released level;
    ``reference``: how much the release lowered the loss against the base model."""
    losses = np.asarray([r[level] for r in records], dtype=float)
    if attack == "loss":
        return -losses
    return np.asarray([r["base"] for r in records], dtype=float) - losses


def membership_inference(scores: dict) -> dict:
    members = [r for r in scores["records"] if r["member"]]
    others = [r for r in scores["records"] if not r["member"]]
    result = {"members": len(members), "non_members": len(others), "attacks": {}}
    for level in ATTACKED_LEVELS:
        for attack in ("loss", "reference"):
            m, o = attack_scores(members, level, attack), attack_scores(others, level, attack)
            result["attacks"][f"{attack}/{level}"] = {
                "auc": roc_auc(m, o),
                **{f"tpr@{fpr:g}fpr": tpr_at_fpr(m, o, fpr) for fpr in LOW_FPRS}}
    return result


def one_run_examples(scores: dict, level: str = "global+persona") -> tuple[np.ndarray,
                                                                             np.ndarray]:
    """Scores and inclusion bits of every Bernoulli(1/2) example: one-run canaries
    (calibrated against the candidates under the same adapters) and natural records."""
    values, included = [], []
    for canary in scores["canaries"]:
        if canary["kind"] != "one-run":
            continue
        shift = (_candidates(scores, "base", None)
                 - _candidates(scores, level, canary["persona"]))
        values.append(canary["base"] - canary[level] - float(np.median(shift)))
        included.append(canary["copies"] > 0)
    records = scores["records"]
    values += list(attack_scores(records, level, "reference"))
    included += [bool(r["member"]) for r in records]
    return np.asarray(values), np.asarray(included)


def best_one_run_bound(scores: np.ndarray, included: np.ndarray, guess_counts: Sequence[int],
                       *, delta: float, confidence: float) -> tuple[float, list[dict]]:
    """Steinke et al.'s bound guessing the ``k`` highest scores "in" and the ``k`` lowest
    "out", for each ``k`` of ``guess_counts``, each at a Bonferroni-corrected confidence;
    the best bound, and every trial."""
    per_k_confidence = 1 - (1 - confidence) / len(guess_counts)
    trials = []
    for k in guess_counts:
        guesses = guess_inclusion(scores, included, k_plus=k, k_minus=k)
        bound = one_run_epsilon_lower_bound(scores.size, guesses.guesses, guesses.correct,
                                            delta=delta, confidence=per_k_confidence)
        trials.append({"k_plus": k, "k_minus": k, "guesses": guesses.guesses,
                       "correct": guesses.correct, "epsilon_lower_bound": bound})
    return max(t["epsilon_lower_bound"] for t in trials), trials


def one_run_audit(scores: dict, *, accounted_epsilon: float, delta: float,
                  confidence: float = 0.95, level: str = "global+persona",
                  guess_counts: Sequence[int] = (5, 10, 20, 50, 100, 200, 500)) -> dict:
    """Steinke et al.'s audit over all Bernoulli examples; the best bound over a fixed
    set of guess counts, each tested at a Bonferroni-corrected confidence."""
    values, included = one_run_examples(scores, level)
    m = values.size
    ks = [k for k in guess_counts if 2 * k <= m] or [max(m // 2, 1)]
    bound, trials = best_one_run_bound(values, included, ks, delta=delta,
                                       confidence=confidence)
    return {"examples": m, "included": int(included.sum()), "level": level,
            "confidence": confidence, "delta": delta, "trials": trials,
            "epsilon_lower_bound": bound, "accounted_epsilon": accounted_epsilon,
            "consistent": bound <= accounted_epsilon}
