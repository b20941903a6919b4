"""Check a device's privacy ledger against an independent recomputation.

The ledger stores Opacus's accountant history, ``[(noise multiplier, sample
rate, steps), ...]``, and the epsilon it computed. The audit recomputes epsilon
from the history with fresh Opacus accountants (RDP, which the ledger uses, and
PRV as a second, tighter opinion) and with a second implementation, Google's
``dp_accounting`` (PLD and RDP, :mod:`shared.privacy.second_accountant`), and checks that

- the stored epsilon equals the recomputation with the ledger's own accountant
  (RDP or PRV), and the PRV figure is not above the RDP one beyond PRV's error;
- the two implementations agree: Opacus's PRV with Google's PLD, Opacus's RDP with
  Google's at the same orders; and the stored epsilon is not below the tightest sound
  figure of the four (the ledger would claim less than any accountant gives);
- the recomputed epsilon is within the budget;
- every history entry is a mechanism this run's settings produce (noise
  multiplier, Poisson rate, steps), so nothing was accounted at a rosier rate
  than it ran; with a calibrated noise multiplier (``planned-rounds``) the
  device's choice is replayed round by round from the ledger's own prefix;
- the ledger holds at least one round of DP steps for every round the server
  counted an update from this user, and at least the epsilon the device reported.

A device's ledger composes every federation it joined. Epsilon and the budget are
checked on all of it; the entries are checked against this run's settings only
where the ledger attributes them to this run's federation (the others' settings are
not this run's to know), and still count in the replay's spending so far.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from opacus.accountants import RDPAccountant

from client.budget import round_mechanisms
from shared.config import RunConfig
from shared.privacy import second_accountant
from shared.privacy.accounting import PRV_EPS_ERROR, HistoryEntry, PrivacyLedger, epsilon

# plan(ledger so far, private persona choice?) -> the entries the device records for a
# round, or None when it would decline (client.budget.round_mechanisms)
RoundPlan = Callable[[PrivacyLedger, bool], "list[HistoryEntry] | None"]



def settings_plan(cfg: RunConfig, rate: float, federation: str = "") -> RoundPlan:
    """The entries a device running ``cfg`` at sampling ``rate`` records for a round
    (what the replay holds its ledger to): the device's own budget rule, the persona
    choice private only where the settings make it so."""
    def plan(ledger: PrivacyLedger, private_choice: bool) -> list[HistoryEntry] | None:
        return round_mechanisms(cfg, ledger, rate, private_choice and bool(
            cfg.discovered_k and cfg.selection_noise), federation).entries
    return plan


REL_TOLERANCE = 1e-6
# Opacus's PRV upper bound lies above the true epsilon by at most twice its stated error
# and Google's pessimistic PLD by its discretisation (under 0.001 at the interval used),
# so they can differ by about 0.02. Measured: 0.009 to 0.012 apart on 17 histories (noise
# 0.3 to 50, rates 0.01 to 1, up to 3000 steps, epsilon 0.06 to 31). The 0.005 over
# 2 * 0.01 is for the PLD; a history accounted wrongly moves epsilon by far more (one
# full-batch step at noise 0.9 more: 4.96 to 7.47).
NUMERICAL_TOLERANCE = 2 * PRV_EPS_ERROR + 0.005
# Opacus's and Google's RDP are compared at the integer orders 2 to 64, where both sum the
# same finite binomial series: they agreed to 2e-14 (relative) on those 17 histories, so
# the stored figure's own tolerance fits. Their headline figures differ by design, not by
# error, so they are not compared: Google's wider grid reaches orders above 63 (0.066
# against 0.115 at noise 50), and at fractional orders of a subsampled Gaussian it bounds
# the series by its terms' absolute values (19% higher at noise 0.3, rate 0.05).
RDP_COMPARISON_ORDERS = tuple(range(2, 65))
RDP_REL_TOLERANCE = REL_TOLERANCE


@dataclass
class LedgerFinding:
    user_id: str
    stored_epsilon: float | None
    rdp_epsilon: float
    prv_epsilon: float | None
    target_epsilon: float
    delta: float
    rounds: int
    train_entries: int
    trained_rounds: int  # rounds the server counted an update from this user
    server_epsilon: float | None
    accountant: str = "rdp"
    epsilon: float = 0.0  # by the ledger's own accountant: what the budget is enforced with
    google_pld_epsilon: float | None = None  # None: Google's accountant could not compute it
    google_rdp_epsilon: float | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def recompute(history: Sequence[HistoryEntry], delta: float, accountant: str) -> float:
    """Epsilon from a fresh accountant of Opacus's (:func:`shared.privacy.accounting.epsilon`)."""
    return epsilon(history, delta=delta, accountant=accountant)


