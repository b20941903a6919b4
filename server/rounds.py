"""One training round on the server: sample, send, validate the replies, aggregate,
measure, checkpoint."""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from flwr.app import Message, MessageType
from flwr.serverapp import Grid

from server.aggregation import ClientUpdate
from server.checkpoint import save_checkpoint
from server.evaluation import evaluate_round
from server.messages import round_content
from server.nodes import reply_timeout
from server.run import Run
from server.secagg import SecureRound
from server.strategy import (
    apply_changes,
    chosen_persona,
    parse_reply,
    round_changes,
    sample_nodes,
)
from shared.model.runtime import get_runtime
from shared.protocol.validation import UpdateRejected, error_summary

log = logging.getLogger("fedpersona.server")


@dataclass
class RoundReplies:
    """One round's replies, validated: what counts, and why the rest does not."""
    accepted: list[tuple[str, ClientUpdate]] = field(default_factory=list)  # (user, update)
    declined: int = 0
    rejected: list[dict] = field(default_factory=list)
    norms: list[float] = field(default_factory=list)
    losses: list[tuple[float, int]] = field(default_factory=list)
    noise_multipliers: list[float] = field(default_factory=list)  # accounted, per client
    private_choices: list[int] = field(default_factory=list)
    heard: set[str] = field(default_factory=set)  # users that reported their epsilon


class RoundAbandoned(Exception):
    """The round lost replies while the run was stopping; nothing of it was saved."""


def run_round(grid: Grid, run: Run, server_round: int, progress: Callable[[str], None], *,
              secagg_observer: Callable[[str, Message], None] | None = None,
              stopping: Callable[[], bool] = lambda: False) -> None:
    """Sample, send, validate the replies, aggregate, checkpoint: one round. A round that
    lost replies while the run is ``stopping`` (a signal that reached the clients too) is
    abandoned before anything is saved (:class:`RoundAbandoned`): resumed, it is sent
    again and the devices replay what they released."""
    cfg, state = run.cfg, run.state
    t0 = time.monotonic()
    online = run.nodes.refresh(grid)
    # Under central DP the sample must be secret (amplification by subsampling is
    # what the account credits) and drawn from the planned population, online or
    # not (a chosen node that is away simply does not reply), so that q = k / N.
    pool = sorted(run.nodes.info) if cfg.central_dp else online
    chosen = sample_nodes(pool, cfg.clients_per_round, seed=run.sampling_seed,
                          server_round=server_round, key=run.nodes.names.get)
    discovering = bool(cfg.discovered_k) and server_round > cfg.discovery_warmup
    messages = [Message(round_content(state, run.persona_of(node), run.trained, cfg,
                                      server_round, all_personas=discovering),
                        dst_node_id=node, message_type=MessageType.TRAIN)
                for node in chosen]
    # secagg: Flower's SecAgg+ replaces send, parse and the mean; the server sees only sums
    secure = SecureRound(grid, cfg, run.trained, run.expected, server_round=server_round,
                         persona_of=run.persona_of, discovering=discovering,
                         observe=secagg_observer) if cfg.secagg else None
    replies = (secure.run(messages) if secure else
               list(grid.send_and_receive(messages, timeout=reply_timeout(cfg))))
    got = collect_replies(run, replies, chosen, server_round, secure=secure,
                          discovering=discovering)
    if got.rejected and stopping():
        raise RoundAbandoned(f"round {server_round} lost {len(got.rejected)} replies while "
                             "stopping")
    # Aggregate in a fixed order (by user), not arrival order: float sums then
    # reproduce exactly, so a resumed run matches an uninterrupted one.
    accepted = [u for _, u in sorted(got.accepted, key=lambda pair: pair[0])]
    changes = secure.mean_changes(accepted) if secure else round_changes(state, accepted, cfg)
    apply_changes(state, changes, cfg)  # sent + lr * mean change, whichever path
    state.round = server_round
    seconds = round(time.monotonic() - t0, 2)
    # Measured before the checkpoint, so it is saved with the round: a server killed
    # during it redoes the round (replayed by the devices, no new spend) and measures
    # the same adapters again.
    measured = evaluate_round(grid, run)
    state.rejected.extend(sorted(got.rejected, key=lambda r: str(r["client"])))
    state.history.append({
        "round": server_round, "clients": len(chosen), "accepted": len(got.accepted),
        # whose DP update counted (the ledger audit checks no device undercounts them)
        "trained_users": sorted(u for u, _ in got.accepted),
        # whose reported epsilon is current (server.report.unconfirmed_spending); a round
        # sent again after the server stopped in it: every device may have spent in the
        # lost try
        "heard_users": sorted(got.heard),
        **({"resumed": True} if server_round == run.resumed_at else {}),
        "declined": got.declined, "rejected": len(got.rejected),
        "train_loss": weighted_loss(got.losses),
        "update_norm": statistics.fmean(got.norms) if got.norms else float("nan"),
        **({"noise_multiplier": [min(got.noise_multipliers), max(got.noise_multipliers)]}
           if got.noise_multipliers else {}),
        **({"private_choices": sum(got.private_choices),
            "clusters_chosen": len(got.private_choices)} if discovering else {}),
        **(secure.history() if secure else {}),
        "seconds": seconds, **measured})
    save_checkpoint(run.run_dir, state, get_runtime(cfg).lora)
    h = state.history[-1]
    eps = max(state.epsilon_per_user.values(), default=0.0)
    progress(f"round {server_round}/{cfg.num_rounds}: {h['accepted']}/{h['clients']} "
             f"accepted, {got.declined} declined, {len(got.rejected)} rejected, train loss "
             f"{h['train_loss']:.3f}, update norm {h['update_norm']:.3f}"
             + (f", epsilon max {eps:.2f}" if cfg.dp else ", no DP")
             + (f", user-level epsilon (global) {state.central_dp.epsilon('global'):.2f}"
                if cfg.central_dp else "")
             + f" [{h['seconds']:.0f}s]"
             + (f"; perplexity on {len(h['eval_users'])} fixed users: "
                + ", ".join(f"{level} {ppl:.2f}" for level, ppl in h["eval"].items())
                + f" [{h['eval_seconds']:.0f}s]" if "eval" in h else ""))


