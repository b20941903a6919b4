"""The curious server's view (simulations.audit.server_view) and the audits' broken
mechanisms (client.breaks): a correct round passes, broken ones fail, on the tiny model."""

from __future__ import annotations

import json
import math

import pytest
import torch
from flwr.app import Context, MessageType, RecordDict
from helpers import FIXED_NOISE, initial_server_state, round_message, small_config

from client import breaks
from client.client_app import train
from client.trainer import DPSettings, ReleasedOptimizer
from shared.config import ConfigError, RunConfig
from shared.data.federation import load_run_population
from shared.privacy.accounting import epsilon
from simulations.audit.breaks import BLIND_SPOTS, audit_breaks
from simulations.audit.server_view import ServerViewError, server_view_audit
from simulations.audit.stats import gaussian_dp_epsilon, score_separation
from simulations.cli import main

# A lower budget than the default: its round's epsilon (about 1.2) sits well below what
# 1,000 canaries can certify (about 4.5), so the one-run bound alone tells the breaks apart
AUDITED = dict(local_steps=1, lora_rank=8, lora_alpha=16.0, target_epsilon=2.0)
CANARIES = 1000


def _audit(tmp_path, broken: str = "", **changes):
    cfg = small_config(tmp_path, **{**AUDITED, **changes},
                       audit_only_broken_mechanism=broken)
    return server_view_audit(cfg, canaries=CANARIES, progress=lambda _: None)


def test_the_correct_mechanism_passes_below_its_accounted_epsilon(tmp_path):
    result = _audit(tmp_path)

    assert result["passed"], result["problems"]
    assert 0 < result["epsilon_lower_bound"] <= result["accounted_round_epsilon"]
    assert result["accounted_round_epsilon"] == pytest.approx(epsilon(
        [(result["accounted_noise_multiplier"], 1.0, 1)], delta=1e-5, accountant="prv"))
    assert result["included"] == pytest.approx(CANARIES / 2, abs=60)
    # one full-batch step: every included canary enters it
    assert result["canaries_sampled"] == result["included"]
    # the scores lie as far apart as the accounted Gaussian mechanism's outputs
    assert result["separation_mu"] == pytest.approx(
        1 / result["accounted_noise_multiplier"], rel=0.15)
    assert result["noise_regenerated"]["used"] is False


@pytest.mark.parametrize("broken", ["no-noise", "no-clip"])
def test_a_round_without_noise_or_clipping_fails(tmp_path, broken):
    result = _audit(tmp_path, broken)

    assert not result["passed"]
    assert result["epsilon_lower_bound"] > 4 > result["accounted_round_epsilon"]
    assert any("certifies epsilon" in p for p in result["problems"])
    assert result["failed_checks"][:2] == ["server-view (one-run bound)",
                                            "server-view (Gaussian test)"]
    assert not result["ledger_problems"]  # the ledger claims the configured mechanism


def test_under_distributed_dp_the_server_sees_the_shares_noise_summed(tmp_path):
    # three clients, each adding sigma / sqrt(2) (threshold 2): the example-weighted sum
    # carries sigma sqrt(3/2), more than the sigma every ledger accounts
    cfg = small_config(tmp_path, **AUDITED, secagg=True, distributed_dp=True,
                       clients_per_round=3, secagg_reconstruction_threshold=2,
                       dp_sample_rate=1.0)

    result = server_view_audit(cfg, canaries=CANARIES, clients=3, progress=lambda _: None)

    assert result["passed"] and result["clients_summed"] == 3
    sigma = result["accounted_noise_multiplier"]
    assert result["separation_mu"] == pytest.approx(1 / (sigma * math.sqrt(1.5)), rel=0.15)
    assert result["gaussian_epsilon_estimate"] < result["accounted_round_epsilon"]


def test_public_seeds_let_the_server_subtract_the_noise(tmp_path):
    result = _audit(tmp_path, "public-seed")

    regenerated = result["noise_regenerated"]
    assert regenerated["used"] and regenerated["correlation"] < -0.99
    # the fitted scale is the step's own: -lr / (q n)
    assert regenerated["slope"] == pytest.approx(regenerated["expected_scale"], rel=0.05)
    assert not result["passed"]


