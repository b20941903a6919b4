"""The curious server's view: what one client's update in one round reveals.

The threat model's honest-but-curious server sees every client's update in every
round, not only the final adapters. This audit attacks one such update with
white-box gradient canaries (Steinke, Nasr and Jagielski, "Privacy Auditing with One
(1) Training Run", 2023, section 6; the "Dirac canaries" of the DP-SGD auditing
literature):

- The auditor plants ``m`` canary records whose per-record gradient it chooses:
  canary ``i`` has a gradient of ``CANARY_SCALE x max-grad-norm`` on one coordinate
  of a released adapter, its own. A correct mechanism clips it to exactly
  ``max-grad-norm``, and no two canaries share a coordinate.
- Each canary is in the device's data with probability 1/2, independently, and
  like every record it enters each DP-SGD step with the step's Poisson rate.
- The device runs its round as in a run: the budget's noise (calibrated from its
  ledger), the audits' break if one is set (:mod:`client.breaks`), its own
  generator, :func:`client.trainer.train_released`.
- The auditor sees the released update and scores canary ``i`` by how far its
  coordinate moved against its gradient. Steinke et al.'s bound over those ``m``
  Bernoulli examples is an empirical lower bound on the epsilon of that one
  release; it is compared with the epsilon the device's ledger accounts for the
  round's DP steps.

Two more things the server can try, both applied to every variant alike:

- Regenerate the noise (the ``public-seed`` break): it replays the device's draws
  from public values (run seed, round, user id, record count) and, if they match
  the update on coordinates that carry no canary, subtracts them. The test on other
  coordinates keeps the choice independent of the canaries' coins.
- Under SecAgg+ (``clients > 1``) it sees only the sum of the round's updates,
  weighted by their record counts as :mod:`server.secagg` weighs them (its
  quantization left out): the audited client's and ``clients - 1`` others', each
  with its own noise (under distributed DP, a share of it).

With SGD and one step a round (the defaults), the update is the noisy gradient sum
itself, and this is a Gaussian mechanism the audit sees whole.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from client.budget import noise_share, released_lr
from client.round import dp_generator, released_step, round_budget, round_seed
from client.trainer import poisson_batch, sample_rate
from shared.config import RunConfig
from shared.data.federation import load_run_population, training_users
from shared.data.userdata import load_user
from shared.model.adapters import RELEASED_LEVELS, load_level
from shared.model.lm import encode_records
from shared.model.runtime import get_runtime
from shared.privacy.accounting import PrivacyLedger, epsilon
from simulations.audit.attacks import best_one_run_bound
from simulations.audit.ledger import audit_ledger, settings_plan
from simulations.audit.plant import AuditSetupError
from simulations.audit.stats import gaussian_dp_epsilon, score_separation

CANARY_SCALE = 10.0  # a canary's gradient, in units of max-grad-norm: clipping must cut it
CHUNK = 32  # canary rows clipped at a time (memory: CHUNK x the adapters' size)
# coordinates without canaries, to test the regenerated noise: this many, or a quarter
HELD_OUT_COORDINATES = 2000
NOISE_MATCH = 0.5  # correlation above which the regenerated noise is taken as the device's
GUESS_FRACTIONS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5)  # of m, on each side
AUDITED_ROUND = 1


class ServerViewError(AuditSetupError):
    """The server-view audit cannot run as asked."""


@dataclass
class GradientCanaries:
    """``m`` Dirac gradient canaries over the trainable parameters, placed on the first
    step (when the parameters are known); callable as the trainer's
    :data:`client.trainer.GradientCanaries`."""

    count: int
    max_grad_norm: float
    rng: np.random.Generator
    included: np.ndarray = field(init=False)
    params: list[torch.nn.Parameter] = field(default_factory=list)
    places: list[tuple[int, int]] = field(default_factory=list)  # (parameter, flat index)
    spare: list[tuple[int, int]] = field(default_factory=list)  # held-out coordinates
    before: np.ndarray | None = None
    spare_before: np.ndarray | None = None
    sampled: int = 0  # canary rows that entered a step

    def __post_init__(self) -> None:
        self.included = self.rng.random(self.count) < 0.5

    def __call__(self, params: list[torch.nn.Parameter], rate: float
                 ) -> list[Callable[[], list[torch.Tensor]]]:
        if not self.params:
            self._place(params)
        chosen = [i for i in np.flatnonzero(self.included) if self.rng.random() < rate]
        self.sampled += len(chosen)
        return [lambda part=chosen[start:start + CHUNK]: self._rows(params, part)
                for start in range(0, len(chosen), CHUNK)]

    def _rows(self, params: list[torch.nn.Parameter], part: list[int]) -> list[torch.Tensor]:
        rows = [torch.zeros((len(part), *p.shape), dtype=p.dtype) for p in params]
        for row, canary in enumerate(part):
            which, flat = self.places[canary]
            rows[which][row].view(-1)[flat] = CANARY_SCALE * self.max_grad_norm
        return rows

    def _place(self, params: list[torch.nn.Parameter]) -> None:
        sizes = np.array([p.numel() for p in params])
        total = int(sizes.sum())
        held_out = min(HELD_OUT_COORDINATES, total // 4)
        if self.count + held_out > total:
            raise ServerViewError(f"{self.count} canaries do not fit the adapters' {total} "
                                  f"coordinates (with {held_out} held out): use --canaries "
                                  f"{total - held_out} or fewer, or a larger lora-rank")
        flat = self.rng.choice(total, self.count + held_out, replace=False)
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        which = np.searchsorted(offsets, flat, side="right") - 1
        coords = [(int(w), int(f - offsets[w])) for w, f in zip(which, flat)]
        self.params, self.places, self.spare = params, coords[:self.count], coords[self.count:]
        self.before, self.spare_before = self.read(self.places), self.read(self.spare)

    def read(self, coords: list[tuple[int, int]]) -> np.ndarray:
        flats = [p.detach().reshape(-1) for p in self.params]
        return np.array([float(flats[w][f]) for w, f in coords])


@dataclass(frozen=True)
class ClientRound:
    user_id: str
    records: int
    rate: float
    sigma: float  # accounted noise multiplier
    entries: list  # what the ledger records for the round


def server_view_audit(cfg: RunConfig, *, canaries: int = 10000, clients: int = 1,
                      audit_seed: int = 0, confidence: float = 0.95,
                      progress: Callable[[str], None] = print) -> dict:
    """One round's update of one client (or, ``clients > 1``, the sum SecAgg+ reveals),
    attacked with ``canaries`` gradient canaries; the bound against the accounted epsilon."""
    if not cfg.dp:
        raise ServerViewError("the server-view audit measures a DP round: dp = true")
    if cfg.grad_sample_mode != "hooks":
        raise ServerViewError("gradient canaries need grad-sample-mode = hooks")
    if canaries < 20:
        raise ServerViewError(f"--canaries {canaries}: at least 20")
    started = time.monotonic()
    runtime = get_runtime(cfg)
    population = load_run_population(cfg)
    users = training_users(population, cfg)
    if clients < 1 or clients > len(users):
        raise ServerViewError(f"--clients {clients}: the population has {len(users)} "
                              "training users")
    rng = np.random.default_rng(audit_seed)
    plan = GradientCanaries(canaries, cfg.max_grad_norm, rng)
    progress(f"server view: {canaries} gradient canaries in {users[0].user_id}'s round "
             f"{AUDITED_ROUND}" + (f", summed with {clients - 1} other clients" if clients > 1
                                   else "") + (f"; broken: {cfg.audit_only_broken_mechanism}"
                                               if cfg.audit_only_broken_mechanism else ""))
    total_update: np.ndarray | None = None
    spare_update: np.ndarray | None = None
    audited: ClientRound | None = None
    for index, entry in enumerate(users[:clients]):
        user = load_user(population.user_dir(entry.user_id))
        data = encode_records(user.train, runtime.tokenizer, cfg.seq_len)
        for level in ("global", "persona", "user"):
            load_level(runtime.model, level, runtime.initial[level])
        one = _client_round(cfg, runtime.model, data, entry.user_id,
                            plan if index == 0 else None, rng)
        if index == 0:
            audited = one
        after, spare_after = plan.read(plan.places), plan.read(plan.spare)
        assert plan.before is not None and plan.spare_before is not None
        # SecAgg+ reveals the example-weighted sum (server.secagg); one update alone
        # is the same up to scale
        update = one.records * (after - plan.before)
        spare = one.records * (spare_after - plan.spare_before)
        total_update = update if total_update is None else total_update + update
        spare_update = spare if spare_update is None else spare_update + spare
    assert audited is not None and total_update is not None and spare_update is not None
    scores = -total_update  # the step moves a coordinate against its gradient
    denoise = _regenerated_noise(cfg, audited, plan, spare_update) if clients == 1 else None
    if denoise is not None and denoise["used"]:
        scores = scores + denoise["slope"] * denoise["canary_noise"]
    bound, trials = _one_run_bound(scores, plan.included, delta=cfg.target_delta,
                                   confidence=confidence)
    mu, mu_low = score_separation(scores, plan.included, confidence=confidence)
    step_entries = [e for e in audited.entries if e[0] == audited.sigma]
    accounted = epsilon(step_entries, delta=cfg.target_delta, accountant=cfg.accountant)
    ledger = _round_ledger(cfg, audited)
    problems = list(ledger.problems)
    if bound > accounted:
        problems.append(f"one release certifies epsilon >= {bound:.3f}, above the "
                        f"{accounted:.3f} its ledger accounts for the round's DP steps")
    # One full-batch SGD step makes the update a Gaussian mechanism (the noisy clipped
    # sum, scaled), so the scores with and without a canary are two Gaussians one shift
    # apart: the separation's lower limit then bounds epsilon, at any size of it (the
    # one-run bound cannot certify much above 5 at delta 1e-5, whatever m).
    gaussian_applies = cfg.local_steps == 1 and cfg.local_optimizer == "sgd" and \
        audited.rate == 1.0
    gaussian_lower = gaussian_dp_epsilon(mu_low, cfg.target_delta)
    if gaussian_applies and gaussian_lower > accounted:
        problems.append(f"the update's scores lie {mu_low:.2f} noise units apart at least "
                        f"(Gaussian epsilon >= {gaussian_lower:.3f}), above the "
                        f"{accounted:.3f} accounted")
    failed_checks = [name for name, failed in (
        ("server-view (one-run bound)", bound > accounted),
        ("server-view (Gaussian test)", gaussian_applies and gaussian_lower > accounted),
        ("ledger", bool(ledger.problems))) if failed]
    return {
        "check": "server-view", "broken_mechanism": cfg.audit_only_broken_mechanism or None,
        "passed": not problems, "problems": problems, "failed_checks": failed_checks,
        "canaries": canaries, "included": int(plan.included.sum()),
        "canaries_sampled": plan.sampled, "clients_summed": clients,
        "audited_user": audited.user_id, "records": audited.records,
        "sample_rate": audited.rate, "accounted_noise_multiplier": audited.sigma,
        "local_steps": cfg.local_steps, "optimizer": cfg.local_optimizer,
        "epsilon_lower_bound": bound, "accounted_round_epsilon": accounted,
        "bound_over_accounted": bound / accounted if accounted > 0 else math.inf,
        "delta": cfg.target_delta, "confidence": confidence, "trials": trials,
        # how far apart the scores with and without a canary lie, in noise units, and the
        # epsilon of a Gaussian mechanism that far apart: an estimate, not a certificate
        "separation_mu": mu, "separation_mu_lower": mu_low,
        "gaussian_epsilon_estimate": gaussian_dp_epsilon(mu, cfg.target_delta),
        "gaussian_epsilon_estimate_lower": gaussian_lower, "gaussian_test": gaussian_applies,
        "noise_regenerated": None if denoise is None else {
            k: v for k, v in denoise.items() if k != "canary_noise"},
        "ledger_problems": ledger.problems, "ledger_epsilon": ledger.epsilon,
        "seconds": round(time.monotonic() - started, 1)}


def _client_round(cfg: RunConfig, model, data, user_id: str,
                  plan: GradientCanaries | None, rng: np.random.Generator) -> ClientRound:
    """The device's round-1 DP-SGD on the released levels, as :mod:`client.round` runs it
    (budget from a fresh ledger, the audits' break, the device's generator)."""
    rate = sample_rate(cfg.batch_size, len(data), cfg.dp_sample_rate)
    ledger = PrivacyLedger(target_epsilon=cfg.target_epsilon, target_delta=cfg.target_delta,
                           accountant=cfg.accountant)
    budget = round_budget(cfg, ledger, rate, False)
    if budget.entries is None:
        raise ServerViewError(f"{user_id}: the budget affords no round")
    secret = rng.bytes(32)  # the device's own secret: nobody else holds it
    generator = dp_generator(cfg, user_id, AUDITED_ROUND, secret)
    released_step(cfg, model, data, budget, generator, RELEASED_LEVELS, gradient_canaries=plan)
    return ClientRound(user_id, len(data), rate, budget.noise_multiplier, budget.entries)


def _regenerated_noise(cfg: RunConfig, client: ClientRound, plan: GradientCanaries,
                       spare_update: np.ndarray) -> dict | None:
    """The server's try at the device's noise from public values: the draws of one
    step (Poisson batch, then Opacus's noise parameter by parameter) replayed from the
    public seed. Kept if it matches the update on the held-out coordinates (fitted
    slope, correlation); needs one SGD step a round, where the update is linear in it."""
    if cfg.local_steps != 1 or cfg.local_optimizer != "sgd":
        return {"used": False, "why": "needs one SGD step a round"}
    generator = torch.Generator().manual_seed(round_seed(cfg, client.user_id, AUDITED_ROUND))
    poisson_batch(client.records, client.rate, generator)
    std = noise_share(cfg, client.sigma) * cfg.max_grad_norm
    noise = [torch.normal(0.0, std, p.shape, generator=generator).reshape(-1)
             for p in plan.params]

    def at(coords: list[tuple[int, int]]) -> np.ndarray:
        return np.array([float(noise[w][f]) for w, f in coords])

    spare_noise = at(plan.spare)
    correlation = float(np.corrcoef(spare_noise, spare_update)[0, 1]) \
        if spare_noise.std() > 0 and spare_update.std() > 0 else 0.0
    slope = float(np.dot(spare_noise, spare_update) / max(np.dot(spare_noise, spare_noise),
                                                          1e-30))
    used = bool(abs(correlation) > NOISE_MATCH)  # the update moves against the noise
    return {"used": used, "correlation": correlation, "slope": slope,
            # the update, weighted by its records, moves by -lr / q per unit of noise
            "expected_scale": -released_lr(cfg, client.sigma) / client.rate,
            "canary_noise": at(plan.places)}


def _one_run_bound(scores: np.ndarray, included: np.ndarray, *, delta: float,
                   confidence: float) -> tuple[float, list[dict]]:
    """The best one-run bound over guess counts at fixed fractions of ``m``."""
    m = scores.size
    ks = sorted({max(1, round(f * m)) for f in GUESS_FRACTIONS if 2 * round(f * m) <= m})
    return best_one_run_bound(scores, included, ks, delta=delta, confidence=confidence)


def _round_ledger(cfg: RunConfig, client: ClientRound):
    """The ledger audit of the round as the device recorded it, replayed from the run's
    settings and the rate the device really sampled at."""
    ledger = PrivacyLedger(target_epsilon=cfg.target_epsilon, target_delta=cfg.target_delta,
                           accountant=cfg.accountant)
    ledger.record(*client.entries)
    return audit_ledger(ledger.to_json(), user_id=client.user_id,
                        plan=settings_plan(cfg, client.rate))
