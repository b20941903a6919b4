"""The released levels' step size under noise (client.budget.released_lr)."""

from __future__ import annotations

import pytest

from client.budget import released_lr, slot_noise_std
from shared.config import ConfigError, RunConfig


@pytest.mark.parametrize(("sigma", "expected"), [
    (0.0, 3.0),  # no DP
    (0.87, 3.0),  # epsilon 8's calibrated sigma: below the reference, the full step
    (1.0, 3.0),
    (2.0, 1.5),
    (6.0, 0.5),
])
def test_the_step_shrinks_as_one_over_sigma_above_the_reference(sigma, expected):
    cfg = RunConfig(learning_rate=3.0, lr_noise_reference=1.0)

    assert released_lr(cfg, sigma) == pytest.approx(expected)
    # the noise the step adds (lr x sigma) never exceeds that of the reference
    assert released_lr(cfg, sigma) * sigma <= 3.0 * 1.0 + 1e-12


def test_a_zero_reference_never_shrinks_the_step():
    assert released_lr(RunConfig(learning_rate=3.0, lr_noise_reference=0.0), 6.0) == 3.0


def test_distributed_slot_noise_uses_the_same_step():
    # a persona slot a client did not train gets the noise its trained slot got
    cfg = RunConfig(dp=True, secagg=True, distributed_dp=True, clients_per_round=5,
                    secagg_reconstruction_threshold=4, local_steps=1, dp_sample_rate=1.0,
                    learning_rate=3.0, lr_noise_reference=1.0, max_grad_norm=1.0)

    assert slot_noise_std(cfg, 4.0, 10) == pytest.approx(0.75 * (4.0 / 2) * 1.0 / 10)


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf")])
def test_a_bad_reference_is_refused(value):
    with pytest.raises(ConfigError, match="lr-noise-reference"):
        RunConfig(lr_noise_reference=value)


@pytest.mark.parametrize(("setting", "sigma", "expected"), [
    (4.0, 0.87, 4.0),  # epsilon 8: the setting
    (4.0, 2.0, 8.0),  # a small budget's large sigma: 4 x sigma, 1/16 of the step's cost
    (0.0, 2.0, 2.0),  # 0: the step's own sigma (the old recipe)
])
def test_the_loss_release_is_at_least_four_times_as_noisy_as_the_step(setting, sigma,
                                                                        expected):
    from client.budget import loss_noise

    assert loss_noise(RunConfig(loss_noise_multiplier=setting), sigma) == expected
