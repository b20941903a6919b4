"""The ServerApp: rounds of hierarchical DP-LoRA, checkpoints, evaluation and the report."""

from __future__ import annotations

import hashlib
import logging
import math
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from server.aggregation import CentralLedger, ClientUpdate, plan_levels
from server.checkpoint import ServerState, load_checkpoint, save_checkpoint
from server.report import level_metrics, privacy_summary, user_check_summary, write_report
from server.secagg import SecureRound
from server.strategy import (
    apply_changes,
    chosen_persona,
    discovery_content,
    parse_reply,
    round_changes,
    sample_nodes,
    sent_part,
    train_content,
)
from shared.config import RunConfig, expand_path
from shared.data.federation import load_run_population, training_users
from shared.model.adapters import is_trainable_key
from shared.model.base import cache_root
from shared.model.runtime import get_runtime
from shared.personas import (
    adjusted_rand_index,
    cluster_names,
    contingency,
    perturbed_copies,
)
from shared.protocol.validation import UpdateRejected, error_summary
from shared.protocol.wire import (
    EVAL_LEVELS,
    KEY_CONFIG,
    KEY_METRICS,
    KEY_ROUND,
    round_record,
    run_config_record,
)
from shared.util.atomic import secret_file
from shared.util.metrics import TokenStats

log = logging.getLogger("fedpersona.server")
NODE_WAIT_SECONDS = 120.0
DISCOVERY_INIT_SCALE = 0.01  # std of the perturbation that tells the K initial clusters apart

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_server(grid, RunConfig.from_mapping(context.run_config))


def run_dir_of(cfg: RunConfig) -> Path:
    return expand_path("run-dir", cfg.run_dir) if cfg.run_dir else cache_root() / "runs" / "latest"


@dataclass
class Run:
    """What every round of one run shares, fixed when the run starts or resumes."""
    cfg: RunConfig
    run_dir: Path
    state: ServerState
    users: tuple  # a simulation's training users; empty in a deployment
    personas: tuple[str, ...]
    expected: dict[str, tuple[int, ...]]  # the sent global adapter's tensor shapes
    merged: frozenset[str] = frozenset()  # personas merged into global (user-level DP)
    node_info: dict[int, dict] = field(default_factory=dict)
    user_name: dict[int, str] = field(default_factory=dict)
    sampling_seed: int = 0
    eval_users: tuple[str, ...] = ()  # evaluated after every round (round-eval-users)

    @property
    def trained(self) -> tuple[str, ...]:
        """The personas trained as such; a merged one's members train global only."""
        return tuple(p for p in self.personas if p not in self.merged)

    def persona_of(self, node: int) -> str | None:
        persona = self.node_info[node]["persona"]
        return None if persona in self.merged else persona

    def refresh(self, grid: Grid, online: list[int] | None = None) -> list[int]:
        return refresh_nodes(grid, self.node_info, self.user_name, self.users, self.cfg,
                             self.personas, online=online)


def run_server(grid: Grid, cfg: RunConfig, progress: Callable[[str], None] = print, *,
               secagg_observer: Callable[[str, Message], None] | None = None) -> dict:
    """Train for ``num-rounds`` (resuming from the run directory's checkpoint), evaluate,
    and write the report. Returns the report. ``secagg_observer`` is shown every reply
    of the SecAgg+ protocol (:class:`server.secagg.SecureRound`)."""
    started = time.monotonic()
    run = start_run(grid, cfg, progress)
    for server_round in range(run.state.round + 1, cfg.num_rounds + 1):
        run_round(grid, run, server_round, progress, secagg_observer=secagg_observer)
    return final_report(grid, run, started, progress)


