"""Flower's Simulation Engine on a Ray cluster: connect, and show where each client ran.

A population that outgrows one machine runs on a Ray cluster: ``fedpersona
simulate --ray-address HOST:PORT`` connects the driver to it (instead of starting
Ray here), and Flower's Ray backend then places its ClientApp actors on every
node with free CPUs. Every node must have this project installed at the same path
and the population and base model at the same paths (the actors read them there).

Where each client ran is recorded by :func:`placement_mod` (one JSON line per
message in ``RUN/placement.jsonl``: round, type, user index, Ray node) and summed
per node by :func:`placement_summary`.

Ray 2.55 rewrites a node address of ``127.0.0.1`` (or ``localhost``) to the
machine's outward address (``ray._private.services.resolve_ip_for_localhost``;
ray-project/ray#59110), so a cluster kept on this machine advertises another
loopback address, e.g. ``127.0.0.2``; its GCS and raylets still listen on every
interface, which is Ray's choice and not ours to change.
"""

from __future__ import annotations

import ipaddress
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

from shared.protocol.wire import KEY_CONFIG, KEY_ROUND, read_run_config

PLACEMENT_LOG = "placement.jsonl"


def connect(address: str, init_args: dict) -> dict[str, dict]:
    """Connect this driver to the Ray cluster at ``address`` (host:port); the cluster's
    nodes by id: their address and resources. Resource amounts are the cluster's own:
    ``init_args`` gives only logging (Ray refuses CPU counts for an existing cluster)."""
    import ray

    host = address.rsplit(":", 1)[0]
    node_ip = host if _is_loopback(host) else None  # else Ray finds this machine's address
    ray.init(address=address, runtime_env=worker_environment(),
             _node_ip_address=node_ip,
             **{k: v for k, v in init_args.items() if k in ("logging_level", "log_to_driver")})
    return {node["NodeID"]: {"address": node["NodeManagerAddress"],
                             "resources": node["Resources"]}
            for node in ray.nodes() if node["Alive"]}


def worker_environment() -> dict:
    """Ray's runtime environment for this run's workers: they inherit the environment,
    not this process's ``sys.path`` (as Flower's Ray backend does it)."""
    pythonpath = os.pathsep.join([*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])])
    os.environ["PYTHONPATH"] = pythonpath
    return {"env_vars": {"PYTHONPATH": pythonpath}}


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def placement_mod(msg, context, call_next):
    """Record which Ray node ran this message (simulations on a cluster)."""
    import ray

    reply = call_next(msg, context)
    cfg = read_run_config(msg.content[KEY_CONFIG])
    entry = {"round": int(msg.content[KEY_ROUND]["server-round"]),
             "type": msg.metadata.message_type,
             "partition": int(context.node_config.get("partition-id", -1)),
             "node": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}
    with open(Path(cfg.run_dir) / PLACEMENT_LOG, "a") as log:  # one short line: O_APPEND-atomic
        log.write(json.dumps(entry) + "\n")
    return reply


def placement_summary(run_dir: Path, nodes: dict[str, dict]) -> list[dict]:
    """Per Ray node: its address, its custom resources (how a person tells nodes apart),
    the messages it ran and the distinct users (partitions) among them."""
    per_node: dict[str, dict] = defaultdict(lambda: {"messages": 0, "users": set(),
                                                     "processes": set()})
    path = Path(run_dir) / PLACEMENT_LOG
    for line in path.read_text().splitlines() if path.is_file() else []:
        entry = json.loads(line)
        node = per_node[entry["node"]]
        node["messages"] += 1
        node["users"].add(entry["partition"])
        node["processes"].add(entry["pid"])
    return [{"node": node_id[:12], "address": nodes.get(node_id, {}).get("address", "?"),
             "labels": ",".join(sorted(_custom(nodes.get(node_id, {}).get("resources", {})))),
             "messages": v["messages"], "users": len(v["users"]),
             "actor processes": len(v["processes"])}
            for node_id, v in sorted(per_node.items())]


def _custom(resources: dict) -> list[str]:
    standard = ("CPU", "GPU", "memory", "object_store_memory", "accelerator_type")
    return [k for k in resources if not k.startswith(standard) and not k.startswith("node:")]
