"""Local training on the device: DP-SGD on the released adapters, then the user adapter.

Privacy invariant (the order is the guarantee):
1. The released levels (global + persona) train with Opacus DP-SGD (Abadi et al.,
   "Deep Learning with Differential Privacy", 2016): Poisson sampling at rate
   ``q`` (``batch_size / n``, or a fixed ``dp-sample-rate``), per-record clipping to
   ``max_grad_norm``, Gaussian noise ``noise_multiplier * max_grad_norm``. The user
   adapter is *inactive* during these steps, so nothing non-private about the data
   enters them. The noisy gradient feeds plain SGD or Adam: with SGD the noise of
   successive steps and of the round's clients averages out in the server's mean;
   Adam divides every coordinate by its own noisy scale, so under heavy noise it
   moves each coordinate by about the learning rate whatever the signal.
2. The step is written to the privacy ledger before anything may leave.
3. Only then does the user adapter train (without DP: it never leaves the device)
   on top of the frozen released levels. It is kept only if it does not raise the
   user's loss on held-out records of their own (:func:`train_user_checked`); the
   check, like the adapter, stays on the device.

Opacus registers its per-sample hooks on the modules whose parameters require
grad at wrapping time. Wrapping before the trainable set is chosen (or after
the model moved device) leaves hooks missing and Opacus then steps silently
without clipping or noise (opacus#820). So: place the model, attach adapters,
choose the trainable set, then wrap; and check that every trainable parameter
got a per-sample gradient and that the adapters actually moved.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.utils.fast_gradient_clipping_utils import (
    DPOptimizerFastGradientClipping,
    DPTensorFastGradientClipping,
    GradSampleModuleFastGradientClipping,
)

from shared.config import GRAD_SAMPLE_MODES, LOCAL_OPTIMIZERS
from shared.model.adapters import LEVELS, RELEASED_LEVELS, activate, level_state, load_level
from shared.model.lm import (
    IGNORE_INDEX,
    EncodedRecords,
    evaluate_stats,
    per_record_loss,
    split_holdout,
)
from shared.privacy.accounting import HistoryEntry


class DPTrainingError(RuntimeError):
    """DP-SGD did not do what the accounting assumes (missing hooks, frozen adapters)."""


@dataclass(frozen=True)
class DPSettings:
    enabled: bool
    noise_multiplier: float  # what this device adds
    max_grad_norm: float
    # the multiplier the released sum carries, when the device adds only a share of it
    # (distributed DP); None: the one it adds
    accounted_noise_multiplier: float | None = None

    @property
    def accounted(self) -> float:
        """The noise multiplier the accountant charges for this mechanism."""
        if self.accounted_noise_multiplier is None:
            return self.noise_multiplier
        return self.accounted_noise_multiplier


@dataclass(frozen=True)
class LocalResult:
    train_loss: float  # mean per-record loss over the DP steps (before each step)
    steps: int
    sample_rate: float
    accountant_entry: HistoryEntry | None  # what these steps cost; None without DP


# (trainable parameters, Poisson rate) -> one step's extra per-record gradient rows, as
# chunks made on demand (memory): each chunk one tensor per parameter, records first
GradientCanaries = Callable[[list[torch.nn.Parameter], float],
                            Sequence[Callable[[], list[torch.Tensor]]]]


def sample_rate(batch_size: int, num_records: int, fixed_rate: float = 0.0) -> float:
    """The Poisson rate of the DP-SGD batches: ``fixed_rate`` when set (every user then
    pays the same epsilon per step), else ``batch_size / num_records`` (capped at 1)."""
    if fixed_rate:
        return fixed_rate
    return min(1.0, batch_size / max(num_records, 1))


def poisson_batch(num_records: int, rate: float, generator: torch.Generator) -> torch.Tensor:
    """Indices of a Poisson-sampled batch: each record independently with probability ``rate``."""
    return torch.nonzero(torch.rand(num_records, generator=generator) < rate).flatten()


MICRO_BATCH = 16  # records per forward/backward pass within one (possibly large) step


class ReleasedOptimizer:
    """One optimizer step at a time on the released adapters: Opacus DP-SGD or plain Adam.

    ``grad_sample_mode="hooks"`` materialises every record's gradient of the
    trainable (LoRA) parameters, then clips and sums them (Abadi et al., 2016).
    ``"ghost"`` is ghost clipping (Li et al., "Large Language Models Can Be
    Strong Differentially Private Learners", ICLR 2022; Opacus's fast gradient
    clipping): per-record gradient *norms* from activations and backprops, then a
    second backward pass on the loss reweighted by the clipping factors. Both
    give the same clipped sum (a test checks it against a per-record loop); which
    is faster depends on the model (``fedpersona bench dp`` measures it).

    The model must already be placed, its adapters attached and its trainable set
    chosen (opacus#820): wrapping registers hooks on what requires grad now.
    """

    def __init__(self, model, params, *, lr: float, dp: DPSettings, batch_size: float,
                 generator: torch.Generator, grad_sample_mode: str = "hooks",
                 optimizer: str = "adam"):
        if grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ValueError(f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, "
                             f"got {grad_sample_mode!r}")
        if optimizer not in LOCAL_OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {LOCAL_OPTIMIZERS}, got {optimizer!r}")
        # batch_size: the expected Poisson batch q n (it divides the noisy sum), may be fractional
        self.params, self.dp, self.batch_size = params, dp, batch_size
        self.ghost = dp.enabled and grad_sample_mode == "ghost"
        self.generator = generator
        inner = (torch.optim.SGD(params, lr=lr) if optimizer == "sgd"
                 else torch.optim.Adam(params, lr=lr))
        if not dp.enabled:
            self.module, self.optimizer = model, inner
        elif self.ghost:
            self.module = GradSampleModuleFastGradientClipping(
                model, loss_reduction="mean", max_grad_norm=dp.max_grad_norm,
                use_ghost_clipping=True)
            self.optimizer = DPOptimizerFastGradientClipping(
                inner, noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.max_grad_norm,
                expected_batch_size=batch_size, loss_reduction="mean", generator=generator)
        else:
            self.module = GradSampleModule(model, loss_reduction="mean")
            self.optimizer = DPOptimizer(inner, noise_multiplier=dp.noise_multiplier,
                                         max_grad_norm=dp.max_grad_norm,
                                         expected_batch_size=batch_size, generator=generator)

    def step(self, batch: EncodedRecords,
             extra_rows: Sequence[Callable[[], list[torch.Tensor]]] = ()) -> float:
        """One step on ``batch`` (an empty DP batch is a noise-only step); its mean loss.

        A large batch is processed ``MICRO_BATCH`` records at a time (memory): with
        Opacus hooks each part's per-record gradients are clipped and summed into the
        same step (Opacus's skipped steps, as in its ``BatchMemoryManager``), and the
        noise is added once, on the whole sum. Ghost clipping takes the batch whole.

        ``extra_rows``: more per-record gradients, in chunks made on demand (one tensor
        per parameter, records first), clipped and summed into the same step like the
        batch's own (the white-box audit's gradient canaries,
        :mod:`simulations.audit.server_view`)."""
        self.optimizer.zero_grad()
        extra = extra_rows if self.dp.enabled else ()
        if extra and self.ghost:
            raise ValueError("gradient canaries need grad-sample-mode = hooks")
        if len(batch) == 0 and not extra:
            _noise_only_step(self.optimizer, self.params, self.dp, self.batch_size,
                             self.generator)
            return float("nan")
        if self.ghost:
            losses = per_record_loss(self.module, batch)  # (B,)
            loss = DPTensorFastGradientClipping(self.module, self.optimizer, losses, "mean")
            loss.backward()
            _check_per_sample(self.params, len(batch), ghost=True)
            self.optimizer.step()
            return float(loss.item())
        parts = list(torch.arange(len(batch)).split(MICRO_BATCH)) if len(batch) else []
        last = len(parts) + len(extra) - 1
        total = 0.0
        for i, index in enumerate(parts):
            part = batch.select(index)
            losses = per_record_loss(self.module, part)  # (b,)
            total += float(losses.detach().sum())
            if self.dp.enabled:
                losses.mean().backward()  # Opacus rescales each record's gradient back
                _check_per_sample(self.params, len(part), ghost=False)
                self._end_part(last=i == last)
            else:
                (losses.sum() / len(batch)).backward()  # the batch mean, accumulated
        for i, make_rows in enumerate(extra, start=len(parts)):
            for p, row in zip(self.params, make_rows(), strict=True):
                p.grad_sample = row
            self._end_part(last=i == last)
        self.optimizer.step()
        return total / len(batch) if len(batch) else float("nan")

    def _end_part(self, *, last: bool) -> None:
        """Before the step's last part: clip this part's per-record gradients and add
        them to the step's sum, without noise and without stepping (the last part's
        ``optimizer.step()`` does both, once)."""
        if not last:
            self.optimizer.signal_skip_step(do_skip=True)
            self.optimizer.step()
            self.optimizer.zero_grad()

    def close(self) -> None:
        """Remove Opacus's hooks: the model is a plain peft model again."""
        if self.dp.enabled:
            self.optimizer.zero_grad()
            self.module.to_standard_module()