def start_run(grid: Grid, cfg: RunConfig, progress: Callable[[str], None]) -> Run:
    """The checkpoint (or a fresh state), the connected nodes, and the user-level DP
    plan, refusing a resume that would change what was promised."""
    run_dir = run_dir_of(cfg)
    # A deployment names its personas and the server reads no user data; a simulation
    # takes them, and the users' names, from the population.
    users = () if cfg.persona_names else training_users(load_run_population(cfg), cfg)
    k = cfg.discovered_k
    personas = cluster_names(k) if k else (
        cfg.persona_name_list or load_run_population(cfg).personas)
    runtime = get_runtime(cfg)
    state = load_checkpoint(run_dir)
    if state is None:
        state = ServerState(round=0, global_state=dict(runtime.initial["global"]),
                            persona_states=initial_personas(runtime, personas, cfg))
    else:
        progress(f"resuming {run_dir} after round {state.round}")
    expected = {k: tuple(v.shape) for k, v in sent_part(runtime.initial["global"],
                                                          cfg.lora_scheme).items()}
    run = Run(cfg, run_dir, state, tuple(users), personas, expected)

    nodes = wait_for_nodes(grid, max(1, cfg.min_clients or min(len(users),
                                                                 cfg.clients_per_round)))
    run.refresh(grid, online=nodes)
    counts = {p: sum(1 for i in run.node_info.values() if i["persona"] == p) for p in personas}
    progress(f"{len(nodes)} clients connected; clients per persona: "
             + ", ".join(f"{p} {n}" for p, n in counts.items()))
    if state.round and cfg.central_dp != (state.central_dp is not None):
        raise RuntimeError(f"{run_dir} was trained with central-dp = "
                           f"{state.central_dp is not None}; resuming with central-dp = "
                           f"{cfg.central_dp} would void or misstate the user-level guarantee")
    if cfg.central_dp and state.central_dp is None:  # fixed before round 1, kept on resume
        state.central_dp = central_dp_plan(cfg, users, counts, len(run.node_info))
    if cfg.central_dp and state.central_dp:
        run.merged = frozenset(state.central_dp.merged)
    for persona, note in (state.central_dp.summary()["merged_into_global"].items()
                          if run.merged else ()):
        progress(f"user-level DP: persona {persona} {note}")
    run.sampling_seed = cfg.seed
    if cfg.central_dp:
        planned = min(cfg.clients_per_round, state.central_dp.population)
        if abs(planned / state.central_dp.population - state.central_dp.sample_rate) > 1e-12:
            raise RuntimeError(f"{run_dir} was planned for user-level DP at q = "
                               f"{state.central_dp.sample_rate:.4g}; clients-per-round = "
                               f"{cfg.clients_per_round} would change it")
        secret = secret_file(run_dir / "server-secret")
        run.sampling_seed = int.from_bytes(hashlib.sha256(secret).digest()[:4], "big") >> 1
    if cfg.round_eval_users:
        # A simulation draws from all its training users; a deployment from the nodes
        # connected now, after the users an earlier start chose (kept on resume).
        candidates = ([(u.user_id, u.persona) for u in users] if users else
                      [(run.user_name[n], i["persona"]) for n, i in run.node_info.items()])
        run.eval_users = fixed_eval_users(
            candidates, cfg.round_eval_users,
            keep=[u for h in state.history for u in h.get("eval_users", ())])
    return run


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


def run_round(grid: Grid, run: Run, server_round: int, progress: Callable[[str], None], *,
              secagg_observer: Callable[[str, Message], None] | None = None) -> None:
    """Sample, send, validate the replies, aggregate, checkpoint: one round."""
    cfg, state = run.cfg, run.state
    t0 = time.monotonic()
    online = run.refresh(grid)
    # Under central DP the sample must be secret (amplification by subsampling is
    # what the account credits) and drawn from the planned population, online or
    # not (a chosen node that is away simply does not reply), so that q = k / N.
    pool = sorted(run.node_info) if cfg.central_dp else online
    chosen = sample_nodes(pool, cfg.clients_per_round, seed=run.sampling_seed,
                          server_round=server_round, key=run.user_name.get)
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
               list(grid.send_and_receive(messages, timeout=_timeout(cfg))))
    got = collect_replies(run, replies, chosen, server_round, secure=secure,
                          discovering=discovering)
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
    nodes = [n for n in run.refresh(grid) if run.user_name[n] in wanted]
    per_user, _ = evaluate_nodes(grid, nodes, run.state, run.node_info, run.cfg, run.personas,
                                 run.user_name) if nodes else ({}, {})
    if not per_user:
        log.warning("round %d: none of the %d fixed users answered the evaluation",
                    run.state.round, len(wanted))
        return {}
    return {"eval": {level: v["perplexity"] for level, v in level_metrics(per_user).items()},
            "eval_users": sorted(per_user), "eval_seconds": round(time.monotonic() - t0, 2)}


