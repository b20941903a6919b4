"""Credentials for a deployment: a self-signed CA, the SuperLink's TLS certificate, and
one key pair per SuperNode for Flower's node authentication.

Python ``cryptography`` only (no openssl on the path needed). Layout of
``fedpersona deploy certs --out DIR``::

    DIR/ca.crt, DIR/ca.key            the CA (keep ca.key offline)
    DIR/server.crt, DIR/server.key    the SuperLink's certificate (SANs: the hosts given)
    DIR/supernodes/<name>             a SuperNode's private key (OpenSSH, ECDSA P-384)
    DIR/supernodes/<name>.pub         its public key, registered with
                                      ``flwr supernode register <name>.pub <federation>``

Private keys are written with mode 0600; nothing existing is overwritten.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS = ("127.0.0.1", "localhost")
VALID_DAYS = 365
SUPERNODE_DIR = "supernodes"
COMMON_NAME_MAX = 64  # X.509's ub-common-name; the first host is the common name


class CredentialsError(ValueError):
    """A credential cannot be made as asked (a bad SuperNode name or host)."""


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedpersona"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _subject_alternative_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def make_ca(*, days: int = VALID_DAYS) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name("fedpersona CA"))
            .issuer_name(_name("fedpersona CA")).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA384()))
    return key, cert


def make_server_cert(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
                     hosts: Sequence[str] = DEFAULT_HOSTS, *, days: int = VALID_DAYS
                     ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    _check_hosts(hosts)
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(hosts[0]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(_subject_alternative_names(hosts)),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA384()))
    return key, cert


def _check_hosts(hosts: Sequence[str]) -> None:
    if not hosts:
        raise CredentialsError("the server certificate needs at least one host name or IP")
    for host in hosts:
        if not host or not host.isascii():
            raise CredentialsError(f"bad host {host!r}: give an IP or an ASCII host name "
                                   "(punycode for others)")
    if len(hosts[0]) > COMMON_NAME_MAX:
        raise CredentialsError(f"host {hosts[0]!r} is longer than {COMMON_NAME_MAX} "
                               "characters: the first host names the certificate; give a "
                               "shorter one first")


def _check_supernode_name(name: str) -> None:
    if not name or "/" in name or name.startswith("."):
        raise CredentialsError(f"bad SuperNode name {name!r}")


def make_supernode_keys(comment: str) -> tuple[bytes, bytes]:
    """(private key in OpenSSH PEM, public key line ``ecdsa-sha2-nistp384 ... comment``)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    return private, public + f" {comment}\n".encode()


def _write_new(path: Path, data: bytes, *, private: bool) -> None:
    """Create ``path`` exclusively (never overwrite a credential), 0600 for secrets."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write_credentials(out: Path, *, supernodes: Sequence[str],
                      hosts: Sequence[str] = DEFAULT_HOSTS) -> dict[str, Path]:
    """CA and server certificate (made once; kept if present) and a key pair for each
    named SuperNode that has none yet. Returns the paths written or found."""
    for name in supernodes:  # every argument checked before anything is written
        _check_supernode_name(name)
    out = Path(out)
    paths = {"ca": out / "ca.crt", "ca-key": out / "ca.key", "server-cert": out / "server.crt",
             "server-key": out / "server.key"}
    if not paths["ca"].exists():
        ca_key, ca_cert = make_ca()
        server_key, server_cert = make_server_cert(ca_key, ca_cert, hosts)
        _write_new(paths["ca-key"], _key_pem(ca_key), private=True)
        _write_new(paths["ca"], _pem(ca_cert), private=False)
        _write_new(paths["server-key"], _key_pem(server_key), private=True)
        _write_new(paths["server-cert"], _pem(server_cert), private=False)
    for name in supernodes:
        private_path = out / SUPERNODE_DIR / name
        if not private_path.exists():
            private, public = make_supernode_keys(f"fedpersona-{name}")
            _write_new(private_path, private, private=True)
            _write_new(private_path.with_suffix(".pub"), public, private=False)
        paths[f"supernode:{name}"] = private_path
    return paths
