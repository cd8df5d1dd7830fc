"""What really runs: every node asked for every copy of an instance, before anything is
started or recovered (reality first; the store's record second, the config file last).

A :class:`Copy` is one QEMU of an instance on one node, with its run state and migration
status as that QEMU says them over HMP (QMP may be held by the operation in flight); an
instance with no process but files left behind shows up with :attr:`Copy.state` ``failed``
and the files named. The nodes are asked concurrently, each answer bounded in time, so one
slow node does not hold the others up.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio

from kvmflow._logging import get_logger
from kvmflow.errors import KvmflowError, ValidationError
from kvmflow.kvm.hypervisor import KvmHypervisor
from kvmflow.kvm.spec import check_instance_name
from kvmflow.migration.hmp_monitor import HmpMigrationMonitor
from kvmflow.monitor.hmp import HMPClient
from kvmflow.monitor.queries import RunState, Status, query_status

_log = get_logger("kvmflow.engine")

#: How long one QEMU may take to say its state before it counts as unreachable.
ASK_TIMEOUT = 5.0


class CopyState(enum.StrEnum):
    """One copy's state as ``kvmflow list`` shows it."""

    RUNNING = "running"
    PAUSED = "paused"
    POSTMIGRATE = "postmigrate"  # a migration source that sent everything
    INMIGRATE = "inmigrate"  # a migration target that has not got the guest yet
    PRELAUNCH = "prelaunch"
    FINISH_MIGRATE = "finish-migrate"
    OTHER = "other"  # shutdown, internal-error, guest-panicked, ...
    UNREACHABLE = "unreachable"  # a process whose monitor does not answer
    FAILED = "failed"  # no process, files left behind (it crashed or was killed)


#: Copies that hold (or may hold) the guest's current state.
HOLDS_GUEST: frozenset[CopyState] = frozenset(
    {CopyState.RUNNING, CopyState.PAUSED, CopyState.OTHER, CopyState.UNREACHABLE}
)

_FROM_RUN_STATE = {
    RunState.RUNNING: CopyState.RUNNING,
    RunState.PAUSED: CopyState.PAUSED,
    RunState.POSTMIGRATE: CopyState.POSTMIGRATE,
    RunState.INMIGRATE: CopyState.INMIGRATE,
    RunState.PRELAUNCH: CopyState.PRELAUNCH,
    RunState.FINISH_MIGRATE: CopyState.FINISH_MIGRATE,
}


@dataclass(frozen=True)
class Copy:
    """One QEMU of ``instance`` on ``node`` (or, when ``failed``, the files one left)."""

    instance: str
    node: str
    state: CopyState
    pid: int | None = None
    migration: str | None = None  # query-migrate's status, if any migration ran
    stale_files: tuple[str, ...] = field(default=())

    @property
    def holds_guest(self) -> bool:
        return self.state in HOLDS_GUEST

    @property
    def alive(self) -> bool:
        return self.state is not CopyState.FAILED


async def look(hypervisor: KvmHypervisor, name: str) -> Copy | None:
    """The copy of ``name`` on ``hypervisor``'s node: its QEMU asked for its run state and
    migration status; ``failed`` with the stale files if only files are left; None if
    nothing of it is there."""
    node = hypervisor.node.name
    pid = await hypervisor.find_pid(name)
    if pid is None:
        stale = [p for p in hypervisor.paths.instance_files(name) if await _exists(hypervisor, p)]
        return Copy(name, node, CopyState.FAILED, stale_files=tuple(stale)) if stale else None
    # Asked over the spare QMP socket, else HMP: an operation in flight (a migration)
    # holds the first QMP socket, which serves one client at a time, and this look must
    # not wait for it to end.
    try:
        status, answer = await _ask_spare_qmp(hypervisor, name)
    except (KvmflowError, TimeoutError, OSError):
        connector = hypervisor.node.monitor_connector(hypervisor.paths.hmp_socket(name))
        try:
            with anyio.fail_after(ASK_TIMEOUT):
                async with HMPClient(connector, command_timeout=ASK_TIMEOUT) as hmp:
                    monitor = HmpMigrationMonitor(hmp)
                    status = await query_status(monitor)
                    answer = await monitor.execute("query-migrate")
        except (KvmflowError, TimeoutError, OSError) as exc:
            _log.warning("copy did not say its state", instance=name, node=node, error=str(exc))
            return Copy(name, node, CopyState.UNREACHABLE, pid)
    migration = answer.get("status") if isinstance(answer, dict) else None
    state = _FROM_RUN_STATE.get(status.state, CopyState.OTHER)
    return Copy(name, node, state, pid, str(migration) if migration else None)


async def _ask_spare_qmp(hypervisor: KvmHypervisor, name: str) -> tuple[Status, Any]:
    """Run state and migration status over the spare QMP socket (briefly: a recovery may
    hold it, and then HMP answers instead)."""
    connector = hypervisor.node.monitor_connector(hypervisor.paths.takeover_socket(name))
    with anyio.fail_after(ASK_TIMEOUT / 2):
        async with hypervisor.qmp_client_type(
            connector, connect_timeout=ASK_TIMEOUT / 2, command_timeout=ASK_TIMEOUT / 2
        ) as qmp:
            return await query_status(qmp), await qmp.execute("query-migrate")


async def _exists(hypervisor: KvmHypervisor, path: str) -> bool:
    return await hypervisor.node.path_kind(path) is not None


async def known_names(hypervisor: KvmHypervisor) -> set[str]:
    """Every instance the node has a process or files of (running or not)."""
    names = set(await hypervisor.node.list_dir(hypervisor.paths.dir("pid")))
    names |= {
        n.removesuffix(".runtime")
        for n in await hypervisor.node.list_dir(hypervisor.paths.dir("conf"))
        if n.endswith(".runtime")
    }
    return {n for n in names if _valid_name(n)}


def _valid_name(name: str) -> bool:
    try:
        check_instance_name(name)
    except ValidationError:
        return False  # not a file kvmflow wrote
    return True


async def survey(
    hypervisors: Mapping[str, KvmHypervisor], names: Iterable[str] = ()
) -> dict[str, list[Copy]]:
    """Every copy of every instance on every node: of ``names``, and of whatever else the
    nodes hold. Nodes (and instances) are asked concurrently."""
    wanted = set(names)
    found: dict[str, list[Copy]] = {}

    async def on_node(hv: KvmHypervisor) -> None:
        try:
            here = wanted | await known_names(hv)
        except KvmflowError as exc:
            _log.warning("node could not be listed", node=hv.node.name, error=str(exc))
            here = wanted

        async def one(name: str) -> None:
            try:
                copy = await look(hv, name)
            except KvmflowError as exc:  # the node cannot be asked now: say so, go on
                _log.warning("copy could not be looked at", node=hv.node.name, error=str(exc))
                return
            if copy is not None:
                found.setdefault(name, []).append(copy)

        async with anyio.create_task_group() as tg:
            for name in sorted(here):
                tg.start_soon(one, name)

    async with anyio.create_task_group() as tg:
        for hv in hypervisors.values():
            tg.start_soon(on_node, hv)
    for copies in found.values():
        copies.sort(key=lambda c: c.node)
    return found


__all__ = ["HOLDS_GUEST", "Copy", "CopyState", "known_names", "look", "survey"]