def collect_replies(run: Run, replies: list[Message], chosen: list[int], server_round: int,
                    *, secure: SecureRound | None, discovering: bool) -> RoundReplies:
    """Validate each reply (a bad one is rejected with its reason, never fatal) and name
    the chosen nodes that did not answer."""
    cfg, state, user_name = run.cfg, run.state, run.user_name
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
    for node in chosen:
        if node not in answered:
            reason = "no reply" + (f" ({'; '.join(sorted(set(errors)))})" if errors else "")
            got.rejected.append({"round": server_round, "client": user_name[node],
                                 "reason": reason})
            log.warning("round %d: %s: %s", server_round, user_name[node], reason)
    return got


def final_report(grid: Grid, run: Run, started: float,
                 progress: Callable[[str], None]) -> dict:
    """Evaluate every online user at each level and write ``report.md`` / ``report.json``."""
    cfg, state = run.cfg, run.state
    online = run.refresh(grid)
    progress(f"evaluating {len(online)} users at {len(EVAL_LEVELS)} levels")
    per_user, tallies = evaluate_nodes(grid, online, state, run.node_info, cfg, run.personas,
                                       run.user_name, final=True)
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
                                   mechanism="distributed" if cfg.distributed_dp else "local"),
        "user_level_privacy": (state.central_dp.summary() if cfg.central_dp and state.central_dp
                               else {"central_dp": False}),
        "levels": level_metrics(per_user),
        "user_adapter_check": user_check_summary(tallies, cfg.user_holdout_fraction),
        **({"discovery": discovery_report(state, truth, cfg)} if cfg.discovered_k else {}),
        "adapters": {"global": "adapters/global",
                     "persona": {p: f"adapters/persona/{p}" for p in run.personas}},
        "seconds": round(time.monotonic() - started, 1),
    }
    write_report(run.run_dir, report)
    progress(f"wrote {run.run_dir / 'report.md'} and report.json")
    return report


def central_dp_plan(cfg: RunConfig, users, counts: dict[str, int],
                    connected: int) -> CentralLedger:
    """User-level DP levels from public counts: a simulation's users (all of them, even
    those not yet connected), else the nodes connected before round 1."""
    if users:
        counts = {p: sum(1 for u in users if u.persona == p) for p in counts}
    return plan_levels(counts, population=len(users) or connected,
                       clients_per_round=cfg.clients_per_round,
                       clipping_norm=cfg.clipping_norm,
                       noise_multiplier=cfg.central_noise_multiplier, delta=cfg.central_delta,
                       min_clients=cfg.central_min_clients)


def round_content(state: ServerState, persona: str | None, personas: tuple[str, ...],
                  cfg: RunConfig, server_round: int, *, all_personas: bool) -> RecordDict:
    """What a client gets: global and its own persona (or all K discovered ones to choose
    from), the run config and the round info."""
    content = (discovery_content(state, personas, cfg.lora_scheme, cfg.transport_dtype)
               if all_personas else
               train_content(state, persona, cfg.lora_scheme, cfg.transport_dtype))
    content[KEY_CONFIG] = run_config_record(cfg)
    content[KEY_ROUND] = round_record(server_round, personas)
    return content


def initial_personas(runtime, personas: tuple[str, ...], cfg: RunConfig) -> dict:
    """Declared personas start at the seeded initialisation; discovered ones as K
    perturbed copies of it, so that IFCA's first choices can differ."""
    start = dict(runtime.initial["persona"])
    if not cfg.discovered_k:
        return {p: dict(start) for p in personas}
    keys = [key for key in start if is_trainable_key(key, cfg.lora_scheme)]
    copies = perturbed_copies(start, len(personas), scale=DISCOVERY_INIT_SCALE, seed=cfg.seed,
                              keys=keys)
    return dict(zip(personas, copies))


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


def weighted_loss(losses: list[tuple[float, int]]) -> float:
    """Example-weighted mean of the clients' (DP-noised) train losses.

    ``math.fsum`` (like ``statistics.fmean`` for the update norm) rounds once, so
    the mean does not depend on the order the replies arrived in: a resumed run's
    history matches an uninterrupted one's to the last bit.
    """
    total = sum(n for _, n in losses)
    return math.fsum(v * n for v, n in losses) / total if total else float("nan")


