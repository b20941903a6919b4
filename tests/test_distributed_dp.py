"""Distributed DP under SecAgg+ (client.budget, client.mods.secagg): each client adds a share
of the noise, the sum the server unmasks carries the full noise multiplier the ledgers
account, and the ledger audit passes on a real distributed-DP simulation."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import RecordDict

from client.budget import noise_share, round_mechanisms, slot_noise_std
from client.mods.secagg import secagg_input
from client.trainer import DPSettings, ReleasedOptimizer
from shared.config import ConfigError, RunConfig
from shared.model.adapters import RELEASED_LEVELS, activate
from shared.privacy.accounting import PrivacyLedger
from shared.privacy.secagg import unpack
from shared.protocol.records import state_to_record
from shared.protocol.wire import KEY_GLOBAL, KEY_PERSONA
from tests.helpers import small_config, tiny_peft

DISTRIBUTED = dict(dp=True, secagg=True, distributed_dp=True, clients_per_round=5,
                   secagg_reconstruction_threshold=4, local_steps=1, local_optimizer="sgd",
                   dp_sample_rate=1.0)


@pytest.mark.parametrize(("change", "missing"), [
    ({"local_steps": 2}, "local-steps = 1"),
    ({"local_optimizer": "adam"}, "local-optimizer = sgd"),
    ({"dp_sample_rate": 0.0}, "dp-sample-rate > 0"),
    ({"secagg_reconstruction_threshold": 0}, "secagg-reconstruction-threshold set"),
    ({"max_update_norm": 0.5}, "max-update-norm = 0"),
    ({"secagg": False}, "distributed-dp needs secagg = true"),
])
def test_distributed_dp_refuses_settings_that_break_the_pooled_step(change, missing):
    with pytest.raises(ConfigError, match=missing):
        RunConfig(**{**DISTRIBUTED, **change})


def test_each_client_adds_a_share_and_the_ledger_accounts_the_whole():
    # Arrange
    cfg = RunConfig(**DISTRIBUTED, noise_multiplier=1.2, planned_rounds=0,
                    loss_noise_multiplier=0.0)
    ledger = PrivacyLedger(target_epsilon=8.0, target_delta=1e-5)

    # Act
    budget = round_mechanisms(cfg, ledger, 1.0, private_choice=False)

    # Assert: sigma / sqrt(t) added, sigma accounted (with the loss release, same sigma)
    assert budget.dp.noise_multiplier == pytest.approx(1.2 / 2)
    assert budget.noise_multiplier == 1.2
    assert budget.entries == [(1.2, 1.0, 2)]
    assert noise_share(cfg.replace(distributed_dp=False, secagg=False), 1.2) == 1.2


def test_the_shares_of_t_clients_sum_to_the_full_noise_on_the_weighted_sum():
    # Arrange: t clients, each one noise-only SGD step (lr 1) at its share, with n_i
    # records; SecAgg+ weighs each change by n_i, so the sum's noise is q^-1 * N(0, s^2 C^2)
    cfg = RunConfig(**DISTRIBUTED, noise_multiplier=1.5, max_grad_norm=0.7, learning_rate=1.0)
    t = cfg.secagg_reconstruction_threshold
    records = [10, 20, 30, 40]
    total = None
    for client, n in enumerate(records[:t]):
        model = tiny_peft()
        params = activate(model, RELEASED_LEVELS, train=RELEASED_LEVELS)
        before = torch.cat([p.detach().flatten().clone() for p in params])
        share = DPSettings(True, noise_share(cfg, cfg.noise_multiplier), cfg.max_grad_norm)
        optimizer = ReleasedOptimizer(model, params, lr=1.0, dp=share,
                                      batch_size=cfg.dp_sample_rate * n, optimizer="sgd",
                                      generator=torch.Generator().manual_seed(100 + client))
        optimizer.step(_empty_batch())
        optimizer.close()
        change = torch.cat([p.detach().flatten() for p in params]) - before
        total = n * change if total is None else total + n * change

    # Assert: std of the weighted sum = sigma * C / q, within 8% (3 standard errors of a
    # std over 768 coordinates; the seeds are fixed). One share alone would be half of it.
    assert total.numel() == 768
    assert float(total.std()) == pytest.approx(1.5 * 0.7 / 1.0, rel=0.08)


def test_slot_noise_sums_over_non_members_to_the_full_noise(tmp_path):
    # Arrange: t clients that trained slot 1 only; slot 0 gets their shares
    # (the step at its full size: the shrink above lr-noise-reference is test_budget's)
    cfg = small_config(tmp_path, **{**DISTRIBUTED, "clients_per_round": 5}, noise_multiplier=2.0,
                       learning_rate=0.5, secagg_clipping_range=4.0, secagg_max_weight=64,
                       lr_noise_reference=0.0)
    shapes = {"b.weight": (60, 50)}
    zeros = {k: torch.zeros(s) for k, s in shapes.items()}
    sent = RecordDict({KEY_GLOBAL: state_to_record(zeros), KEY_PERSONA: state_to_record(zeros)})
    reply = RecordDict({KEY_GLOBAL: state_to_record(zeros), KEY_PERSONA: state_to_record(zeros)})
    total, per_client = 0.0, []
    for client, n in enumerate([12, 24, 36, 48]):
        metrics = {"num-examples": n, "persona-index": 1, "declined": 0, "noise-multiplier": 2.0}

        vector, weight = secagg_input(sent, reply, metrics, cfg, num_slots=3,
                                      noise=np.random.default_rng(client))

        global_part, slots = unpack(vector, shapes, 3)
        assert (global_part["b.weight"] == 0).all() and (slots[1]["b.weight"] == 0).all()
        per_client.append(float(slots[0]["b.weight"].std()))
        total = total + weight * slots[0]["b.weight"].astype(np.float64)

    # Assert: each client's own std is lr s C / (q n); the weighted sum's is lr sigma C / q
    for n, got in zip([12, 24, 36, 48], per_client):
        assert got == pytest.approx(slot_noise_std(cfg, 2.0, n), rel=0.05)
        assert slot_noise_std(cfg, 2.0, n) == pytest.approx(0.5 * 1.0 * 1.0 / n)
    assert float(np.std(total)) == pytest.approx(0.5 * 2.0 * 1.0 / 1.0, rel=0.03)


def test_slot_noise_that_the_quantizer_would_clip_is_refused(tmp_path):
    cfg = small_config(tmp_path, **DISTRIBUTED, noise_multiplier=2.0, learning_rate=0.5,
                       secagg_clipping_range=0.5, secagg_max_weight=64, lr_noise_reference=0.0)
    zeros = {"b.weight": torch.zeros(2, 2)}
    content = RecordDict({KEY_GLOBAL: state_to_record(zeros)})
    metrics = {"num-examples": 12, "declined": 0, "noise-multiplier": 2.0}
    with pytest.raises(ValueError, match="beyond secagg-clipping-range 0.5"):
        secagg_input(content, content, metrics, cfg, num_slots=2,
                     noise=np.random.default_rng(0))


@pytest.mark.integration
def test_a_distributed_dp_simulation_passes_the_ledger_audit(tmp_path):
    from simulations.audit.command import ledger_check
    from simulations.run.simulate import simulate

    cfg = small_config(tmp_path, **{**DISTRIBUTED, "clients_per_round": 3,
                                    "secagg_reconstruction_threshold": 2},
                       num_rounds=2, target_epsilon=50.0, secagg_max_weight=32,
                       learning_rate=0.5, secagg_clipping_range=2.0)

    report = simulate(cfg, final_evaluation=False)
    audit = ledger_check(Path(cfg.run_dir))

    assert [r["secure_aggregation"]["summed"] for r in report["rounds"]] == [3, 3]
    assert audit["passed"], audit["problems"]
    for finding in audit["per_user"]:  # the full sigma accounted, never the share
        assert finding["rounds"] == 2
    assert all(math.isfinite(e) for e in report["privacy"]["epsilon_per_user"].values())


def _empty_batch():
    from shared.model.lm import EncodedRecords

    empty = torch.zeros((0, 4), dtype=torch.long)
    return EncodedRecords(empty, empty, empty)