def _same(a: float, b: float, tolerance: float = REL_TOLERANCE) -> bool:
    return abs(a - b) <= tolerance * max(1.0, abs(a), abs(b))


def _opacus_rdp_at(history: Sequence[HistoryEntry], delta: float,
                   orders: Sequence[float]) -> float:
    fresh = RDPAccountant()
    fresh.history = [(float(s), float(q), int(n)) for s, q, n in history if int(n) > 0]
    with warnings.catch_warnings():  # an optimal order at the grid's end is still a bound
        warnings.simplefilter("ignore", UserWarning)
        return float(fresh.get_epsilon(delta, alphas=list(orders)))


def _google(compute: Callable[..., float], history: Sequence[HistoryEntry], delta: float,
            **kwargs) -> float | None:
    """A second opinion: whatever Google's numerics raise on, the audit goes on (with
    ``None``) and says so where no accountant of that kind could compute it."""
    try:
        return compute(history, delta=delta, **kwargs)
    except Exception:
        return None


def audit_ledger(raw: dict, *, user_id: str, train_entry: HistoryEntry | None = None,
                 extra_entries: Sequence[HistoryEntry] = (), plan: RoundPlan | None = None,
                 trained_rounds: int = 0, server_epsilon: float | None = None,
                 federation: str = "") -> LedgerFinding:
    """``raw``: the ledger's JSON. Either ``train_entry``, what one round of this run
    accounts, with ``extra_entries``, other mechanisms the run may add (the private
    persona choice); or ``plan``, which the audit replays round by round (a noise
    multiplier calibrated from the ledger itself). ``federation``: the run's name in
    the ledger's attribution."""
    history = [(float(s), float(q), int(n)) for s, q, n in raw.get("history", [])]
    sources = [str(s) for s in raw.get("sources", [federation] * len(history))]
    own = [source == federation for source in sources]
    delta = float(raw["target_delta"])
    budget = math.inf if raw.get("target_epsilon") is None else float(raw["target_epsilon"])
    accountant = raw.get("accountant", "rdp")
    rdp = recompute(history, delta, "rdp")
    try:
        prv = recompute(history, delta, "prv")
    except (ValueError, RuntimeError, OverflowError):
        prv = None  # PRV's numerical grid does not cover every (sigma, q); RDP decides
    if plan is not None:
        allowed, train_entries = _replay(history, sources, plan, federation=federation,
                                         budget=budget, delta=delta, accountant=accountant)
    else:
        if train_entry is None:
            raise ValueError("audit_ledger needs train_entry or plan")
        allowed = [not mine or any(_matches(e, a) for a in (train_entry, *extra_entries))
                   for e, mine in zip(history, own)]
        train_entries = sum(1 for entry, mine in zip(history, own)
                            if mine and _matches(entry, train_entry))
    rounds = raw.get("federation_rounds", {federation: raw.get("rounds", 0)})
    enforced = prv if accountant == "prv" else rdp
    pld = _google(second_accountant.pld_epsilon, history, delta)
    google_rdp = _google(second_accountant.rdp_epsilon, history, delta)
    finding = LedgerFinding(
        user_id=user_id, stored_epsilon=raw.get("epsilon"), rdp_epsilon=rdp, prv_epsilon=prv,
        target_epsilon=budget, delta=delta, rounds=int(rounds.get(federation, 0)),
        train_entries=train_entries, trained_rounds=trained_rounds,
        server_epsilon=server_epsilon, accountant=accountant, google_pld_epsilon=pld,
        google_rdp_epsilon=google_rdp)
    stored = raw.get("epsilon")
    if enforced is None:
        finding.problems.append(f"the ledger's {accountant} accountant cannot be recomputed")
        enforced = rdp
    elif stored is None or not _same(float(stored), enforced):
        finding.problems.append(f"stored epsilon {stored} but the history gives "
                                f"{enforced:.6f}" + (" (prv)" if accountant == "prv" else ""))
    if prv is not None and prv > rdp + 2 * PRV_EPS_ERROR:
        finding.problems.append(f"PRV epsilon {prv:.4f} above RDP's {rdp:.4f}: the "
                                "accountants disagree")
    finding.problems += _second_opinion(history, delta, stored, rdp=rdp, prv=prv, pld=pld,
                                        google_rdp=google_rdp)
    finding.epsilon = enforced
    if enforced > budget * (1 + REL_TOLERANCE):
        finding.problems.append(f"over budget: epsilon {enforced:.4f} > {budget:g}")
    for entry, ok in zip(history, allowed):
        if not ok:
            expected = ("the replayed plan" if plan is not None else f"{train_entry}" + (
                f" or {', '.join(map(str, extra_entries))}" if extra_entries else ""))
            finding.problems.append(
                f"entry {entry} is not what this run accounts (expected {expected})")
    if train_entries < trained_rounds:
        finding.problems.append(f"the server counted {trained_rounds} updates, the ledger "
                                f"accounts {train_entries} rounds of DP steps")
    if server_epsilon is not None and \
            server_epsilon > enforced * (1 + REL_TOLERANCE) + 1e-12:
        finding.problems.append(f"the device reported epsilon {server_epsilon:.4f}, more than "
                                f"its ledger holds ({enforced:.4f})")
    return finding


