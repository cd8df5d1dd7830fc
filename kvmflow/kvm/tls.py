"""A node's migration TLS credentials, in QEMU's ``tls-creds-x509`` directory layout.

The directory (on that node) holds ``ca-cert.pem`` (the CA both ends trust),
``server-cert.pem``/``server-key.pem`` (used when the node is a migration target) and
``client-cert.pem``/``client-key.pem`` (when it is the source). How a migration uses them is
:mod:`kvmflow.migration.tls`.
"""

from __future__ import annotations

from dataclasses import dataclass

#: The files each endpoint reads from the directory.
FILES = {
    "server": ("ca-cert.pem", "server-cert.pem", "server-key.pem"),
    "client": ("ca-cert.pem", "client-cert.pem", "client-key.pem"),
}


@dataclass(frozen=True)
class MigrationTLS:
    """A node's migration TLS: its credentials directory, whether as a target it requires
    the source's client certificate, and the name its server certificate carries (the source
    checks it; default: the node's name)."""

    directory: str
    verify_peer: bool = True
    hostname: str | None = None
