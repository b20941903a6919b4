"""``fedpersona deploy``: Flower's Deployment Engine with TLS and SuperNode authentication.

Thin wrappers that build the command lines of Flower's own ``flower-superlink``,
``flower-supernode`` and ``flwr`` and run them; nothing here speaks the protocol.

Flower 1.42 facts this relies on (checked here): the SuperLink serves Fleet,
Control and Runtime APIs on one HTTPS port; a SuperNode needs its own
``--port`` for its local Runtime API; SuperNode keys are ECDSA keys in OpenSSH
format, registered with ``flwr supernode register KEY.pub <connection>`` before
the node connects (an unregistered one exits with Flower exit code 305); a
node keeps its id across restarts because the id is bound to its key; every
message starts a fresh ``flwr-clientapp`` process (no long-lived ClientApp).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path

from shared.config import RunConfig, parse_overrides

DEFAULT_PORT = 9100
DEFAULT_CONNECTION = "fedpersona"
ENV = {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}


class DeployError(ValueError):
    """A deployment step cannot run as asked (missing credential, bad address, ...)."""


def _require(path: Path, what: str) -> Path:
    if not Path(path).is_file():
        raise DeployError(f"{path}: missing {what} (make it with 'fedpersona deploy certs')")
    return Path(path).resolve()


def _executable(name: str) -> str:
    """Flower's entry points from this interpreter's environment, else the PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise DeployError(f"{name} not found: is flwr installed in this environment?")
    return found


def superlink_command(certs: Path | None, *, host: str = "127.0.0.1",
                      port: int = DEFAULT_PORT, database: Path | None = None) -> list[str]:
    """``certs=None``: plain HTTP and no node authentication (local experiments only)."""
    command = [_executable("flower-superlink"), "--host", host, "--port", str(port),
               "--disable-runtime-dependency-installation"]
    if certs is None:
        command.append("--insecure")
    else:
        certs = Path(certs)
        command += ["--ssl-ca-certfile", str(_require(certs / "ca.crt", "CA certificate")),
                    "--ssl-certfile", str(_require(certs / "server.crt", "server certificate")),
                    "--ssl-keyfile", str(_require(certs / "server.key", "server key")),
                    "--enable-supernode-auth"]
    if database is not None:  # registrations and node ids survive a SuperLink restart
        Path(database).parent.mkdir(parents=True, exist_ok=True)
        command += ["--database", str(Path(database).resolve())]
    return command


def supernode_command(*, superlink: str, user_dir: Path, port: int, ca: Path | None,
                      key: Path | None, max_wait: float | None = None,
                      epsilon_budget: float | None = None) -> list[str]:
    """One device: its user directory is the only data its ClientApp reads;
    ``epsilon_budget``, the device's own cap on its lifetime spending."""
    user_dir = Path(user_dir).expanduser().resolve()
    if not (user_dir / "profile.json").is_file():
        raise DeployError(f"{user_dir}: not a user directory (no profile.json)")
    node_config = f"user-dir={json.dumps(str(user_dir))}"
    if epsilon_budget is not None:
        node_config += f" epsilon-budget={float(epsilon_budget)!r}"
    command = [_executable("flower-supernode"), "--superlink", superlink, "--port", str(port),
               "--node-config", node_config]
    if ca is None:
        command.append("--insecure")
    else:
        command += ["--root-certificates", str(_require(Path(ca), "CA certificate"))]
        if key is None:
            raise DeployError("a SuperNode with TLS needs its --key (node authentication)")
        command += ["--auth-supernode-private-key", str(_require(Path(key), "SuperNode key"))]
    if max_wait is not None:
        command += ["--max-wait-time", str(max_wait)]
    return command


def flwr_home() -> Path:
    return Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr"))


def write_connection(name: str, address: str, *, ca: Path | None) -> Path:
    """Add (or replace) the ``[superlink.<name>]`` entry of ``$FLWR_HOME/config.toml``,
    keeping every other entry."""
    import tomli_w

    if ":" not in address:
        raise DeployError(f"SuperLink address {address!r} needs host:port")
    path = flwr_home() / "config.toml"
    try:
        config = tomllib.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise DeployError(f"{path}: malformed TOML ({err})") from None
    entry: dict[str, object] = {"address": address}
    if ca is None:
        entry["insecure"] = True
    else:
        entry["root-certificates"] = str(_require(Path(ca), "CA certificate"))
    config.setdefault("superlink", {})[name] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(".toml.tmp")
    staging.write_text(tomli_w.dumps(config))
    staging.replace(path)
    return path


def register_command(public_key: Path, connection: str = DEFAULT_CONNECTION) -> list[str]:
    return [_executable("flwr"), "supernode", "register",
            str(_require(Path(public_key), "SuperNode public key")), connection]


