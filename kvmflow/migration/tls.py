"""Encrypted migration streams: QEMU's ``tls-creds-x509`` on both ends of a migration.

Each node's credentials are a :class:`~kvmflow.kvm.tls.MigrationTLS` directory. For one
migration, the target's QEMU gets a server endpoint (verifying the source's client
certificate when the node asks for it), the source's a client endpoint with the name the
target's certificate must carry (``tls-hostname``), both through ``object-add`` and the
``tls-creds`` migration parameter, so that nothing about TLS is fixed in the saved argv.
A source that keeps the guest (an abort) drops both again.
"""

from __future__ import annotations

import contextlib
from typing import Literal

from kvmflow.errors import KvmflowError
from kvmflow.kvm.tls import MigrationTLS
from kvmflow.monitor.queries import CommandRunner

#: The QOM id of the credentials object kvmflow adds to a QEMU for a migration.
CREDS_ID = "kvmflow-migration-tls"


async def enable(
    qmp: CommandRunner,
    tls: MigrationTLS,
    endpoint: Literal["server", "client"],
    *,
    hostname: str | None = None,
) -> None:
    """Give the QEMU behind ``qmp`` the credentials object and make its next migration
    (or incoming one) use it; a leftover object of an earlier migration is replaced."""
    await disable(qmp)
    await qmp.execute(
        "object-add",
        {
            "qom-type": "tls-creds-x509",
            "id": CREDS_ID,
            "dir": tls.directory,
            "endpoint": endpoint,
            "verify-peer": tls.verify_peer if endpoint == "server" else True,
        },
    )
    parameters = {"tls-creds": CREDS_ID}
    if hostname is not None:
        parameters["tls-hostname"] = hostname
    await qmp.execute("migrate-set-parameters", parameters)


async def disable(qmp: CommandRunner) -> None:
    """Plain streams again: empty ``tls-creds`` and no credentials object."""
    await qmp.execute("migrate-set-parameters", {"tls-creds": "", "tls-hostname": ""})
    with contextlib.suppress(KvmflowError):  # none was there
        await qmp.execute("object-del", {"id": CREDS_ID})