def train_released(model, data: EncodedRecords, *, steps: int, batch_size: int, lr: float,
                   dp: DPSettings, scheme: str, generator: torch.Generator,
                   levels: tuple[str, ...] = RELEASED_LEVELS,
                   grad_sample_mode: str = "hooks", optimizer: str = "adam",
                   fixed_rate: float = 0.0, gradient_canaries: GradientCanaries | None = None,
                   user_adapter_active: bool = False) -> LocalResult:
    """DP-SGD on ``levels`` (global + persona) with the user adapter inactive; the model is
    unwrapped after. The local-only baseline passes ``levels=("global",)``.

    Batches are Poisson at :func:`sample_rate` (``fixed_rate``, else ``batch_size / n``);
    without DP, ``q n`` records drawn without replacement.

    Audits only: ``gradient_canaries(params, rate)`` gives each step's extra per-record
    gradients (:meth:`ReleasedOptimizer.step`); ``user_adapter_active`` keeps the user
    adapter in the forward pass, which breaks the guarantee (:mod:`client.breaks`)."""
    if "user" in levels:
        raise ValueError("the user adapter never trains with the released levels")
    active = (*levels, "user") if user_adapter_active else levels
    params = activate(model, active, train=levels, scheme=scheme)
    if not params:
        raise DPTrainingError("no trainable adapter parameters: check lora-targets")
    before = {level: level_state(model, level, scheme=scheme) for level in levels}
    rate = sample_rate(batch_size, len(data), fixed_rate)
    expected_batch = rate * len(data) if fixed_rate else batch_size
    losses = []
    model.train()
    step_optimizer = ReleasedOptimizer(model, params, lr=lr, dp=dp, batch_size=expected_batch,
                                       generator=generator, grad_sample_mode=grad_sample_mode,
                                       optimizer=optimizer)
    try:
        for _ in range(steps):
            if dp.enabled:
                index = poisson_batch(len(data), rate, generator)
            else:
                index = torch.randperm(len(data), generator=generator)[
                    :max(1, round(expected_batch))]
            extra = gradient_canaries(params, rate) if gradient_canaries and dp.enabled else ()
            loss = step_optimizer.step(data.select(index), extra)
            if len(index):
                losses.append(loss)
    finally:
        step_optimizer.close()
        model.eval()
    for level in levels:
        _check_moved(before[level], level_state(model, level, scheme=scheme), level)
    entry = (dp.accounted, rate, steps) if dp.enabled else None
    return LocalResult(train_loss=sum(losses) / len(losses) if losses else float("nan"),
                       steps=steps, sample_rate=rate, accountant_entry=entry)


