"""Deployment credentials and the Flower command lines built from them (no processes)."""

from __future__ import annotations

import ipaddress
import stat
import tomllib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    load_ssh_private_key,
    load_ssh_public_key,
)
from cryptography.x509.oid import ExtensionOID
from flwr.common.config import parse_config_args
from helpers import write_small_population

from shared.config import ConfigError
from simulations.deploy.certs import CredentialsError, write_credentials
from simulations.deploy.command import (
    DeployError,
    app_dir,
    run_command,
    run_config_argument,
    superlink_command,
    supernode_command,
    write_connection,
)


def test_credentials_chain_to_the_ca_and_name_the_hosts(tmp_path):
    paths = write_credentials(tmp_path, supernodes=["alice"], hosts=["127.0.0.1", "localhost",
                                                                     "link.example"])
    ca = x509.load_pem_x509_certificate(paths["ca"].read_bytes())
    server = x509.load_pem_x509_certificate(paths["server-cert"].read_bytes())

    server.verify_directly_issued_by(ca)  # raises if the signature does not check
    names = server.extensions.get_extension_for_oid(
        ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert names.get_values_for_type(x509.DNSName) == ["localhost", "link.example"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for secret in ("ca-key", "server-key", "supernode:alice"):
        assert stat.S_IMODE(paths[secret].stat().st_mode) == 0o600


def test_supernode_keys_are_openssh_ecdsa_pairs(tmp_path):
    paths = write_credentials(tmp_path, supernodes=["alice", "bob"])
    private = load_ssh_private_key(paths["supernode:alice"].read_bytes(), password=None)
    public_line = paths["supernode:alice"].with_suffix(".pub").read_text()
    public = load_ssh_public_key(public_line.encode())

    assert public_line.startswith("ecdsa-sha2-nistp384 ")
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert private.public_key().public_numbers() == public.public_numbers()
    assert paths["supernode:alice"].read_bytes() != paths["supernode:bob"].read_bytes()


def test_credentials_are_never_overwritten(tmp_path):
    first = write_credentials(tmp_path, supernodes=["alice"])
    before = {k: p.read_bytes() for k, p in first.items()}

    again = write_credentials(tmp_path, supernodes=["alice", "carol"])

    assert all(again[k].read_bytes() == v for k, v in before.items())
    assert again["supernode:carol"].is_file()
    with pytest.raises(CredentialsError, match="bad SuperNode name"):
        write_credentials(tmp_path, supernodes=["../evil"])


def test_superlink_command_has_tls_and_node_auth_unless_insecure(tmp_path):
    write_credentials(tmp_path / "certs", supernodes=[])
    secure = superlink_command(tmp_path / "certs", port=9500, database=tmp_path / "db")
    insecure = superlink_command(None)

    assert "--enable-supernode-auth" in secure and "--insecure" not in secure
    assert secure[secure.index("--ssl-certfile") + 1].endswith("server.crt")
    assert secure[secure.index("--port") + 1] == "9500"
    assert "--insecure" in insecure and "--enable-supernode-auth" not in insecure
    with pytest.raises(DeployError, match="missing CA certificate"):
        superlink_command(tmp_path / "nothing-here")


def test_supernode_command_points_at_one_user_directory(tmp_path):
    write_small_population(tmp_path / "pop")
    paths = write_credentials(tmp_path / "certs", supernodes=["u1"])
    command = supernode_command(superlink="10.0.0.1:9100", user_dir=tmp_path / "pop/users/u1",
                                port=9201, ca=paths["ca"], key=paths["supernode:u1"])

    config = command[command.index("--node-config") + 1]
    assert config == f'user-dir="{(tmp_path / "pop/users/u1").resolve()}"'
    assert command[command.index("--root-certificates") + 1] == str(paths["ca"].resolve())
    capped = supernode_command(superlink="h:1", user_dir=tmp_path / "pop/users/u1", port=1,
                               ca=None, key=None, epsilon_budget=4)
    assert parse_config_args([capped[capped.index("--node-config") + 1]]) == {
        "user-dir": str((tmp_path / "pop/users/u1").resolve()), "epsilon-budget": 4.0}
    with pytest.raises(DeployError, match="not a user directory"):
        supernode_command(superlink="h:1", user_dir=tmp_path, port=1, ca=paths["ca"],
                          key=paths["supernode:u1"])
    with pytest.raises(DeployError, match="needs its --key"):
        supernode_command(superlink="h:1", user_dir=tmp_path / "pop/users/u1", port=1,
                          ca=paths["ca"], key=None)


def test_connection_entry_keeps_the_others(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home"))
    paths = write_credentials(tmp_path / "certs", supernodes=[])
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "config.toml").write_text(
        '[superlink]\ndefault = "local"\n[superlink.local]\noptions.num-supernodes = 10\n')

    path = write_connection("fedpersona", "127.0.0.1:9100", ca=paths["ca"])

    config = tomllib.loads(path.read_text())
    assert config["superlink"]["local"] == {"options": {"num-supernodes": 10}}
    assert config["superlink"]["default"] == "local"
    assert config["superlink"]["fedpersona"] == {
        "address": "127.0.0.1:9100", "root-certificates": str(paths["ca"].resolve())}
    with pytest.raises(DeployError, match="host:port"):
        write_connection("x", "localhost", ca=paths["ca"])


def test_run_config_argument_is_typed_toml_and_validated(tmp_path):
    argument = run_config_argument(["model=tiny", "num-rounds=2", "dp=false",
                                    "persona-names=a,b", "target-epsilon=inf"])

    assert argument == ('model="tiny" num-rounds=2 dp=false persona-names="a,b" '
                        "target-epsilon=inf")
    with pytest.raises(ConfigError):
        run_config_argument(["num-round=2"])


def test_run_command_runs_this_app_on_the_named_connection(tmp_path):
    command = run_command(app_dir(), ["num-rounds=1"], connection="lab")

    assert command[1:] == ["run", str(app_dir()), "lab", "--stream", "--run-config",
                           "num-rounds=1"]
    with pytest.raises(DeployError, match="not the fedpersona app directory"):
        run_command(tmp_path, ["num-rounds=1"])


def test_environment_finds_flowers_helpers_without_an_activated_virtualenv(monkeypatch):
    import sys
    from pathlib import Path

    from simulations.deploy.command import environment

    monkeypatch.setenv("PATH", "/usr/bin")
    env = environment()

    assert env["PATH"].split(":")[0] == str(Path(sys.executable).parent)
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"


def test_thread_limits_cap_openmp_and_mkl():
    from simulations.deploy.command import thread_limits

    assert thread_limits(None) == {}
    assert thread_limits(1) == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with pytest.raises(DeployError, match="--threads"):
        thread_limits(0)


def test_a_supernode_that_reconnects_after_activating_is_started_again(tmp_path, capsys):
    """Flower 1.42: a SuperNode that outlives a SuperLink restart is never heard again (no
    heartbeat); the supervisor starts it anew. A stand-in prints what Flower prints."""
    import signal
    import sys

    from simulations.deploy.command import supervise_supernode

    runs = tmp_path / "runs"
    stand_in = tmp_path / "supernode.py"
    stand_in.write_text(
        "import pathlib, sys, time\n"
        f"runs = pathlib.Path({str(runs)!r})\n"
        "n = len(runs.read_text()) if runs.exists() else 0\n"
        "runs.write_text('x' * (n + 1))\n"
        "print('Connection successful after 2.1 seconds and 3 tries.', flush=True)\n"
        "print('SuperNode ID: 42', flush=True)\n"
        "if n == 0:\n"
        "    print('Connection successful after 10.87 seconds and 5 tries.', flush=True)\n"
        "    time.sleep(60)\n"
        "sys.exit(0)\n")

    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = supervise_supernode([sys.executable, str(stand_in)], rejoin_wait=30)
    finally:  # it forwards signals to its SuperNode: give pytest its own back
        for signum, handler in handlers.items():
            signal.signal(signum, handler)

    assert code == 0 and runs.read_text() == "xx"  # stopped once, started again, done
    assert "starting the SuperNode again" in capsys.readouterr().out