def _timeout(cfg: RunConfig) -> float | None:
    return cfg.round_timeout or None


def refresh_nodes(grid: Grid, node_info: dict[int, dict], user_name: dict[int, str],
                  users, cfg: RunConfig, personas: tuple[str, ...],
                  online: list[int] | None = None) -> list[int]:
    """The nodes online now (known ones and newcomers, which are asked for their persona
    first). A SuperNode that restarts with its registered key keeps its node id, so it
    rejoins under the same name; an offline one is simply not sampled."""
    online = sorted(grid.get_node_ids()) if online is None else online
    new = [n for n in online if n not in node_info]
    if new:
        info = query_nodes(grid, new, cfg, personas, allow_none=bool(node_info))
        node_info.update(info)
        for node, entry in info.items():
            index = entry["user-index"]
            user_name[node] = users[index].user_id if 0 <= index < len(users) else \
                f"node-{node}"
    return [n for n in online if n in node_info]


def wait_for_nodes(grid: Grid, minimum: int, timeout: float = NODE_WAIT_SECONDS) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= minimum:
            return nodes
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(nodes)} of {minimum} clients connected in {timeout:.0f}s")
        time.sleep(1.0)


def query_nodes(grid: Grid, nodes: list[int], cfg: RunConfig,
                personas: tuple[str, ...], *, allow_none: bool = False) -> dict[int, dict]:
    """Ask each node for its persona index (the server cannot read a node's config)."""
    messages = []
    for node in nodes:
        content = RecordDict({KEY_CONFIG: run_config_record(cfg),
                              KEY_ROUND: round_record(0, personas)})
        messages.append(Message(content, dst_node_id=node, message_type=MessageType.QUERY))
    info = {}
    for reply in successful(grid.send_and_receive(messages, timeout=_timeout(cfg)),
                            "the persona query"):
        metrics = reply.content.metric_records[KEY_METRICS]
        index = int(metrics["persona-index"])
        info[reply.metadata.src_node_id] = {
            "persona": personas[index] if 0 <= index < len(personas) else None,
            "user-index": int(metrics["user-index"])}
    if not info and not allow_none:
        raise RuntimeError("no client answered the persona query")
    return info


def successful(replies, what: str):
    """The replies without an error; the others are logged and skipped."""
    for reply in replies:
        if reply.has_error():
            log.warning("node %s failed %s: %s", reply.metadata.src_node_id, what,
                        reply.error.reason)
        else:
            yield reply


def evaluate_nodes(grid: Grid, nodes: list[int], state: ServerState, node_info: dict,
                   cfg: RunConfig, personas: tuple[str, ...],
                   user_name: dict[int, str], *, final: bool = False
                   ) -> tuple[dict[str, dict[str, TokenStats]], dict[str, tuple[int, int]]]:
    """Per user: the test stats at each level, and the device's user-adapter check tally
    (rounds checked, rounds kept). ``final``: the run's last evaluation, before which
    each device fits its user adapter under the final levels."""
    messages = []
    for node in nodes:
        content = round_content(state, node_info[node]["persona"], personas, cfg, state.round,
                                all_personas=bool(cfg.discovered_k))
        content[KEY_ROUND] = round_record(state.round, personas, final=final)
        messages.append(Message(content, dst_node_id=node, message_type=MessageType.EVALUATE))
    per_user: dict[str, dict[str, TokenStats]] = {}
    tallies: dict[str, tuple[int, int]] = {}
    for reply in successful(grid.send_and_receive(messages, timeout=_timeout(cfg)),
                            "evaluation"):
        metrics = reply.content.metric_records[KEY_METRICS]
        name = user_name[reply.metadata.src_node_id]
        per_user[name] = {level: TokenStats(float(metrics[f"{level}/nll-sum"]),
                                            int(metrics[f"{level}/correct"]),
                                            int(metrics[f"{level}/tokens"]))
                          for level in EVAL_LEVELS}
        tallies[name] = (int(metrics.get("user-checks", 0)), int(metrics.get("user-kept", 0)))
    return per_user, tallies
