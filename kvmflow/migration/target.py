"""The target side of one migration: its QEMU, started to listen, watched and stopped.

The target QEMU starts from the source's saved runtime with ``-incoming defer``; that it
listens is confirmed by asking its monitor (``query-migrate`` shows the socket address,
``query-status`` says ``inmigrate``), never by connecting to the port, which makes QEMU
exit. Its monitor connection, once opened, is kept to the end of the migration.
"""

from __future__ import annotations

import contextlib

import anyio

from kvmflow._logging import get_logger
from kvmflow.errors import CommandError, ContUnanswered, KvmflowError
from kvmflow.kvm.hypervisor import KvmHypervisor
from kvmflow.kvm.runtime import SavedRuntime
from kvmflow.kvm.spec import InstanceSpec
from kvmflow.migration import tls
from kvmflow.migration.errors import MigrationError
from kvmflow.migration.policy import MigrationPolicy
from kvmflow.monitor.connection import ConnectionState
from kvmflow.monitor.qmp import QMPClient
from kvmflow.monitor.queries import RunState, query_status

_log = get_logger("kvmflow.migration")


def uri_host(address: str) -> str:
    """``address`` as the host part of a ``tcp:`` URI (IPv6 literals in brackets)."""
    return f"[{address}]" if ":" in address and not address.startswith("[") else address


def listening_port(listening: object, wanted: int) -> int | None:
    """The TCP port the target's ``query-migrate`` says it listens on: ``wanted``, or, when
    ``wanted`` is 0 (any free port), the one it picked. None when it does not listen."""
    addresses = listening.get("socket-address", []) if isinstance(listening, dict) else []
    for address in addresses if isinstance(addresses, list) else []:
        text = str(address.get("port")) if isinstance(address, dict) else ""
        port = int(text) if text.isdigit() else 0
        if port > 0 and wanted in (0, port):
            return port
    return None


def errors_only(log: str, limit: int = 1024) -> str:
    """QEMU's error lines from its log, without the warnings every start prints (a CPU
    feature the host lacks), the last ``limit`` characters of them."""
    lines = [line for line in log.splitlines() if line.strip() and ": warning: " not in line]
    return "\n".join(lines)[-limit:]


class MigrationTarget:
    """One migration's target QEMU on ``hypervisor``, listening on ``address:port``."""

    def __init__(
        self,
        hypervisor: KvmHypervisor,
        name: str,
        address: str,
        port: int,
        policy: MigrationPolicy,
        stack: contextlib.AsyncExitStack,
    ) -> None:
        self.hypervisor = hypervisor
        self.name = name
        self.address = address
        self.port = port
        self.uri = f"tcp:{uri_host(address)}:{port}"
        self.policy = policy
        self.started = False  # from here on, the target may hold a process or files
        self.last_words = ""  # what its QEMU logged before it was stopped (why it failed)
        self._stack = stack
        self._qmp: QMPClient | None = None
        self._log = _log.bind(instance=name, target=hypervisor.node.name)

    @property
    def node_name(self) -> str:
        return self.hypervisor.node.name

    async def start(self, spec: InstanceSpec, runtime: SavedRuntime, source_node: str) -> None:
        """Start the target QEMU and make it listen; raise if it cannot."""
        self.started = True
        await self.hypervisor.start(spec, runtime=runtime, incoming="defer")
        qmp = await self.monitor()
        capabilities = self.policy.target_capabilities()
        if capabilities:
            await qmp.execute("migrate-set-capabilities", {"capabilities": capabilities})
        parameters = self.policy.target_parameters()
        if parameters:
            await qmp.execute("migrate-set-parameters", parameters)
        if self.policy.tls:
            assert self.hypervisor.migration_tls is not None  # the pre-check made sure
            await tls.enable(qmp, self.hypervisor.migration_tls, "server")
        try:
            await qmp.execute("migrate-incoming", {"uri": self.uri})
        except KvmflowError as exc:
            raise MigrationError(
                self.name,
                f"target cannot listen on {self.address}:{self.port}: {exc}",
                runs_on=source_node,
            ) from exc
        listening = await qmp.execute("query-migrate")
        status = await query_status(qmp)
        port = listening_port(listening, self.port)
        if status.state is not RunState.INMIGRATE or port is None:
            raise MigrationError(
                self.name,
                f"target is not listening on {self.uri} "
                f"(status {status.state.value}, {listening!r})",
                runs_on=source_node,
            )
        if self.port == 0:  # the target picked the port: from now on, use the one it picked
            self.port, self.uri = port, f"tcp:{uri_host(self.address)}:{port}"
        self._log.info("target listening", uri=self.uri)

    async def monitor(self) -> QMPClient:
        """The target's QMP connection, opened on first use and kept until the end."""
        if self._qmp is None:
            self._qmp = await self._stack.enter_async_context(
                self.hypervisor.qmp(self.name, command_timeout=self.policy.query_timeout)
            )
        elif self._qmp.state is ConnectionState.LOST:
            await self._qmp.reconnect()
        return self._qmp

    async def take_over(self, was_running: bool) -> None:
        """Wait until the target has loaded the guest, then start its vCPUs if the guest
        was running. Raises :class:`ContUnanswered` when ``cont`` went unanswered."""
        qmp = await self.monitor()
        with anyio.fail_after(self.policy.target_ready_timeout):
            status = await query_status(qmp)
            while status.state is RunState.INMIGRATE:
                await anyio.sleep(0.02)
                status = await query_status(qmp)
        if was_running and not status.running:
            try:
                await qmp.execute("cont")
            except CommandError:
                raise  # QEMU refused: the vCPUs did not start
            except KvmflowError as exc:
                raise ContUnanswered(
                    f"the target on {self.node_name} may have run the guest: its answer to "
                    f"'cont' was lost ({exc})"
                ) from exc

    async def recover(self) -> None:
        """Listen again for a broken post-copy stream (``migrate-recover``)."""
        qmp = await self.monitor()
        await qmp.execute("migrate-recover", {"uri": self.uri}, timeout=10)

    async def stop(self) -> None:
        """Kill the target QEMU and remove its files (it holds no guest state of its own)."""
        if not self.started:
            return
        try:
            self.last_words = errors_only(await self.hypervisor.qemu_log(self.name))
            await self.hypervisor.stop(self.name, force=True)
        except KvmflowError as exc:
            self._log.error("target could not be cleaned", error=str(exc))
        else:
            self.started = False

    async def is_running(self) -> bool:
        return await self.hypervisor.is_running(self.name)
