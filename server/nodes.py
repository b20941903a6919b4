"""The nodes a run talks to: who is online, and which user and persona each serves."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from flwr.app import Message, MessageType
from flwr.serverapp import Grid

from server.messages import query_content
from shared.config import RunConfig
from shared.protocol.wire import KEY_METRICS

log = logging.getLogger("fedpersona.server")
NODE_WAIT_SECONDS = 120.0


def reply_timeout(cfg: RunConfig) -> float | None:
    """How long to wait for a round's replies: ``round-timeout``, or until all answer."""
    return cfg.round_timeout or None


@dataclass
class Nodes:
    """Every node seen in this run: its persona (asked once; public per the threat model)
    and the name of its user (a simulation's training user, else ``node-<id>``)."""

    cfg: RunConfig
    personas: tuple[str, ...]
    users: tuple = ()  # a simulation's training users, indexed by partition; empty in a deployment
    info: dict[int, dict] = field(default_factory=dict)
    names: dict[int, str] = field(default_factory=dict)

    def refresh(self, grid: Grid, online: list[int] | None = None) -> list[int]:
        """The nodes online now (known ones and newcomers, which are asked for their
        persona first). A SuperNode that restarts with its registered key keeps its node
        id, so it rejoins under the same name; an offline one is simply not sampled."""
        online = sorted(grid.get_node_ids()) if online is None else online
        new = [n for n in online if n not in self.info]
        if new:
            info = query_nodes(grid, new, self.cfg, self.personas, allow_none=bool(self.info))
            self.info.update(info)
            for node, entry in info.items():
                index = entry["user-index"]
                self.names[node] = (self.users[index].user_id if 0 <= index < len(self.users)
                                    else f"node-{node}")
        return [n for n in online if n in self.info]

    def persona(self, node: int) -> str | None:
        return self.info[node]["persona"]

    def per_persona(self) -> dict[str, int]:
        """How many known nodes declare each persona."""
        return {p: sum(1 for i in self.info.values() if i["persona"] == p)
                for p in self.personas}


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
    messages = [Message(query_content(cfg, personas), dst_node_id=node,
                        message_type=MessageType.QUERY) for node in nodes]
    info = {}
    for reply in successful(grid.send_and_receive(messages, timeout=reply_timeout(cfg)),
                            "the persona query"):
        metrics = reply.content.metric_records[KEY_METRICS]
        index = int(metrics["persona-index"])
        info[reply.metadata.src_node_id] = {
            "persona": personas[index] if 0 <= index < len(personas) else None,
            "user-index": int(metrics["user-index"])}
    if not info and not allow_none:
        raise RuntimeError("no client answered the persona query")
    missing = sorted(set(nodes) - set(info))
    if missing:  # not sampled until they answer: asked again at the next round
        log.warning("no persona from node(s) %s yet", ", ".join(map(str, missing)))
    return info


def successful(replies, what: str):
    """The replies without an error; the others are logged and skipped."""
    for reply in replies:
        if reply.has_error():  # made by the SuperLink for an unreachable node, whose
            # id it does not carry: the callers name the nodes that did not answer
            log.warning("a node failed %s: %s", what, reply.error.reason)
        else:
            yield reply
