"""A real deployment on this machine: a SuperLink and SuperNodes on loopback, each a
``fedpersona deploy`` process in its own session, TLS and SuperNode authentication on.

What the integration tests and the soak (:mod:`simulations.deploy.soak`) start, kill
and restart. Every process runs in its own session and :meth:`LocalDeployment.stop`
kills each with its children; every wait is bounded. Logs go to ``ROOT/logs/NAME.log``,
appended across restarts.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from simulations.deploy.certs import write_credentials
from simulations.deploy.command import app_dir

SUPERNODE_ID = re.compile(r"SuperNode ID: (\d+)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition: Callable[[], bool], seconds: float,
             explain: Callable[[], str] = lambda: "") -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {seconds:g} s\n{explain()[-3000:]}")
        time.sleep(0.5)


class LocalDeployment:
    """The SuperLink at ``address`` and one SuperNode per user (``user_dirs``: the name
    its key is made under -> its user directory); the ``flwr`` connection lives in
    ``ROOT/flwr_home``."""

    def __init__(self, root: Path, user_dirs: Mapping[str, Path]):
        self.root = Path(root)
        self.user_dirs = dict(user_dirs)
        self.users = tuple(self.user_dirs)
        self.certs = self.root / "certs"
        self.env = {**os.environ, "FLWR_HOME": str(self.root / "flwr_home"),
                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.processes: dict[str, subprocess.Popen] = {}
        self.node_ports = {u: free_port() for u in self.users}
        (self.root / "logs").mkdir(parents=True, exist_ok=True)

    @classmethod
    def started(cls, root: Path, user_dirs: Mapping[str, Path], *,
                strangers: Sequence[str] = (), max_wait: float = 30) -> LocalDeployment:
        """Credentials for every user (and ``strangers``' keys, never registered), the
        SuperLink, the connection, each user's key registered and its SuperNode
        started."""
        d = cls(root, user_dirs)
        write_credentials(d.certs, supernodes=[*d.users, *strangers])
        try:
            d.start_superlink()
            connect = d.fedpersona("deploy", "connect", "--address", d.address, "--ca",
                                   str(d.certs / "ca.crt"))
            if connect.returncode:
                raise RuntimeError(f"deploy connect failed: {connect.stderr.strip()}")
            for user in d.users:
                registered = d.fedpersona("deploy", "register",
                                          str(d.certs / "supernodes" / f"{user}.pub"))
                if registered.returncode:
                    raise RuntimeError(f"deploy register {user} failed: "
                                       f"{(registered.stdout + registered.stderr).strip()}")
                d.start_supernode(user, max_wait=max_wait)
        except BaseException:
            d.stop()
            raise
        return d

    def fedpersona(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "simulations.cli", *args], cwd=app_dir(),
                              env=self.env, capture_output=True, text=True, timeout=timeout,
                              check=False)

    def start(self, name: str, *args: str) -> subprocess.Popen:
        with self.log_path(name).open("a") as log:  # the child keeps its own copy
            log.write(f"\n=== started {time.strftime('%H:%M:%S')} ===\n")
            log.flush()
            process = subprocess.Popen([sys.executable, "-m", "simulations.cli", *args],
                                       cwd=app_dir(), env=self.env, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        self.processes[name] = process
        return process

    def start_superlink(self) -> subprocess.Popen:
        """The SuperLink on its port, its state (registrations, node ids) in
        ``certs/superlink.db``, so that a restarted one knows every device again."""
        before = self.log("superlink").lower().count("running on https")
        process = self.start("superlink", "deploy", "superlink", "--certs", str(self.certs),
                             "--port", str(self.port))
        wait_for(lambda: self.log("superlink").lower().count("running on https") > before,
                 90, lambda: self.log("superlink"))
        return process

    def start_supernode(self, user: str, *, name: str | None = None, key: str | None = None,
                        ca: Path | None = None, port: int | None = None,
                        rejoin_wait: float = 120, max_wait: float = 30) -> subprocess.Popen:
        return self.start(name or f"node-{user}", "deploy", "supernode",
                          "--user-dir", str(self.user_dirs[user]),
                          "--superlink", self.address,
                          "--port", str(port or self.node_ports[user]),
                          "--ca", str(ca or self.certs / "ca.crt"),
                          "--key", str(self.certs / "supernodes" / (key or user)),
                          "--max-wait", str(max_wait), "--rejoin-wait", str(rejoin_wait),
                          # SuperNodes sharing a small machine: one thread each
                          "--threads", "1")

    def running(self, name: str) -> bool:
        process = self.processes.get(name)
        return process is not None and process.poll() is None

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        process = self.processes.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        process.wait(timeout=30)

    def log_path(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"

    def log(self, name: str) -> str:
        path = self.log_path(name)
        return path.read_text(errors="replace") if path.is_file() else ""

    def node_id(self, user: str) -> int | None:
        """The node id the SuperLink gave ``user``'s key (its SuperNode logs it)."""
        found = SUPERNODE_ID.findall(self.log(f"node-{user}"))
        return int(found[-1]) if found else None

    def stop(self) -> None:
        for name in list(self.processes):
            self.kill(name, signal.SIGTERM if name == "superlink" else signal.SIGKILL)
