"""What a device spends in one training round, chosen before it trains.

One function decides the round's DP-SGD noise multiplier and its accountant
entries from the run's settings and the device's ledger, so that the device,
the ledger audit (which replays it) and nothing else agree on what a round costs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from client.trainer import DPSettings
from shared.config import RunConfig
from shared.privacy.accounting import HistoryEntry, PrivacyLedger, calibrate_noise, round_entries


@dataclass(frozen=True)
class RoundBudget:
    dp: DPSettings  # what the device's DP-SGD adds (a share of the noise under distributed DP)
    entries: list[HistoryEntry] | None  # what the ledger records; None: nothing fits, decline
    noise_multiplier: float  # the accounted one: on the released sum


def round_mechanisms(cfg: RunConfig, ledger: PrivacyLedger, rate: float,
                     private_choice: bool, federation: str = "") -> RoundBudget:
    """This round's DP-SGD settings and accountant entries. With ``planned-rounds`` the
    noise multiplier is the smallest that leaves enough of the device's budget (spent
    over every federation) for its remaining planned rounds in ``federation``
    (:func:`shared.privacy.accounting.calibrate_noise`), from public inputs only."""
    if not cfg.dp:
        return RoundBudget(DPSettings(False, cfg.noise_multiplier, cfg.max_grad_norm), [], 0.0)

    def per_round(sigma: float) -> list[HistoryEntry]:
        return round_entries(noise_multiplier=sigma, sample_rate=rate, steps=cfg.local_steps,
                             loss_noise_multiplier=loss_noise(cfg, sigma),
                             selection_noise=cfg.selection_noise if private_choice else 0.0)

    sigma = cfg.noise_multiplier
    if cfg.planned_rounds:
        sigma = calibrate_noise(ledger.history, per_round,
                                rounds_left=max(1, cfg.planned_rounds
                                                - ledger.rounds_in(federation)),
                                target_epsilon=ledger.target_epsilon, delta=ledger.target_delta,
                                accountant=ledger.accountant)
        if sigma is None:
            return RoundBudget(DPSettings(True, cfg.noise_multiplier, cfg.max_grad_norm), None,
                               cfg.noise_multiplier)
    return RoundBudget(DPSettings(True, noise_share(cfg, sigma), cfg.max_grad_norm, sigma),
                       per_round(sigma), sigma)


def noise_share(cfg: RunConfig, sigma: float) -> float:
    """The noise multiplier a client adds itself. Under distributed DP it is
    ``sigma / sqrt(t)``: SecAgg+ unmasks only sums of at least ``t`` (the reconstruction
    threshold) clients, whose independent shares add up to a variance of at least
    ``sigma^2``, so the sum the server sees carries the full ``sigma`` that every
    device's ledger accounts (Kairouz, Liu and Steinke, "The Distributed Discrete
    Gaussian Mechanism for Federated Learning with Secure Aggregation", ICML 2021).
    Otherwise every client adds all of it."""
    if cfg.distributed_dp:
        return sigma / math.sqrt(cfg.secagg_reconstruction_threshold)
    return sigma


def released_lr(cfg: RunConfig, sigma: float) -> float:
    """The step size of the released levels' noisy SGD at noise multiplier ``sigma``:
    ``learning-rate``, shrunk as ``reference / sigma`` above ``lr-noise-reference``.

    At epsilon 1 the calibrated sigma is several times that of epsilon 8, and a step
    tuned for the latter moved the adapters by noise alone (update norm 270 against
    18, train loss 9 to 11 against 5.2). With the shrink the noise a step adds stays
    that of ``sigma = reference``; the signal shrinks instead. ``sigma`` comes from
    public inputs only (:func:`round_mechanisms`), so the step reveals nothing."""
    reference = cfg.lr_noise_reference
    if reference and sigma > reference:
        return cfg.learning_rate * reference / sigma
    return cfg.learning_rate


# the train-loss release's noise is at least this many times the step's: a Gaussian
# release at k x sigma costs 1/k^2 of the step's (Renyi) privacy, so a report of the
# loss never takes more than 1/16 of what the training does
LOSS_NOISE_RATIO = 4.0


def loss_noise(cfg: RunConfig, sigma: float) -> float:
    """The train-loss release's noise multiplier: ``loss-noise-multiplier``, but never less
    than :data:`LOSS_NOISE_RATIO` x the training step's ``sigma`` (at epsilon 1 a fixed 4
    alone spent more than the budget and every device declined every round); 0 releases
    it at ``sigma`` (the old recipe: the loss took as much of the budget as the step)."""
    if not cfg.loss_noise_multiplier:
        return sigma
    return max(cfg.loss_noise_multiplier, LOSS_NOISE_RATIO * sigma)


def slot_noise_std(cfg: RunConfig, noise_multiplier: float, num_records: int) -> float:
    """Per-coordinate std of the noise a DP-SGD step of this device puts on an adapter's
    change under distributed DP: ``lr * share * C / (q n)`` (``lr`` of :func:`released_lr`).
    A client adds exactly this to every persona slot it did not train, so each slot's sum
    carries every survivor's share, as the global sum does."""
    share = noise_share(cfg, noise_multiplier)
    return (released_lr(cfg, noise_multiplier) * share * cfg.max_grad_norm
            / (cfg.dp_sample_rate * max(num_records, 1)))
