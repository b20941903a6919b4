"""The server's aggregation, pure: one protocol over changes.

A round, for each level (``"global"``; ``"persona/<p>"`` over p's members)::

    released adapters --client_change--> changes from what was sent (float64)
        --> one mean change per level, by one of:
              mean_changes      example-weighted mean (the inner sum over the weights)
              robust_changes    each change clipped, then the mean or the trimmed mean
              private_changes   each change clipped, summed, Gaussian noise, / expected m
              (SecAgg+: Flower's protocol computes the weighted sum; server.secagg)
        --step_levels--> sent + lr * mean change   (or FedAdam's step)

The aggregates wrap the same inner sum (:func:`~server.aggregation.mean.weighted_sum`),
as TFF's DP factories wrap its summing step; state goes in and comes out (FedAdam's
moments; the ledger counts the levels a private round released). Tensors and numbers
only: no Flower, no files.
"""

from server.aggregation.apply import FedAdamState, apply_change, fedadam_step, step_levels
from server.aggregation.central_dp import (
    CentralLedger,
    LevelPlan,
    noise_std,
    plan_levels,
    private_changes,
    private_mean_change,
    secret_generator,
)
from server.aggregation.clip import clip_update, l2_norm
from server.aggregation.mean import (
    GLOBAL,
    PERSONA_PREFIX,
    Changes,
    ClientUpdate,
    State,
    by_level,
    change,
    client_change,
    group_by_persona,
    hierarchical_mean,
    level_name,
    mean_changes,
    weighted_mean,
    weighted_sum,
)
from server.aggregation.robust import (
    robust_changes,
    robust_hierarchical_mean,
    robust_mean,
    trimmed_count,
    trimmed_mean,
)

__all__ = [
    "GLOBAL", "PERSONA_PREFIX", "CentralLedger", "Changes", "ClientUpdate", "FedAdamState",
    "LevelPlan", "State", "apply_change", "by_level", "change", "client_change",
    "clip_update", "fedadam_step", "group_by_persona", "hierarchical_mean", "l2_norm",
    "level_name", "mean_changes", "noise_std", "plan_levels", "private_changes",
    "private_mean_change", "robust_changes", "robust_hierarchical_mean", "robust_mean",
    "secret_generator", "step_levels", "trimmed_count", "trimmed_mean", "weighted_mean",
    "weighted_sum",
]