LOSS_CLIP = 10.0  # nats: a record's loss is clipped to [0, LOSS_CLIP] before it is summed


@torch.no_grad()
def private_mean_loss(model, data: EncodedRecords, *, rate: float, dp: DPSettings,
                      generator: torch.Generator) -> tuple[float, HistoryEntry | None]:
    """The mean training loss, released through one more subsampled Gaussian mechanism.

    A fresh Poisson batch (rate ``q``), each record's loss clipped to
    ``[0, LOSS_CLIP]`` (sensitivity ``LOSS_CLIP``), Gaussian noise of std
    ``noise_multiplier * LOSS_CLIP`` on the sum, divided by the expected batch
    size ``q n``. That is one DP-SGD-like step for the accountant:
    ``(noise_multiplier, q, 1)``, returned for the caller's ledger.
    Without DP it is the plain mean over a batch.
    """
    activate(model, RELEASED_LEVELS)
    if not dp.enabled:
        index = torch.randperm(len(data), generator=generator)[:max(1, round(rate * len(data)))]
        return float(_record_losses(model, data.select(index)).mean()), None
    index = poisson_batch(len(data), rate, generator)
    total = float(_record_losses(model, data.select(index)).clamp(0, LOSS_CLIP).sum()) \
        if len(index) else 0.0
    noise = float(torch.normal(0.0, dp.noise_multiplier * LOSS_CLIP, (1,), generator=generator))
    return (total + noise) / (rate * len(data)), (dp.accounted, rate, 1)


def _record_losses(model, data: EncodedRecords) -> torch.Tensor:
    """``(N,)`` per-record losses, ``MICRO_BATCH`` records at a time (memory)."""
    return torch.cat([per_record_loss(model, data.select(index))
                      for index in torch.arange(len(data)).split(MICRO_BATCH)])


