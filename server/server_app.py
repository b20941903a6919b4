"""The ServerApp: rounds of hierarchical DP-LoRA, checkpoints, evaluation and the report."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from server.checkpoint import ServerState, load_checkpoint, save_checkpoint
from server.report import level_metrics, privacy_summary, write_report
from server.strategy import apply_round, parse_reply, sample_nodes, sent_part, train_content
from shared.config import RunConfig
from shared.federation import load_run_population, training_users
from shared.metrics import TokenStats
from shared.model import cache_root
from shared.runtime import get_runtime
from shared.validation import UpdateRejected
from shared.wire import EVAL_LEVELS, KEY_CONFIG, KEY_METRICS, KEY_ROUND, round_record, \
    run_config_record

log = logging.getLogger("fedpersona.server")
NODE_WAIT_SECONDS = 120.0

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_server(grid, RunConfig.from_mapping(context.run_config))


def run_dir_of(cfg: RunConfig) -> Path:
    return Path(cfg.run_dir).expanduser() if cfg.run_dir else cache_root() / "runs" / "latest"


def run_server(grid: Grid, cfg: RunConfig, progress: Callable[[str], None] = print) -> dict:
    """Train for ``num-rounds`` (resuming from the run directory's checkpoint), evaluate,
    and write the report. Returns the report."""
    started = time.monotonic()
    run_dir = run_dir_of(cfg)
    population = load_run_population(cfg)
    users = training_users(population, cfg)
    personas = population.personas
    runtime = get_runtime(cfg)
    state = load_checkpoint(run_dir)
    if state is None:
        state = ServerState(round=0, global_state=dict(runtime.initial["global"]),
                            persona_states={p: dict(runtime.initial["persona"]) for p in personas})
    else:
        progress(f"resuming {run_dir} after round {state.round}")
    expected = {k: tuple(v.shape) for k, v in sent_part(runtime.initial["global"],
                                                          cfg.lora_scheme).items()}
    config_record = run_config_record(cfg)

    nodes = wait_for_nodes(grid, min(len(users), cfg.clients_per_round))
    node_info = query_nodes(grid, nodes, cfg, personas)
    user_name = {n: users[i["user-index"]].user_id if 0 <= i["user-index"] < len(users)
                 else f"node-{n}" for n, i in node_info.items()}
    counts = {p: sum(1 for i in node_info.values() if i["persona"] == p) for p in personas}
    progress(f"{len(nodes)} clients connected; clients per persona: "
             + ", ".join(f"{p} {n}" for p, n in counts.items()))

    for server_round in range(state.round + 1, cfg.num_rounds + 1):
        t0 = time.monotonic()
        chosen = sample_nodes(node_info, cfg.clients_per_round, seed=cfg.seed,
                              server_round=server_round)
        messages = []
        for node in chosen:
            content = train_content(state, node_info[node]["persona"], cfg.lora_scheme)
            content[KEY_CONFIG] = config_record
            content[KEY_ROUND] = round_record(server_round, personas)
            messages.append(Message(content, dst_node_id=node, message_type=MessageType.TRAIN))
        replies = list(grid.send_and_receive(messages))
        accepted, declined, rejected, norms = [], 0, [], []
        for reply in replies:
            node = reply.metadata.src_node_id
            try:
                update, metrics = parse_reply(
                    reply, persona=node_info[node]["persona"], expected=expected, current=state,
                    scheme=cfg.lora_scheme, max_update_norm=cfg.max_update_norm)
            except UpdateRejected as err:
                rejected.append({"round": server_round, "client": user_name.get(node, node),
                                 "reason": str(err)})
                log.warning("round %d: rejected update from %s: %s", server_round,
                            user_name.get(node, node), err)
                continue
            if cfg.dp and "epsilon" in metrics:
                state.epsilon_per_user[user_name[node]] = float(metrics["epsilon"])
            if update is None:
                declined += 1
                continue
            accepted.append(update)
            norms.append(float(metrics["update-norm"]))
        missing = len(chosen) - len(replies)
        for _ in range(missing):
            rejected.append({"round": server_round, "client": "?", "reason": "no reply"})
        apply_round(state, accepted, cfg)
        state.round = server_round
        state.rejected.extend(rejected)
        state.history.append({
            "round": server_round, "clients": len(chosen), "accepted": len(accepted),
            "declined": declined, "rejected": len(rejected),
            "update_norm": sum(norms) / len(norms) if norms else float("nan"),
            "seconds": round(time.monotonic() - t0, 2)})
        save_checkpoint(run_dir, state, runtime.lora)
        h = state.history[-1]
        eps = max(state.epsilon_per_user.values(), default=0.0)
        progress(f"round {server_round}/{cfg.num_rounds}: {h['accepted']}/{h['clients']} "
                 f"accepted, {declined} declined, {len(rejected)} rejected, mean update norm "
                 f"{h['update_norm']:.3f}" + (f", epsilon max {eps:.2f}" if cfg.dp else ", no DP")
                 + f" [{h['seconds']:.0f}s]")

    progress(f"evaluating {len(node_info)} users at {len(EVAL_LEVELS)} levels")
    per_user = evaluate_nodes(grid, list(node_info), state, node_info, cfg, personas, user_name)
    report = {
        "config": cfg.to_flower(), "num_users": len(users),
        "personas": list(personas),
        "rounds": state.history,
        "rejected_updates": state.rejected,
        "privacy": privacy_summary(state.epsilon_per_user, dp=cfg.dp, delta=cfg.target_delta,
                                   budget=cfg.target_epsilon),
        "levels": level_metrics(per_user),
        "adapters": {"global": "adapters/global",
                     "persona": {p: f"adapters/persona/{p}" for p in personas}},
        "seconds": round(time.monotonic() - started, 1),
    }
    write_report(run_dir, report)
    progress(f"wrote {run_dir / 'report.md'} and report.json")
    return report


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
                personas: tuple[str, ...]) -> dict[int, dict]:
    """Ask each node for its persona index (the server cannot read a node's config)."""
    messages = []
    for node in nodes:
        content = RecordDict({KEY_CONFIG: run_config_record(cfg),
                              KEY_ROUND: round_record(0, personas)})
        messages.append(Message(content, dst_node_id=node, message_type=MessageType.QUERY))
    info = {}
    for reply in grid.send_and_receive(messages):
        if reply.has_error():
            log.warning("node %s failed the persona query: %s", reply.metadata.src_node_id,
                        reply.error.reason)
            continue
        metrics = reply.content.metric_records[KEY_METRICS]
        index = int(metrics["persona-index"])
        info[reply.metadata.src_node_id] = {
            "persona": personas[index] if 0 <= index < len(personas) else None,
            "user-index": int(metrics["user-index"])}
    if not info:
        raise RuntimeError("no client answered the persona query")
    return info


def evaluate_nodes(grid: Grid, nodes: list[int], state: ServerState, node_info: dict,
                   cfg: RunConfig, personas: tuple[str, ...],
                   user_name: dict[int, str]) -> dict[str, dict[str, TokenStats]]:
    messages = []
    for node in nodes:
        content = train_content(state, node_info[node]["persona"], cfg.lora_scheme)
        content[KEY_CONFIG] = run_config_record(cfg)
        content[KEY_ROUND] = round_record(state.round, personas)
        messages.append(Message(content, dst_node_id=node, message_type=MessageType.EVALUATE))
    per_user: dict[str, dict[str, TokenStats]] = {}
    for reply in grid.send_and_receive(messages):
        if reply.has_error():
            log.warning("evaluation failed on %s: %s", reply.metadata.src_node_id,
                        reply.error.reason)
            continue
        metrics = reply.content.metric_records[KEY_METRICS]
        name = user_name[reply.metadata.src_node_id]
        per_user[name] = {level: TokenStats(float(metrics[f"{level}/nll-sum"]),
                                            int(metrics[f"{level}/correct"]),
                                            int(metrics[f"{level}/tokens"]))
                          for level in EVAL_LEVELS}
    return per_user
