"""DP-SGD on the released adapters (client.trainer): Opacus does what the accounting assumes."""

from __future__ import annotations

import pytest
import torch
from helpers import RECORDS, randomize_level, tiny_peft, tokenizer
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from client.trainer import (
    GRAD_SAMPLE_MODES,
    DPSettings,
    DPTrainingError,
    ReleasedOptimizer,
    _check_grad_samples,
    _check_moved,
    poisson_batch,
    sample_rate,
    train_released,
    train_user,
    train_user_checked,
)
from shared.data.userdata import Record
from shared.model.adapters import LEVELS, RELEASED_LEVELS, activate, level_state, load_level
from shared.model.lm import encode_records, evaluate_stats, per_record_loss, split_holdout

SEQ_LEN = 32
DP = DPSettings(enabled=True, noise_multiplier=1.0, max_grad_norm=1.0)


@pytest.fixture
def model():
    return tiny_peft()


@pytest.fixture
def data():
    return encode_records(RECORDS, tokenizer(), SEQ_LEN)


def _nonzero_released(model) -> None:
    """Give the released levels non-zero B so every gradient path is exercised."""
    for seed, level in enumerate(RELEASED_LEVELS):
        state = {k: v for k, v in randomize_level(model, level, scale=0.05, seed=seed).items()
                 if "lora_B" in k}
        load_level(model, level, state)


def _per_record_grads(model, params, data) -> list[list[torch.Tensor]]:
    """Gradient of each record's loss, that record alone in its batch, on the plain model."""
    grads = []
    for i in range(len(data)):
        loss = per_record_loss(model, data.select(torch.tensor([i]))).mean()
        grads.append([g.detach() for g in torch.autograd.grad(loss, params)])
    return grads


def _clipped_mean_at_median(model, params, data) -> tuple[float, list[torch.Tensor]]:
    """``(clip, mean)``: the clip at the median per-record gradient norm (so both branches
    of clipping are taken) and the mean of the clipped per-record gradients, by hand."""
    per_record = _per_record_grads(model, params, data)
    norms = torch.stack([torch.sqrt(sum(g.double().pow(2).sum() for g in grads))
                         for grads in per_record])
    max_grad_norm = float(norms.median())
    factors = torch.clamp(max_grad_norm / norms, max=1.0)
    return max_grad_norm, [sum(float(factors[i]) * per_record[i][j].double()
                               for i in range(len(data))) / len(data)
                           for j in range(len(params))]


def _states(model) -> dict[str, dict[str, torch.Tensor]]:
    return {level: level_state(model, level) for level in LEVELS}