def test_an_understated_rate_fails_the_ledger_replay(tmp_path):
    result = _audit(tmp_path, "understated-rate", dp_sample_rate=0.5)

    assert not result["passed"]
    assert any("is not what this run accounts" in p for p in result["ledger_problems"])


def test_the_breaks_table_names_what_catches_each(tmp_path):
    cfg = small_config(tmp_path, **AUDITED)
    settings = [f"{k}={v}" for k, v in cfg.to_flower().items()]

    results = audit_breaks(settings, canaries=CANARIES, progress=lambda _: None,
                           variants=["correct", "noise-div-10", "user-adapter-active"])

    verdicts = {r["variant"]: r for r in results}
    assert verdicts["correct"]["passed"] and not verdicts["correct"]["caught_by"]
    assert verdicts["noise-div-10"]["caught_by"]
    # the blind spot stays one, and is reported as such
    assert "user-adapter-active" in BLIND_SPOTS
    assert verdicts["user-adapter-active"]["passed"]


def test_the_breaks_command_exits_zero_only_when_the_audits_judge_right(tmp_path, capsys):
    cfg = small_config(tmp_path, **AUDITED)
    settings = [f"{k}={v}" for k, v in cfg.to_flower().items() if k != "run-dir"]

    code = main(["audit", "breaks", "--out", str(tmp_path / "breaks"), "--canaries",
                 str(CANARIES), "--only", "correct", "--only", "no-noise", *settings])

    assert code == 0
    written = json.loads((tmp_path / "breaks" / "breaks.json").read_text())
    assert [r["variant"] for r in written] == ["correct", "no-noise"]
    assert "| no-noise" in (tmp_path / "breaks" / "breaks.md").read_text()
    # the same audit at a budget the broken round stays under would not catch it
    code = main(["audit", "server-view", "--canaries", str(CANARIES), *settings,
                 "audit-only-broken-mechanism=no-noise"])
    assert code == 1
    assert "audit FAILED: server-view" in capsys.readouterr().err


def test_too_many_canaries_for_the_adapters_is_one_clear_error(tmp_path):
    cfg = small_config(tmp_path, **AUDITED)
    with pytest.raises(ServerViewError, match="do not fit the adapters"):
        server_view_audit(cfg, canaries=10**6, progress=lambda _: None)


# -- the mechanism pieces ---------------------------------------------------------------------

def test_a_gradient_canary_is_clipped_to_the_norm_and_summed_into_the_step():
    # Arrange: one parameter, no data, no noise: the step is the clipped canary alone
    param = torch.nn.Parameter(torch.zeros(3, 2))
    optimizer = ReleasedOptimizer(torch.nn.Linear(1, 1), [param], lr=1.0,
                                  dp=DPSettings(True, 0.0, 0.5), batch_size=2.0,
                                  generator=torch.Generator().manual_seed(0),
                                  optimizer="sgd")
    rows = torch.zeros(2, 3, 2)
    rows[0, 1, 0] = 7.0  # norm 7: clipped to 0.5
    rows[1, 2, 1] = 0.2  # under the norm: kept whole
    from shared.model.lm import EncodedRecords

    empty = EncodedRecords(torch.zeros(0, 4, dtype=torch.long), torch.zeros(0, 4,
                           dtype=torch.long), torch.zeros(0, 4, dtype=torch.long))

    # Act
    optimizer.step(empty, [lambda: [rows]])

    # Assert: SGD at lr 1 moves by minus the clipped sum over the expected batch (2)
    expected = torch.zeros(3, 2)
    expected[1, 0], expected[2, 1] = -0.25, -0.1
    assert torch.allclose(param.detach(), expected, atol=1e-6)