def collect_replies(run: Run, replies: list[Message], chosen: list[int], server_round: int,
                    *, secure: SecureRound | None, discovering: bool) -> RoundReplies:
    """Validate each reply (a bad one is rejected with its reason, never fatal) and name
    the chosen nodes that did not answer."""
    cfg, state, user_name = run.cfg, run.state, run.nodes.names
    got = RoundReplies()
    errors: list[str] = []
    answered: set[int] = set()
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error() and node not in chosen:
            # The SuperLink answers for a node that went away (e.g. "Node Unavailable");
            # the node is named below, among those without a valid reply.
            errors.append(error_summary(reply.error.reason))
            continue
        answered.add(node)
        try:
            persona = (chosen_persona(reply, run.personas) if discovering
                       else run.persona_of(node))
            update, metrics = secure.parse(reply, persona) if secure else parse_reply(
                reply, persona=persona, expected=run.expected, current=state,
                scheme=cfg.lora_scheme, max_update_norm=cfg.max_update_norm,
                dtype=cfg.transport_dtype)
        except UpdateRejected as err:
            got.rejected.append({"round": server_round, "client": user_name.get(node, node),
                                 "reason": str(err)})
            log.warning("round %d: rejected update from %s: %s", server_round,
                        user_name.get(node, node), err)
            continue
        if cfg.dp and "epsilon" in metrics:
            state.epsilon_per_user[user_name[node]] = float(metrics["epsilon"])
            got.heard.add(user_name[node])
        if update is None:
            got.declined += 1
            continue
        if discovering:
            state.assignments[user_name[node]] = persona
            got.private_choices.append(int(metrics.get("selection-private", 0)))
        got.accepted.append((user_name[node], update))
        got.norms.append(float(metrics["update-norm"]))
        got.losses.append((float(metrics.get("train-loss", float("nan"))),
                           update.num_examples))
        if cfg.dp and "noise-multiplier" in metrics:
            got.noise_multipliers.append(float(metrics["noise-multiplier"]))
    if secure and cfg.dp:  # a halted SecAgg+ round: its devices spent all the same
        for node, epsilon in secure.spent.items():
            state.epsilon_per_user[user_name[node]] = epsilon
            got.heard.add(user_name[node])
    for node in chosen:
        if node not in answered:
            reason = "no reply" + (f" ({'; '.join(sorted(set(errors)))})" if errors else "")
            got.rejected.append({"round": server_round, "client": user_name[node],
                                 "reason": reason})
            log.warning("round %d: %s: %s", server_round, user_name[node], reason)
    return got


def weighted_loss(losses: list[tuple[float, int]]) -> float:
    """Example-weighted mean of the clients' (DP-noised) train losses.

    ``math.fsum`` (like ``statistics.fmean`` for the update norm) rounds once, so
    the mean does not depend on the order the replies arrived in: a resumed run's
    history matches an uninterrupted one's to the last bit.
    """
    total = sum(n for _, n in losses)
    return math.fsum(v * n for v, n in losses) / total if total else float("nan")
