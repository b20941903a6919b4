"""What a device serves its user with: the levels its own held-out lines favour, under
the user's most recent lines as context.

The default run measured (README, "Results of the default run") that the user's own
recent lines in the prompt beat every trained adapter, and that the federated global
adapter adds to them for every user while the persona and user levels mostly do not.
Which levels help varies by user, so the device decides, as it decides whether to keep
a new user adapter: it scores each candidate stack on the last ``holdout_fraction`` of
its training lines (the ones the user adapter was not fitted on), each after the lines
before them as context, and serves the lowest loss. Everything stays on the device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from client.serving.in_context import in_context_data
from shared.config import RunConfig
from shared.data.userdata import Record
from shared.model.lm import split_count
from shared.util.metrics import TokenStats

# in order of preference on a tie (fewer levels first): a level that does not lower the
# held-out loss is not served, down to the base model alone (at epsilon 1, before the
# noisy step shrank with sigma, the global adapter took perplexity from 205 to 711)
CANDIDATES: tuple[tuple[str, ...], ...] = (
    (), ("global",), ("global", "persona"), ("global", "persona", "user"), ("global", "user"))


@dataclass(frozen=True)
class ServedStack:
    levels: tuple[str, ...]
    held_out_loss: dict[str, float]  # "global+persona" -> mean NLL per token; {} unchecked
    held_out_records: int

    @property
    def name(self) -> str:
        return stack_name(self.levels)


def stack_name(levels: tuple[str, ...]) -> str:
    return "+".join(levels) or "base"


def candidates(*, has_persona: bool, has_user: bool) -> list[tuple[str, ...]]:
    """The stacks a device can serve with the adapters it holds."""
    return [c for c in CANDIDATES
            if (has_persona or "persona" not in c) and (has_user or "user" not in c)
            and not (has_persona and c == ("global", "user"))]


def choose_levels(losses: Mapping[tuple[str, ...], float]) -> tuple[str, ...]:
    """The stack with the lowest finite held-out loss; ties go to the earlier one in
    ``losses`` (callers list fewer levels first). The base model (``()``) when nothing is
    finite."""
    finite = [(loss, i, levels) for i, (levels, loss) in enumerate(losses.items())
              if math.isfinite(loss)]
    return min(finite)[2] if finite else ()


def serve_for_config(cfg: RunConfig, train: Sequence[Record],
                     stacks: Sequence[tuple[str, ...]], score, tokenizer, *,
                     context_tokens: int) -> ServedStack:
    """:func:`serve_from_held_out` with the run's sequence length, held-out share
    (``user-holdout-fraction``, as the user adapter's check) and record cap."""
    return serve_from_held_out(train, stacks, score, tokenizer, seq_len=cfg.seq_len,
                               context_tokens=context_tokens,
                               holdout_fraction=cfg.user_holdout_fraction,
                               max_records=cfg.eval_max_records)


def serve_from_held_out(train: Sequence[Record], stacks: Sequence[tuple[str, ...]],
                        score: Callable[[object, tuple[str, ...]], TokenStats], tokenizer, *,
                        seq_len: int, context_tokens: int, holdout_fraction: float,
                        max_records: int) -> ServedStack:
    """Choose among ``stacks`` on the device's held-out lines: the last ``holdout_fraction``
    of ``train`` (at most ``max_records`` of them, the latest), each after the earlier
    lines as context. ``score(data, levels)`` evaluates encoded records under a stack.
    Without held-out lines (fewer than two records) the last stack (the fullest, as the
    cold-start order chose it) is served unchecked."""
    held = split_count(len(train), holdout_fraction)
    if held <= 0 or len(stacks) == 1:
        return ServedStack(tuple(stacks[-1]), {}, 0)
    fit, holdout = list(train[:-held]), list(train[-held:])
    if max_records:
        holdout = holdout[-max_records:]
    data = in_context_data(holdout, fit, tokenizer, seq_len=seq_len,
                           context_tokens=context_tokens, retrieve=False)
    losses = {}
    for levels in stacks:
        stats = score(data, tuple(levels))
        losses[tuple(levels)] = stats.nll_sum / stats.tokens if stats.tokens else math.nan
    return ServedStack(choose_levels(losses), {stack_name(k): v for k, v in losses.items()},
                       len(holdout))