def test_each_break_changes_only_what_it_names():
    cfg = RunConfig(model="tiny")
    dp = DPSettings(True, 0.9, 1.0)

    def acting(broken: str) -> DPSettings:
        return breaks.acting_dp(cfg.replace(audit_only_broken_mechanism=broken), dp)

    assert acting("") == dp
    assert acting("no-noise").noise_multiplier == 0 and acting("no-noise").accounted == 0.9
    assert acting("noise-div-10").noise_multiplier == pytest.approx(0.09)
    no_clip = acting("no-clip")
    assert no_clip.max_grad_norm == breaks.NO_CLIP_NORM and no_clip.accounted == 0.9
    assert no_clip.noise_multiplier * no_clip.max_grad_norm == pytest.approx(0.9)  # sigma C
    understated = cfg.replace(audit_only_broken_mechanism="understated-rate")
    assert breaks.claimed_entries(understated, [(0.9, 0.5, 1), (4.0, 1.0, 1)], 0.5) == [
        (0.9, 0.05, 1), (4.0, 1.0, 1)]
    with pytest.raises(ConfigError, match="audit-only-broken-mechanism"):
        RunConfig(audit_only_broken_mechanism="no-dp-at-all")


def test_a_real_device_refuses_a_broken_mechanism(tmp_path):
    cfg = small_config(tmp_path, audit_only_broken_mechanism="no-noise")
    user_dir = load_run_population(cfg).user_dir("u1")
    context = Context(run_id=1, node_id=1, node_config={"user-dir": str(user_dir)},
                      state=RecordDict(), run_config={})
    msg = round_message(cfg, initial_server_state(cfg), "a", MessageType.TRAIN)

    with pytest.raises(breaks.BrokenMechanismRefused, match="refused on a real device"):
        train(msg, context)  # the SuperNode answers the server with this error

    assert not (user_dir / ".fedpersona" / "ledger.json").exists()


def test_deploy_run_refuses_a_broken_mechanism(capsys):
    assert main(["deploy", "run", "audit-only-broken-mechanism=no-clip"]) == 1
    assert "refused in a deployment" in capsys.readouterr().err


def test_a_simulated_round_records_the_understated_rate_it_claims(tmp_path):
    cfg = small_config(tmp_path, **FIXED_NOISE, audit_only_broken_mechanism="understated-rate")
    msg = round_message(cfg, initial_server_state(cfg), "a", MessageType.TRAIN)
    from helpers import node_context, sim_store

    train(msg, node_context(0))

    ledger = sim_store(cfg, load_run_population(cfg).user_dir("u1")).load_ledger(
        target_epsilon=cfg.target_epsilon, target_delta=cfg.target_delta)
    # 20 records at batch 4: sampled at 0.2, recorded at 0.02
    assert {q for _, q, _ in ledger.history} == {0.02}


# -- Gaussian DP ------------------------------------------------------------------------------

def test_gaussian_dp_epsilon_is_the_exact_gaussian_mechanisms():
    for sigma in (0.7, 1.0, 2.0):
        prv = epsilon([(sigma, 1.0, 1)], delta=1e-5, accountant="prv")
        # PRV returns its upper bound: at most its error above the exact value
        assert gaussian_dp_epsilon(1 / sigma, 1e-5) == pytest.approx(prv - 0.005, abs=0.006)
    assert gaussian_dp_epsilon(0.0, 1e-5) == 0.0
    assert gaussian_dp_epsilon(math.inf, 1e-5) == math.inf


def test_score_separation_recovers_a_known_shift():
    generator = torch.Generator().manual_seed(0)
    included = torch.rand(20000, generator=generator) < 0.5
    scores = torch.randn(20000, generator=generator) * 2.0 + 1.5 * included

    mu, lower = score_separation(scores.numpy(), included.numpy())

    assert mu == pytest.approx(0.75, abs=0.04)
    n_in, n_out = int(included.sum()), int((~included).sum())
    error = math.sqrt(1 / n_in + 1 / n_out + mu ** 2 / (2 * n_out))  # about 0.015
    assert lower == pytest.approx(mu - 1.645 * error, abs=1e-3)
