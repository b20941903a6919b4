"""Ways to break a device's DP on purpose, for the audits only.

An audit that passes a correct mechanism shows little unless it also fails a broken
one. Each break below changes what the device's DP-SGD step does while its ledger
still records the mechanism as configured, the way a real bug would; ``fedpersona
audit breaks`` runs each and reports which check catches it
(:mod:`simulations.audit.breaks`).

- ``no-noise``: the step adds no noise.
- ``noise-div-10``: it adds a tenth of the noise.
- ``no-clip``: records are not clipped (clipped at a norm none reaches); the noise
  stays ``sigma x max-grad-norm``.
- ``understated-rate``: the ledger records a Poisson rate ten times lower than
  the one sampled, and the noise is calibrated to it.
- ``public-seed``: the DP draws are seeded from public values (run seed, round, user
  id), the bug fixed on 2026-11-24: whoever knows them regenerates the noise.
- ``user-adapter-active``: the user adapter, trained on the data without DP, stays
  active in the DP step's forward pass.

They are set with ``audit-only-broken-mechanism``; a real device refuses them
(:func:`refuse_on_real_device`). The train-loss release and the persona choice are
left intact: each break is in the one mechanism whose output the server sees.
"""

from __future__ import annotations

from dataclasses import replace

from client.trainer import DPSettings
from shared.config import RunConfig
from shared.privacy.accounting import HistoryEntry

NO_CLIP_NORM = 1e6  # no record's gradient reaches it
UNDERSTATEMENT = 10  # how much lower the ledger's rate is than the one sampled


class BrokenMechanismRefused(ValueError):
    """A broken mechanism was asked of a real device."""


def refuse_on_real_device(cfg: RunConfig, *, simulated: bool) -> None:
    if cfg.audit_only_broken_mechanism and not simulated:
        raise BrokenMechanismRefused(
            f"audit-only-broken-mechanism={cfg.audit_only_broken_mechanism} breaks DP on "
            "purpose and is refused on a real device (use it in fedpersona audit or a "
            "simulation)")


def acting_dp(cfg: RunConfig, dp: DPSettings) -> DPSettings:
    """The noise and clipping the DP-SGD step applies; ``dp.accounted``, what the ledger
    records, is kept as it was."""
    broken = cfg.audit_only_broken_mechanism
    if not dp.enabled:
        return dp
    if broken == "no-noise":
        return replace(dp, noise_multiplier=0.0, accounted_noise_multiplier=dp.accounted)
    if broken == "noise-div-10":
        return replace(dp, noise_multiplier=dp.noise_multiplier / 10,
                       accounted_noise_multiplier=dp.accounted)
    if broken == "no-clip":  # the same noise std, sigma x C, around unclipped gradients
        return DPSettings(True, dp.noise_multiplier * dp.max_grad_norm / NO_CLIP_NORM,
                          NO_CLIP_NORM, dp.accounted)
    return dp


def claimed_rate(cfg: RunConfig, rate: float) -> float:
    """The Poisson rate the ledger records (and the noise is calibrated to)."""
    if cfg.audit_only_broken_mechanism == "understated-rate":
        return rate / UNDERSTATEMENT
    return rate


def claimed_entries(cfg: RunConfig, entries: list[HistoryEntry], rate: float
                    ) -> list[HistoryEntry]:
    """What ran, as the ledger records it: at :func:`claimed_rate` where it sampled at
    ``rate``."""
    claimed = claimed_rate(cfg, rate)
    return [(sigma, claimed if q == rate else q, steps) for sigma, q, steps in entries]


def seeds_from_public_values(cfg: RunConfig) -> bool:
    return cfg.audit_only_broken_mechanism == "public-seed"


def user_adapter_active(cfg: RunConfig) -> bool:
    return cfg.audit_only_broken_mechanism == "user-adapter-active"
