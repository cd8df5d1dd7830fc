"""A throwaway certificate authority for TLS tests (QEMU's x509 directory layout)."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kvmflow.kvm import KvmHypervisor
from kvmflow.kvm.tls import MigrationTLS


@dataclass
class ClientCredentials:
    ca_cert: Path
    cert: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: str,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    usage: x509.ObjectIdentifier | None = None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        key_path = path.with_name(path.name.replace("-cert.pem", "-key.pem"))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
        )
        key_path.chmod(0o600)


def make_x509_dir(server_dir: Path, client_dir: Path, server_name: str) -> ClientCredentials:
    """Write ca-cert.pem, server-cert.pem and server-key.pem into ``server_dir`` (the layout
    QEMU's tls-creds-x509 reads) and a client certificate of the same CA into ``client_dir``."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _issue("kvmflow test CA", ca_key, "kvmflow test CA", ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _issue(
        server_name, server_key, "kvmflow test CA", ca_key, usage=ExtendedKeyUsageOID.SERVER_AUTH
    )
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _issue(
        "vnc-viewer", client_key, "kvmflow test CA", ca_key, usage=ExtendedKeyUsageOID.CLIENT_AUTH
    )
    for directory in (server_dir, client_dir):
        directory.mkdir(parents=True, exist_ok=True)
        _write(directory / "ca-cert.pem", ca, None)
    _write(server_dir / "server-cert.pem", server, server_key)
    _write(client_dir / "client-cert.pem", client, client_key)
    return ClientCredentials(
        client_dir / "ca-cert.pem", client_dir / "client-cert.pem", client_dir / "client-key.pem"
    )


def make_migration_credentials(directories: dict[str, Path], ca_name: str = "migration CA") -> None:
    """One CA, and for each node (name -> directory) the five files of QEMU's layout:
    ``ca-cert.pem``, a server certificate for the node's name, and a client certificate."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _issue(ca_name, ca_key, ca_name, ca_key, ca=True)
    for node, directory in directories.items():
        directory.mkdir(parents=True, exist_ok=True)
        _write(directory / "ca-cert.pem", ca, None)
        server_key = ec.generate_private_key(ec.SECP256R1())
        server = _issue(node, server_key, ca_name, ca_key, usage=ExtendedKeyUsageOID.SERVER_AUTH)
        _write(directory / "server-cert.pem", server, server_key)
        client_key = ec.generate_private_key(ec.SECP256R1())
        client = _issue(node, client_key, ca_name, ca_key, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
        _write(directory / "client-cert.pem", client, client_key)


def give_credentials(hypervisors: Iterable[KvmHypervisor], directory: Path) -> None:
    """One CA's migration credentials for each hypervisor's node, under ``directory``."""
    by_node = {hv.node.name: hv for hv in hypervisors}
    dirs = {name: directory / name for name in by_node}
    make_migration_credentials(dirs)
    for name, hv in by_node.items():
        hv.migration_tls = MigrationTLS(str(dirs[name]))


def make_etcd_credentials(directory: Path, addresses: Iterable[str], ca_name: str) -> None:
    """A CA (``ca-cert.pem``), a server certificate for ``addresses`` (IP SANs:
    ``server-cert.pem``/``-key.pem``) and a client certificate (``client-cert.pem``/
    ``-key.pem``) of it, for an etcd cluster with client certificate authentication."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _issue(ca_name, ca_key, ca_name, ca_key, ca=True)
    _write(directory / "ca-cert.pem", ca, None)
    now = datetime.datetime.now(datetime.UTC)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(_name("etcd"))
        .issuer_name(_name(ca_name))
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write(directory / "server-cert.pem", server, server_key)
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _issue("kvmflow", client_key, ca_name, ca_key, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    _write(directory / "client-cert.pem", client, client_key)