def train_user(model, data: EncodedRecords, *, steps: int, batch_size: int, lr: float,
               scheme: str, generator: torch.Generator) -> float:
    """Plain SGD-family training of the user adapter on top of the frozen released levels.

    Runs after the released adapters are final for this round, and its result
    stays on the device: no DP is needed, and none is claimed.
    """
    if steps == 0:
        return float("nan")
    params = activate(model, ("global", "persona", "user"), train=("user",), scheme="fedavg")
    optimizer = torch.optim.Adam(params, lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        index = torch.randperm(len(data), generator=generator)[:batch_size]
        optimizer.zero_grad()
        loss = per_record_loss(model, data.select(index)).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    activate(model, RELEASED_LEVELS)  # leave the user level inactive by default
    return sum(losses) / len(losses)


@dataclass(frozen=True)
class UserRound:
    """One round of the user adapter: its mean training loss and, when records were
    held out, their loss (nats per token) with the previous and the new adapter."""
    train_loss: float
    holdout_before: float = float("nan")
    holdout_after: float = float("nan")
    kept: bool = True
    checked: bool = False


def train_user_checked(model, data: EncodedRecords, *, holdout_fraction: float, steps: int,
                       batch_size: int, lr: float, scheme: str,
                       generator: torch.Generator) -> UserRound:
    """:func:`train_user` on all but the last ``holdout_fraction`` of ``data``; the new
    adapter replaces the previous one only if the held-out records' loss does not rise.

    Without the check one user's adapter reached a test perplexity of 799 in the
    default real-model run (the macro mean with the shared levels alone was 160); with
    it the device keeps whichever adapter fits its own unseen lines better, at the
    cost of training on fewer of them. With fewer than two records, or held-out
    records with no token to score, there is nothing to check and every adapter is kept.
    """
    fit, holdout = split_holdout(data, holdout_fraction)
    if steps == 0 or holdout is None or not bool((holdout.labels[:, 1:] != IGNORE_INDEX).any()):
        return UserRound(train_user(model, data, steps=steps, batch_size=batch_size, lr=lr,
                                    scheme=scheme, generator=generator))
    previous = level_state(model, "user")
    before = _holdout_loss(model, holdout)
    loss = train_user(model, fit, steps=steps, batch_size=batch_size, lr=lr, scheme=scheme,
                      generator=generator)
    after = _holdout_loss(model, holdout)
    kept = math.isfinite(after) and not after > before  # a NaN "before" loses to any number
    if not kept:
        load_level(model, "user", previous)
    return UserRound(loss, before, after, kept, checked=True)


def _holdout_loss(model, holdout: EncodedRecords) -> float:
    activate(model, LEVELS)
    stats = evaluate_stats(model, holdout)
    activate(model, RELEASED_LEVELS)  # as train_user leaves it
    return stats.nll_sum / stats.tokens if stats.tokens else float("nan")


def _noise_only_step(optimizer, params, dp: DPSettings, batch_size: int,
                     generator: torch.Generator) -> None:
    """An empty Poisson batch still releases a noisy step, as the accountant assumes."""
    if not dp.enabled:
        return
    std = dp.noise_multiplier * dp.max_grad_norm
    for p in params:
        noise = torch.normal(0.0, std, p.shape, generator=generator).to(p.device, p.dtype)
        p.grad = noise / batch_size
    optimizer.original_optimizer.step()


def _check_per_sample(params, batch: int, *, ghost: bool) -> None:
    if ghost:  # ghost clipping keeps per-record gradient norms, not the gradients
        for p in params:
            norms = getattr(p, "_norm_sample", None)
            if norms is None or norms.shape[0] != batch:
                raise DPTrainingError(
                    "Opacus computed no per-record gradient norm for a trainable adapter "
                    "parameter (opacus#820 hazard): refusing to take a non-private step")
        return
    _check_grad_samples(params, batch)


def _check_grad_samples(params, batch: int) -> None:
    for p in params:
        grad_sample = getattr(p, "grad_sample", None)
        if grad_sample is None or grad_sample.shape[0] != batch:
            raise DPTrainingError(
                "Opacus computed no per-sample gradient for a trainable adapter parameter: the "
                "model was wrapped before its trainable set was fixed (opacus#820); refusing to "
                "take a non-private step")


def _check_moved(before: dict, after: dict, level: str) -> None:
    if all(torch.equal(before[k], after[k]) for k in before):
        raise DPTrainingError(f"{level} adapter did not change during local training "
                              "(opacus#820 hazard): refusing to send it")
