"""Epsilon of a ledger's history by a second, independent implementation: Google's ``dp_accounting``.

The ledger is enforced with Opacus's accountants (:mod:`shared.privacy.accounting`);
the ledger audit recomputes it here, so that an error in either library, or in how a
history is handed to one of them, shows up as a disagreement. Two accountants, each a
sound upper bound on epsilon under add/remove-one adjacency (as Opacus's):

- privacy loss distributions (Koskela, Jälkö and Honkela, "Computing Tight Differential
  Privacy Guarantees Using FFT", AISTATS 2020; Doroshenko, Ghazi, Kamath, Kumar and
  Manurangsi, "Connect the Dots", PETS 2022), built with pessimistic rounding, the
  numerical counterpart of Opacus's PRV;
- Renyi DP (Mironov, "Renyi Differential Privacy", 2017; Mironov, Talwar and Zhang,
  "Renyi Differential Privacy of the Sampled Gaussian Mechanism", 2019), on a wider
  order grid than Opacus's.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import dp_accounting
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

from shared.privacy.accounting import HistoryEntry

# The PLD's grid on the privacy loss. Pessimistic rounding keeps the result an upper
# bound at any interval; 1e-3 came within 0.001 of 1e-4 on the 17 histories measured (up to 3000
# subsampled steps) at a tenth of the time (at most 0.2 s against up to 1.2 s).
PLD_DISCRETIZATION = 1e-3
# Opacus's orders (1.1 to 10.9 by 0.1, 12 to 63) and Google's default ones are all in
# here. (At fractional orders of a subsampled Gaussian Google bounds the series Opacus
# sums exactly by its terms' absolute values: the figure can be higher than Opacus's,
# by 0.3% at noise 0.7 and rate 0.02, by 19% at noise 0.3 and rate 0.05.) The orders above 64
# let small epsilons (noise 20 and more) reach their optimal order, which Opacus's grid
# cuts off (0.066 against Opacus's 0.115 for one step at noise 50); beyond 1024 only
# epsilons under about 0.02 would gain, and every order costs time at a sample rate < 1.
RDP_ORDERS: tuple[float, ...] = (
    tuple(1 + x / 20 for x in range(1, 200))  # 1.05 to 10.95
    + tuple(range(11, 65))
    + tuple(int(64 * 2 ** (k / 4)) for k in range(1, 17)))  # 76 to 1024


def pld_epsilon(history: Sequence[HistoryEntry], *, delta: float,
                value_discretization_interval: float = PLD_DISCRETIZATION) -> float:
    """Epsilon at ``delta`` of everything in ``history`` by Google's PLD accountant, a
    pessimistic estimate (an upper bound); 0 for an empty history."""
    event = history_event(history)
    if event is None:
        return 0.0
    # its Gaussian PLDs are built with pessimistic_estimate=True (the library's default,
    # which the accountant does not expose): rounded so that epsilon is never understated
    accountant = PLDAccountant(value_discretization_interval=value_discretization_interval)
    return float(accountant.compose(event).get_epsilon(delta))


def rdp_epsilon(history: Sequence[HistoryEntry], *, delta: float,
                orders: Sequence[float] = RDP_ORDERS) -> float:
    """Epsilon at ``delta`` of everything in ``history`` by Google's RDP accountant,
    minimised over ``orders``; 0 for an empty history."""
    event = history_event(history)
    if event is None:
        return 0.0
    with _quiet_excluded_orders():
        accountant = RdpAccountant(list(orders))
        return float(accountant.compose(event).get_epsilon(delta))


def history_event(history: Sequence[HistoryEntry]) -> dp_accounting.DpEvent | None:
    """The history as one ``DpEvent``: each (noise multiplier, sample rate, steps) is
    ``steps`` Poisson-subsampled Gaussians (a plain Gaussian at rate 1: every record in
    every step); ``None`` when nothing ran.

    Entries with the same noise and rate are merged into one (composition does not
    depend on order): a fixed-noise run's hundreds of rounds then cost one RDP curve and
    one self-composition of a PLD, not hundreds."""
    steps: dict[tuple[float, float], int] = {}
    for sigma, q, n in history:
        if int(n) > 0:
            key = (float(sigma), float(q))
            steps[key] = steps.get(key, 0) + int(n)
    if not steps:
        return None
    events: list[dp_accounting.DpEvent] = []
    for (sigma, q), n in steps.items():
        gaussian = dp_accounting.GaussianDpEvent(sigma)
        one = gaussian if q >= 1 else dp_accounting.PoissonSampledDpEvent(q, gaussian)
        events.append(dp_accounting.SelfComposedDpEvent(one, n))
    return dp_accounting.ComposedDpEvent(events)


class _ExcludedOrder(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to converge" not in record.getMessage()


@contextmanager
def _quiet_excluded_orders() -> Iterator[None]:
    """At small fractional orders of a subsampled Gaussian Google's series may not
    converge; it then leaves the order out and logs it, once per order and entry. Leaving
    an order out can only raise the minimum, so the result stays an upper bound and the
    warnings would only bury the audit's output."""
    absl_logger, quiet = logging.getLogger("absl"), _ExcludedOrder()
    absl_logger.addFilter(quiet)
    try:
        yield
    finally:
        absl_logger.removeFilter(quiet)