def _equal(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


# -- Opacus per-sample gradients and clipping ------------------------------------------------

def test_grad_sample_equals_each_records_own_gradient(model, data):
    # Arrange
    _nonzero_released(model)
    params = activate(model, RELEASED_LEVELS, train=RELEASED_LEVELS)
    expected = _per_record_grads(model, params, data)
    module = GradSampleModule(model, loss_reduction="mean")
    batch = data.select(torch.arange(len(data)))

    # Act
    per_record_loss(module, batch).mean().backward()

    # Assert: with loss_reduction="mean" Opacus rescales by the batch size itself, so
    # grad_sample[i] is the gradient of record i's own loss (not 1/B of it).
    try:
        for j, p in enumerate(params):
            assert p.grad_sample.shape == (len(data), *p.shape)
            for i in range(len(data)):
                torch.testing.assert_close(p.grad_sample[i], expected[i][j],
                                           rtol=1e-4, atol=1e-7)
    finally:
        module.to_standard_module()


def test_dp_optimizer_applies_mean_of_clipped_per_record_gradients(model, data):
    # Arrange
    _nonzero_released(model)
    params = activate(model, RELEASED_LEVELS, train=RELEASED_LEVELS)
    per_record = _per_record_grads(model, params, data)
    norms = torch.stack([torch.sqrt(sum(g.double().pow(2).sum() for g in grads))
                         for grads in per_record])  # joint norm over all trainable params
    max_grad_norm = float(norms.median())  # some records clipped, some not
    assert (norms > max_grad_norm).any() and (norms < max_grad_norm).any()
    factors = torch.clamp(max_grad_norm / norms, max=1.0)
    expected = [sum(float(factors[i]) * per_record[i][j].double() for i in range(len(data)))
                / len(data) for j in range(len(params))]
    before = [p.detach().clone() for p in params]
    module = GradSampleModule(model, loss_reduction="mean")
    optimizer = DPOptimizer(torch.optim.SGD(params, lr=1.0), noise_multiplier=0.0,
                            max_grad_norm=max_grad_norm, expected_batch_size=len(data))

    # Act
    try:
        per_record_loss(module, data.select(torch.arange(len(data)))).mean().backward()
        optimizer.step()
    finally:
        optimizer.zero_grad()
        module.to_standard_module()

    # Assert: SGD with lr=1 moved each parameter by minus the clipped mean
    for p, p0, g in zip(params, before, expected):
        torch.testing.assert_close((p0 - p.detach()).double(), g, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_both_grad_sample_modes_give_the_clipped_mean_of_per_record_gradients(model, data, mode):
    # Arrange: the clip sits at the median per-record norm, so both branches are taken
    _nonzero_released(model)
    params = activate(model, RELEASED_LEVELS, train=RELEASED_LEVELS)
    max_grad_norm, expected = _clipped_mean_at_median(model, params, data)
    dp = DPSettings(enabled=True, noise_multiplier=0.0, max_grad_norm=max_grad_norm)
    optimizer = ReleasedOptimizer(model, params, lr=1e-3, dp=dp, batch_size=len(data),
                                  generator=torch.Generator().manual_seed(0),
                                  grad_sample_mode=mode)

    # Act
    try:
        optimizer.step(data.select(torch.arange(len(data))))
        applied = [p.grad.detach().double().clone() for p in params]
    finally:
        optimizer.close()

    # Assert: the gradient the optimizer applied is the clipped per-record mean
    for got, want in zip(applied, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-8)
    assert all(getattr(p, "grad_sample", None) is None for p in params)  # unwrapped


def test_unknown_grad_sample_mode_is_refused(model):
    params = activate(model, RELEASED_LEVELS, train=RELEASED_LEVELS)
    with pytest.raises(ValueError, match="grad_sample_mode"):
        ReleasedOptimizer(model, params, lr=0.1, dp=DP, batch_size=2,
                          generator=torch.Generator(), grad_sample_mode="functorch")


def test_wrapping_before_trainable_set_is_fixed_is_caught(model, data):
    # Arrange: opacus#820 — wrap first, choose the trainable set after
    activate(model, RELEASED_LEVELS)  # nothing trainable yet
    module = GradSampleModule(model, loss_reduction="mean")
    params = activate(model, RELEASED_LEVELS, train=RELEASED_LEVELS)

    # Act
    try:
        per_record_loss(module, data.select(torch.arange(len(data)))).mean().backward()

        # Assert: plain gradients flowed, per-sample ones did not, and the guard refuses
        assert all(p.grad is not None for p in params)
        assert all(getattr(p, "grad_sample", None) is None for p in params)
        with pytest.raises(DPTrainingError, match="opacus#820"):
            _check_grad_samples(params, len(data))
    finally:
        module.to_standard_module()


def test_check_grad_samples_rejects_wrong_batch_dimension(model):
    # Arrange
    params = activate(model, RELEASED_LEVELS, train=RELEASED_LEVELS)
    for p in params:
        p.grad_sample = torch.zeros(3, *p.shape)

    # Act / Assert
    _check_grad_samples(params, 3)
    with pytest.raises(DPTrainingError):
        _check_grad_samples(params, 4)


def test_check_moved_raises_when_nothing_changed(model):
    # Arrange
    before = level_state(model, "global", scheme="ffa")
    moved = {k: v.clone() for k, v in before.items()}
    first = next(iter(moved))
    moved[first] = moved[first] + 1e-3

    # Act / Assert
    with pytest.raises(DPTrainingError, match="global adapter did not change"):
        _check_moved(before, {k: v.clone() for k, v in before.items()}, "global")
    _check_moved(before, moved, "global")  # one tensor moved is enough


# -- train_released / train_user ---------------------------------------------------------------

def test_train_released_moves_released_b_only_and_leaves_user_level(model, data):
    # Arrange
    load_level(model, "user", randomize_level(model, "user", scale=0.1, seed=7))
    before = _states(model)

    # Act
    result = train_released(model, data, steps=3, batch_size=2, lr=0.01, dp=DP, scheme="ffa",
                            generator=torch.Generator().manual_seed(0))

    # Assert
    after = _states(model)
    for level in RELEASED_LEVELS:
        b_keys = [k for k in before[level] if "lora_B" in k]
        a_keys = [k for k in before[level] if "lora_A" in k]
        assert all(not torch.equal(before[level][k], after[level][k]) for k in b_keys)
        assert all(torch.equal(before[level][k], after[level][k]) for k in a_keys)  # FFA: A frozen
    assert _equal(before["user"], after["user"])
    assert result.accountant_entry == (1.0, 0.5, 3)
    assert result.steps == 3 and result.sample_rate == 0.5
    assert all(not hasattr(p, "grad_sample") or p.grad_sample is None
               for p in model.parameters())  # the Opacus wrapper is gone


def test_released_training_ignores_the_user_adapter(data):
    # Arrange: two identical models, one with a large user adapter loaded
    plain, loaded = tiny_peft(), tiny_peft()
    big_user = randomize_level(loaded, "user", scale=5.0, seed=3)
    load_level(loaded, "user", big_user)
    activate(loaded, LEVELS)
    probe = data.select(torch.arange(len(data)))
    with torch.no_grad():  # the test has teeth: once active, this user adapter changes outputs
        assert not torch.allclose(per_record_loss(plain, probe), per_record_loss(loaded, probe))

    # Act
    for model in (plain, loaded):
        train_released(model, data, steps=3, batch_size=2, lr=0.01, dp=DP, scheme="ffa",
                       generator=torch.Generator().manual_seed(11))

    # Assert
    for level in RELEASED_LEVELS:
        assert _equal(level_state(plain, level), level_state(loaded, level))
    assert _equal(level_state(loaded, "user"), big_user)


def test_train_user_changes_only_the_user_level(model, data):
    # Arrange
    _nonzero_released(model)
    before = _states(model)

    # Act
    loss = train_user(model, data, steps=2, batch_size=2, lr=0.01, scheme="ffa",
                      generator=torch.Generator().manual_seed(0))

    # Assert
    after = _states(model)
    assert loss == loss  # not NaN
    for level in RELEASED_LEVELS:
        assert _equal(before[level], after[level])
    changed = [k for k in before["user"] if not torch.equal(before["user"][k], after["user"][k])]
    assert any("lora_B" in k for k in changed)
    assert model.base_model.active_adapters == list(RELEASED_LEVELS)  # user inactive again


def test_train_user_with_zero_steps_is_a_no_op(model, data):
    before = _states(model)

    loss = train_user(model, data, steps=0, batch_size=2, lr=0.01, scheme="ffa",
                      generator=torch.Generator().manual_seed(0))

    assert loss != loss  # NaN
    assert all(_equal(before[level], state) for level, state in _states(model).items())


# -- the user adapter's on-device holdout check ------------------------------------------------

@pytest.mark.parametrize(("records", "fraction", "held"),
                         [(24, 0.2, 5), (10, 0.2, 2), (2, 0.01, 1), (2, 0.9, 1), (1, 0.5, 0),
                          (24, 0.0, 0)])
def test_split_holdout_keeps_the_last_records_apart(records, fraction, held):
    data = encode_records([Record(f"line {i}") for i in range(records)], tokenizer(), SEQ_LEN)

    fit, holdout = split_holdout(data, fraction)

    assert len(fit) == records - held
    if held == 0:
        assert holdout is None and fit is data
        return
    assert len(holdout) == held
    width = holdout.input_ids.shape[1]  # rows are trimmed to the longest selected one
    assert torch.equal(holdout.input_ids, data.input_ids[records - held:, :width])
    assert torch.equal(fit.input_ids, data.input_ids[:records - held, :fit.input_ids.shape[1]])


def _user_round(model, data, lr):
    return train_user_checked(model, data, holdout_fraction=0.25, steps=4, batch_size=4, lr=lr,
                              scheme="ffa", generator=torch.Generator().manual_seed(0))


def _user_loss(model, records) -> float:
    activate(model, LEVELS)
    stats = evaluate_stats(model, records)
    activate(model, RELEASED_LEVELS)
    return stats.nll_sum / stats.tokens


def test_a_user_adapter_that_helps_on_held_out_records_is_kept(model):
    # Arrange: the held-out lines say what the training lines say
    data = encode_records([Record("to be or not to be")] * 8, tokenizer(), SEQ_LEN)
    _nonzero_released(model)
    before = _states(model)

    # Act
    outcome = _user_round(model, data, lr=0.01)

    # Assert
    assert outcome.kept and outcome.checked
    assert outcome.holdout_after < outcome.holdout_before
    assert outcome.holdout_after == pytest.approx(_user_loss(model, data.select(
        torch.arange(6, 8))), rel=1e-6)
    assert not _equal(before["user"], level_state(model, "user"))
    assert model.base_model.active_adapters == list(RELEASED_LEVELS)


def test_a_user_adapter_that_hurts_on_held_out_records_is_discarded(model):
    # Arrange: the previous adapter learnt the user's last lines; this round's first
    # lines pull the new one elsewhere
    last_lines = [Record("xyz abc def qqq")] * 2
    train_user(model, encode_records(last_lines * 2, tokenizer(), SEQ_LEN), steps=20,
               batch_size=4, lr=0.02, scheme="ffa", generator=torch.Generator().manual_seed(0))
    data = encode_records([Record("to be or not to be")] * 6 + last_lines, tokenizer(), SEQ_LEN)
    before = _states(model)

    # Act
    outcome = _user_round(model, data, lr=0.05)

    # Assert: the previous adapter is back, bit for bit
    assert outcome.checked and not outcome.kept
    assert outcome.holdout_after > outcome.holdout_before
    assert all(_equal(before[level], state) for level, state in _states(model).items())
    assert outcome.holdout_before == pytest.approx(_user_loss(model, data.select(
        torch.arange(6, 8))), rel=1e-6)
    assert model.base_model.active_adapters == list(RELEASED_LEVELS)


def test_held_out_records_with_nothing_to_score_check_nothing(model):
    # Arrange: the last records' prompts fill the whole sequence, so no token is scored
    long_prompt = Record("unseen", prompt="word " * 100)
    data = encode_records([Record("to be or not to be")] * 6 + [long_prompt] * 2, tokenizer(),
                          SEQ_LEN)
    before = _states(model)

    # Act
    outcome = _user_round(model, data, lr=0.01)

    # Assert: unchecked, so kept (not discarded on a NaN loss)
    assert outcome.kept and not outcome.checked
    assert not _equal(before["user"], level_state(model, "user"))


def test_without_a_holdout_every_user_adapter_is_kept(model, data):
    before = _states(model)

    outcome = train_user_checked(model, data, holdout_fraction=0.0, steps=2, batch_size=2,
                                 lr=50.0, scheme="ffa", generator=torch.Generator().manual_seed(0))

    assert outcome.kept and not outcome.checked
    assert not _equal(before["user"], level_state(model, "user"))


# -- Poisson sampling ----------------------------------------------------------------------------

@pytest.mark.parametrize(("batch_size", "num_records", "expected"),
                         [(8, 40, 0.2), (4, 4, 1.0), (8, 3, 1.0), (8, 0, 1.0)])
def test_sample_rate(batch_size, num_records, expected):
    assert sample_rate(batch_size, num_records) == expected


def test_poisson_batch_is_reproducible_and_has_the_right_mean_size():
    # Arrange
    n, rate, draws = 40, 0.2, 4000

    # Act
    first = [poisson_batch(n, rate, torch.Generator().manual_seed(5)) for _ in range(2)]
    generator = torch.Generator().manual_seed(6)
    batches = [poisson_batch(n, rate, generator) for _ in range(draws)]

    # Assert
    assert torch.equal(first[0], first[1])
    sizes = torch.tensor([len(b) for b in batches], dtype=torch.float64)
    # mean of 4000 Binomial(40, 0.2): sd of the mean is 2.53 / sqrt(4000) = 0.04
    assert abs(float(sizes.mean()) - rate * n) < 0.25
    assert float(sizes.var()) == pytest.approx(n * rate * (1 - rate), rel=0.15)
    assert len({len(b) for b in batches}) > 5  # sizes vary: not a fixed batch
    for b in batches[:50]:
        assert b.dtype == torch.long and len(set(b.tolist())) == len(b)
        assert all(0 <= i < n for i in b.tolist())


def test_private_mean_loss_is_noisy_clipped_and_accounted():
    from client.trainer import LOSS_CLIP, private_mean_loss
    from shared.data.userdata import Record

    model = tiny_peft()
    data = encode_records([Record("to be or not to be " * k) for k in range(1, 11)],
                          tokenizer(), 32)
    dp = DPSettings(True, noise_multiplier=1.0, max_grad_norm=1.0)

    value, entry = private_mean_loss(model, data, rate=0.5, dp=dp,
                                     generator=torch.Generator().manual_seed(0))
    again, _ = private_mean_loss(model, data, rate=0.5, dp=dp,
                                 generator=torch.Generator().manual_seed(0))
    plain, none = private_mean_loss(model, data, rate=1.0, dp=DPSettings(False, 1.0, 1.0),
                                    generator=torch.Generator().manual_seed(0))

    exact = float(per_record_loss(model, data.select(torch.arange(10))).mean())
    assert entry == (1.0, 0.5, 1) and none is None
    assert value == again  # reproducible from the generator
    assert plain == pytest.approx(exact, rel=1e-5)
    # noise std on the mean is noise_multiplier * LOSS_CLIP / (q n) = 2.0: a different number
    assert value != pytest.approx(exact, abs=1e-3)
    assert abs(value - exact) < 10 * LOSS_CLIP / 5


@pytest.mark.parametrize("micro_batch", [2, 3, 64])
def test_sgd_step_over_micro_batches_is_minus_lr_times_the_clipped_mean(model, data, monkeypatch,
                                                                         micro_batch):
    # Arrange: the batch is split into micro-batches of 2 or 3 records (or taken whole),
    # the clip at the median norm; noise 0 so the step is exact
    import client.trainer as trainer

    monkeypatch.setattr(trainer, "MICRO_BATCH", micro_batch)
    _nonzero_released(model)
    params = activate(model, RELEASED_LEVELS, train=RELEASED_LEVELS)
    max_grad_norm, clipped_mean = _clipped_mean_at_median(model, params, data)
    lr = 0.5
    before = [p.detach().double().clone() for p in params]
    expected = [before[j] - lr * clipped_mean[j] for j in range(len(params))]
    dp = DPSettings(enabled=True, noise_multiplier=0.0, max_grad_norm=max_grad_norm)
    optimizer = ReleasedOptimizer(model, params, lr=lr, dp=dp, batch_size=len(data),
                                  generator=torch.Generator().manual_seed(0), optimizer="sgd")

    # Act
    try:
        optimizer.step(data.select(torch.arange(len(data))))
    finally:
        optimizer.close()

    # Assert: one SGD step along the clipped per-record mean, whatever the micro-batching
    for p, want in zip(params, expected):
        torch.testing.assert_close(p.detach().double(), want, rtol=1e-4, atol=1e-7)


def test_sgd_noise_on_one_step_has_std_sigma_c_over_the_expected_batch(model, data):
    # Arrange: an empty batch is a noise-only step; SGD with lr 1 moves B by exactly it
    params = activate(model, RELEASED_LEVELS, train=RELEASED_LEVELS)
    before = torch.cat([p.detach().flatten().clone() for p in params])
    dp = DPSettings(enabled=True, noise_multiplier=2.0, max_grad_norm=0.5)
    optimizer = ReleasedOptimizer(model, params, lr=1.0, dp=dp, batch_size=4.0,
                                  generator=torch.Generator().manual_seed(3), optimizer="sgd")

    # Act
    try:
        optimizer.step(data.select(torch.tensor([], dtype=torch.long)))
    finally:
        optimizer.close()

    # Assert: std sigma * C / (q n) = 2 * 0.5 / 4
    moved = before - torch.cat([p.detach().flatten() for p in params])
    assert moved.numel() == 768
    assert float(moved.std()) == pytest.approx(0.25, rel=0.08)  # 3 standard errors


def test_a_fixed_sample_rate_sets_every_users_poisson_rate(model, data):
    # Arrange / Act
    result = train_released(model, data, steps=2, batch_size=8, lr=0.1, dp=DP, scheme="ffa",
                            generator=torch.Generator().manual_seed(0), optimizer="sgd",
                            fixed_rate=0.5)

    # Assert: the entry the ledger gets carries the fixed rate, not batch / records
    assert result.sample_rate == 0.5 == sample_rate(8, len(data), 0.5)
    assert result.accountant_entry == (1.0, 0.5, 2)


def test_unknown_local_optimizer_is_refused(model):
    params = activate(model, RELEASED_LEVELS, train=RELEASED_LEVELS)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        ReleasedOptimizer(model, params, lr=0.1, dp=DP, batch_size=2,
                          generator=torch.Generator(), optimizer="lion")
