"""What the server measures: the fixed users after every round, and every user at each
level at the end (on raw test records: a simulation measurement, not DP), and the
report that the final evaluation writes."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from flwr.app import Message, MessageType
from flwr.serverapp import Grid

from server.checkpoint import ServerState
from server.messages import round_content
from server.nodes import reply_timeout, successful
from server.report import (
    level_metrics,
    privacy_summary,
    unconfirmed_spending,
    user_check_summary,
    write_report,
)
from shared.config import RunConfig
from shared.personas import adjusted_rand_index, contingency
from shared.protocol.wire import EVAL_LEVELS, KEY_METRICS, KEY_ROUND, round_record
from shared.util.metrics import TokenStats

if TYPE_CHECKING:
    from server.run import Run

log = logging.getLogger("fedpersona.server")


def fixed_eval_users(candidates: Iterable[tuple[str, str | None]], n: int, *,
                     keep: Sequence[str] = ()) -> tuple[str, ...]:
    """The ``n`` users measured after every round (all when fewer), sorted: ``keep`` (an
    earlier choice) first, then in turn one from each persona (personas and their users in
    name order), so every persona is measured and the choice reproduces."""
    known = dict(candidates)
    chosen = [u for u in dict.fromkeys(keep) if u in known][:n]
    queues: dict[str, list[str]] = {}
    for user in sorted(known):
        if user not in chosen:
            queues.setdefault(str(known[user]), []).append(user)
    order = [queues[p] for p in sorted(queues)]
    while len(chosen) < n and any(order):
        chosen += [q.pop(0) for q in order if q][:n - len(chosen)]
    return tuple(sorted(chosen))


def evaluate_round(grid: Grid, run: Run) -> dict:
    """The fixed users' macro test perplexity at each level after this round's aggregation,
    for the history entry; nothing when ``round-eval-users`` = 0 or none of them answers.
    The same EVALUATE message as the final evaluation: a simulation measurement on raw
    test records, not DP; the devices only read their state to answer it."""
    if not run.eval_users:
        return {}
    t0 = time.monotonic()
    wanted = set(run.eval_users)
    nodes = [n for n in run.nodes.refresh(grid) if run.nodes.names[n] in wanted]
    per_user, _ = evaluate_nodes(grid, run, nodes) if nodes else ({}, {})
    if not per_user:
        log.warning("round %d: none of the %d fixed users answered the evaluation",
                    run.state.round, len(wanted))
        return {}
    return {"eval": {level: v["perplexity"] for level, v in level_metrics(per_user).items()},
            "eval_users": sorted(per_user), "eval_seconds": round(time.monotonic() - t0, 2)}


def evaluate_nodes(grid: Grid, run: Run, nodes: list[int], *, final: bool = False
                   ) -> tuple[dict[str, dict[str, TokenStats]], dict[str, tuple[int, int]]]:
    """Per user: the test stats at each level, and the device's user-adapter check tally
    (rounds checked, rounds kept). ``final``: the run's last evaluation, before which
    each device fits its user adapter under the final levels."""
    cfg, state, personas = run.cfg, run.state, run.personas
    messages = []
    for node in nodes:
        content = round_content(state, run.nodes.persona(node), personas, cfg, state.round,
                                all_personas=bool(cfg.discovered_k))
        content[KEY_ROUND] = round_record(state.round, personas, final=final)
        messages.append(Message(content, dst_node_id=node, message_type=MessageType.EVALUATE))
    per_user: dict[str, dict[str, TokenStats]] = {}
    tallies: dict[str, tuple[int, int]] = {}
    for reply in successful(grid.send_and_receive(messages, timeout=reply_timeout(cfg)),
                            "evaluation"):
        metrics = reply.content.metric_records[KEY_METRICS]
        name = run.nodes.names[reply.metadata.src_node_id]
        per_user[name] = {level: TokenStats(float(metrics[f"{level}/nll-sum"]),
                                            int(metrics[f"{level}/correct"]),
                                            int(metrics[f"{level}/tokens"]))
                          for level in EVAL_LEVELS}
        tallies[name] = (int(metrics.get("user-checks", 0)), int(metrics.get("user-kept", 0)))
    return per_user, tallies


def final_report(grid: Grid, run: Run, started: float,
                 progress: Callable[[str], None]) -> dict:
    """Evaluate every online user at each level and write ``report.md`` / ``report.json``."""
    cfg, state = run.cfg, run.state
    online = run.nodes.refresh(grid)
    progress(f"evaluating {len(online)} users at {len(EVAL_LEVELS)} levels")
    per_user, tallies = evaluate_nodes(grid, run, online, final=True)
    untested = sorted(u for u, levels in per_user.items()
                      if not any(stats.tokens for stats in levels.values()))
    if untested:
        progress(f"warning: {len(untested)} of {len(per_user)} users have no test records "
                 f"and are left out of the tables: {', '.join(untested[:8])}"
                 + (", ..." if len(untested) > 8 else ""))
    truth = {u.user_id: u.attributes.get("genre", u.persona) for u in run.users}
    report = {
        "config": cfg.to_flower(), "num_users": len(run.users),
        "personas": list(run.personas),
        "rounds": state.history,
        **({"round_eval": {"users": list(run.eval_users),
                           "max_records": cfg.eval_max_records,
                           "note": "the same users after every round, on raw test records: "
                                   "a simulation measurement, not DP"}}
           if run.eval_users else {}),
        "rejected_updates": state.rejected,
        "privacy": privacy_summary(state.epsilon_per_user, dp=cfg.dp, delta=cfg.target_delta,
                                   budget=cfg.target_epsilon, accountant=cfg.accountant,
                                   mechanism="distributed" if cfg.distributed_dp else "local",
                                   unconfirmed=unconfirmed_spending(state.history,
                                                                    state.rejected)),
        "user_level_privacy": (state.central_dp.summary() if cfg.central_dp and state.central_dp
                               else {"central_dp": False}),
        "levels": level_metrics(per_user),
        "users_without_test_records": untested,
        "user_adapter_check": user_check_summary(tallies, cfg.user_holdout_fraction),
        **({"discovery": discovery_report(state, truth, cfg)} if cfg.discovered_k else {}),
        "adapters": {"global": "adapters/global",
                     "persona": {p: f"adapters/persona/{p}" for p in run.personas}},
        "seconds": round(time.monotonic() - started, 1),
    }
    write_report(run.run_dir, report)
    progress(f"wrote {run.run_dir / 'report.md'} and report.json")
    return report


def discovery_report(state: ServerState, truth: dict[str, str], cfg: RunConfig) -> dict:
    """How the discovered clusters line up with the true groups (genres)."""
    users = sorted(u for u in state.assignments if u in truth)
    true = [truth[u] for u in users]
    found = [state.assignments[u] for u in users]
    private = cfg.dp and cfg.selection_noise > 0
    return {"k": cfg.discovered_k, "users": len(users),
            "adjusted_rand_index": adjusted_rand_index(true, found) if users else None,
            "contingency": contingency(true, found),
            "assignments": {u: state.assignments[u] for u in users},
            "choice_private": private,
            "note": (f"each choice is a Gaussian mechanism (noise multiplier "
                     f"{cfg.selection_noise}) on clipped losses, in the user's ledger"
                     if private else "the persona choice is NOT covered by the DP guarantee "
                     "(selection-noise = 0 or dp = false)")}