def _second_opinion(history: list[HistoryEntry], delta: float, stored, *, rdp: float,
                    prv: float | None, pld: float | None,
                    google_rdp: float | None) -> list[str]:
    """What Google's accountants say against Opacus's and against the stored figure."""
    problems = []
    if prv is None and pld is None:
        problems.append("neither Opacus's PRV nor Google's PLD accountant can compute this "
                        "history")
    elif prv is not None and pld is not None and abs(prv - pld) > NUMERICAL_TOLERANCE:
        problems.append(f"Opacus's PRV epsilon {prv:.4f} and Google's PLD {pld:.4f} differ "
                        f"by more than {NUMERICAL_TOLERANCE:g}: the accountants disagree")
    opacus_at = _opacus_rdp_at(history, delta, RDP_COMPARISON_ORDERS)
    google_at = _google(second_accountant.rdp_epsilon, history, delta,
                        orders=RDP_COMPARISON_ORDERS)
    if google_at is not None and not _same(opacus_at, google_at, RDP_REL_TOLERANCE):
        problems.append(f"Opacus's RDP epsilon {opacus_at:.6f} and Google's {google_at:.6f} "
                        "at the integer orders 2-64 differ: the accountants disagree")
    sound = {"Opacus RDP": rdp, "Opacus PRV": prv, "Google PLD": pld, "Google RDP": google_rdp}
    tightest = min((value, name) for name, value in sound.items() if value is not None)
    if stored is not None and float(stored) < tightest[0] - NUMERICAL_TOLERANCE:
        problems.append(f"stored epsilon {stored} is below the tightest sound bound, "
                        f"{tightest[0]:.4f} by {tightest[1]}: the ledger claims less than "
                        "any accountant gives")
    return problems


def _replay(history: list[HistoryEntry], sources: list[str], plan: RoundPlan, *,
            federation: str, budget: float, delta: float,
            accountant: str) -> tuple[list[bool], int]:
    """Walk ``history`` round by round as the device planned it: which entries match
    the plan, and how many rounds of DP steps it holds. Other federations' entries are
    taken as spent where they stand. The walk stops at the first entry of this
    federation that no plan explains (everything after it is flagged)."""
    ledger = PrivacyLedger(target_epsilon=budget, target_delta=delta, accountant=accountant)
    allowed = [False] * len(history)
    position = rounds = 0
    while position < len(history):
        if sources[position] != federation:
            ledger.record(history[position], federation=sources[position])
            allowed[position] = True
            position += 1
            continue
        for private_choice in (False, True):
            entries = plan(ledger, private_choice)
            span = history[position:position + len(entries or [])]
            if entries and len(span) == len(entries) and all(
                    _matches(e, x) for e, x in zip(span, entries)):
                break
        else:
            return allowed, rounds
        allowed[position:position + len(entries)] = [True] * len(entries)
        ledger.record(*entries, federation=federation)
        position += len(entries)
        rounds += 1
    return allowed, rounds


def _matches(entry: HistoryEntry, expected: HistoryEntry) -> bool:
    return (_same(entry[0], expected[0]) and _same(entry[1], expected[1])
            and int(entry[2]) == int(expected[2]))