def run_config_argument(settings: Sequence[str]) -> str:
    """``key=value`` overrides as ``flwr run --run-config`` wants them (TOML values),
    validated against :class:`RunConfig` first so a typo fails here, not on the server."""
    values = parse_overrides(settings)
    typed = RunConfig.from_mapping(values).to_flower()
    keys = [key.replace("_", "-") for key in values]
    return " ".join(f"{key}={_toml_value(typed[key])}" for key in keys)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return json.dumps(value)
    return str(value)


def run_command(app_dir: Path, settings: Sequence[str], *,
                connection: str = DEFAULT_CONNECTION, stream: bool = True) -> list[str]:
    if not (Path(app_dir) / "pyproject.toml").is_file():
        raise DeployError(f"{app_dir}: not the fedpersona app directory (no pyproject.toml)")
    command = [_executable("flwr"), "run", str(app_dir), connection]
    if stream:
        command.append("--stream")
    if settings:
        command += ["--run-config", run_config_argument(settings)]
    return command


def app_dir() -> Path:
    """The checkout this module runs from (``flwr run`` packages it as the app)."""
    return Path(__file__).resolve().parents[2]


def environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment, with Flower's runtime installs off and this interpreter's
    ``bin`` first on PATH: Flower starts ``flower-superexec`` and ``flwr-clientapp``
    by name, which fails from a virtualenv that is used but not activated."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, **ENV, "PATH": path, **(extra or {})}


def thread_limits(threads: int | None) -> dict[str, str]:
    """Environment that caps the BLAS/OpenMP threads of the SuperNode's ClientApps. A
    device uses all its cores (``None``); SuperNodes that share a machine should split
    them: three 2-thread ClientApps on 2 cores trained 3x slower here than 1-thread ones."""
    if threads is None:
        return {}
    if threads < 1:
        raise DeployError(f"--threads must be >= 1, got {threads}")
    return {name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}


# Flower 1.42's SuperNode prints these: its node id once activated, and this after it
# reconnects to a SuperLink it had lost
ACTIVATED = "SuperNode ID:"
RECONNECTED = "Connection successful after"


def supervise_supernode(command: list[str], *, rejoin_wait: float,
                        extra_env: Mapping[str, str] | None = None,
                        retry_every: float = 5.0) -> int:
    """Run a SuperNode; if it is refused at start, try again for ``rejoin_wait`` seconds;
    if it lost its SuperLink and reconnected, start it again.

    A device that crashed (no goodbye) stays "online" at the SuperLink until its
    heartbeat expires (about 60 s in Flower 1.42), and Flower refuses to activate
    the same key meanwhile (exit code 305, no retry of its own). Retrying lets a
    restarted device rejoin by itself; an unregistered key is refused on every try.

    A SuperNode that outlives a SuperLink restart reconnects and keeps pulling
    messages, but the new SuperLink never hears its heartbeat again: it answers every
    message to it with "Node Unavailable", so the node is never counted (seen in the
    soak, ``fedpersona deploy soak``). Started again, it activates anew.
    SIGINT and SIGTERM are passed on to the SuperNode."""
    deadline = time.monotonic() + rejoin_wait
    child: subprocess.Popen | None = None

    def forward(signum, _frame):
        if child is not None and child.poll() is None:
            child.send_signal(signum)
        raise SystemExit(128 + signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, forward)
    print("+ " + " ".join(command), flush=True)
    while True:
        started = time.monotonic()
        child = subprocess.Popen(command, env=environment(extra_env), stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, errors="replace")
        if _relay_until_reconnected(child):
            child.terminate()
            child.wait()
            print("fedpersona: the SuperLink came back; starting the SuperNode again so "
                  "that it activates anew", flush=True)
            deadline = time.monotonic() + rejoin_wait
            continue
        code = child.wait()
        refused_at_start = code != 0 and time.monotonic() - started < 30
        if not refused_at_start or time.monotonic() + retry_every > deadline:
            return code
        print(f"fedpersona: SuperNode refused (exit {code}); retrying in {retry_every:g} s "
              f"(a crashed session is held until its heartbeat expires)", flush=True)
        time.sleep(retry_every)


def _relay_until_reconnected(child: subprocess.Popen) -> bool:
    """Pass the SuperNode's output on until it exits; True as soon as it reconnects after
    activating. The output is read by a thread: the SuperNode's own children inherit the
    pipe and may keep it open after it exits."""
    reconnected = threading.Event()

    def relay() -> None:
        activated = False
        assert child.stdout is not None
        for line in child.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            activated = activated or ACTIVATED in line
            if activated and RECONNECTED in line:
                reconnected.set()

    threading.Thread(target=relay, daemon=True).start()
    while child.poll() is None:
        if reconnected.wait(0.5):
            return True
    return False


def exec_command(command: list[str]) -> None:
    """Replace this process with ``command``: signals then reach Flower directly."""
    print("+ " + " ".join(command), flush=True)
    os.execve(command[0], command, environment())
