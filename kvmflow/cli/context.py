"""What every ``kvmflow`` command shares: the loaded configuration with one hypervisor per
node, the store, output (tables never read text from outside as markup, ``--json``), the
progress bars, and how a command ends (its nodes closed; SIGTERM cancels like Ctrl-C)."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import anyio
from rich.console import Console, RenderableType
from rich.table import Table
from rich.text import Text

from kvmflow.cli.config import Config
from kvmflow.cli.progress import MigrationBars
from kvmflow.engine import Engine, Limits, NodeEntry
from kvmflow.errors import ConfigError, FieldProblem, NodeNotHeldError
from kvmflow.instance import Instance
from kvmflow.instance.guard import OperationGuard
from kvmflow.kvm import KvmHypervisor, RuntimePaths, default_accelerator
from kvmflow.kvm.spec import InstanceSpec
from kvmflow.migration import MigrationPolicy
from kvmflow.node import LocalNode, SSHNode
from kvmflow.store import DEFAULT_PATH, Owner, SQLiteStore
from kvmflow.store.etcd import EtcdStore
from kvmflow.store.url import etcd_target, is_etcd, sqlite_path

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_PARTIAL = 0, 1, 2, 3
T = TypeVar("T")


class Context:
    """The loaded configuration, one hypervisor per node, and where the store is."""

    def __init__(
        self, config: Config, console: Console, *, as_json: bool, store_path: str | None = None
    ) -> None:
        self.config = config
        self.console = console
        self.as_json = as_json
        self.store_path = resolve_store_path(store_path, config)
        accel = default_accelerator()
        self.hypervisors = {
            name: KvmHypervisor(
                SSHNode(name, node.ssh) if node.ssh else LocalNode(name),
                RuntimePaths(node.runtime_root),
                default_accelerator=accel,
                qemu_binary=node.qemu_binary,
                migration_tls=node.migration_tls,
            )
            for name, node in config.nodes.items()
        }

    def run(self, command: Callable[..., Awaitable[int]], *args: Any) -> int:
        """Run one command, then close the nodes' connections (SSH), whatever happens."""

        async def closing() -> int:
            try:
                return await until_terminated(command, *args)
            finally:
                with anyio.CancelScope(shield=True):
                    for hv in self.hypervisors.values():
                        await hv.node.aclose()

        return anyio.run(closing)

    def located_running(self, name: str) -> KvmHypervisor | None:
        """Where ``name`` runs now (None: nowhere), asked in one event loop of its own."""

        async def ask() -> int:
            hv = await self.locate(name)
            found.append(hv if await hv.is_running(name) else None)
            return EXIT_OK

        found: list[KvmHypervisor | None] = []
        self.run(ask)
        return found[0]

    @property
    def clustered(self) -> bool:
        """Whether the store is etcd: a cluster of controllers shares the fleet."""
        return is_etcd(self.store_path)

    @contextlib.asynccontextmanager
    async def guard(self) -> AsyncIterator[OperationGuard]:
        """The store, open for one command, and this process's leases in it. With etcd,
        this command is a client of the cluster: a node a controller holds is refused
        (naming it), as only its controller acts on its instances."""
        if not self.clustered:
            async with await SQLiteStore.open(sqlite_path(self.store_path)) as store:
                yield OperationGuard(store, Owner.this_process("kvmflow-cli"))
            return
        me = Owner.this_process(f"cli-{socket.gethostname()}-{os.getpid()}")
        ttl = self.config.store_ttl
        target = etcd_target(self.store_path)
        async with await EtcdStore.open(target, me, ttl=ttl, role="client") as etcd:
            owners = await etcd.node_owners()
            guard = OperationGuard(etcd, me, ttl=ttl)
            guard.node_check = functools.partial(refuse_held_nodes, owners)
            yield guard

    def spec(self, name: str) -> InstanceSpec:
        entry = self.config.instances.get(name)
        if entry is None:
            known = ", ".join(sorted(self.config.instances)) or (
                "none configured: no config file found at "
                + ", ".join(self.config.searched)
                + " (or pass -c FILE)"
                if self.config.searched
                else "none configured"
            )
            raise ConfigError([FieldProblem("instance", name, f"a configured instance ({known})")])
        return entry.spec

    async def locate(self, name: str, guard: OperationGuard | None = None) -> KvmHypervisor:
        """The node where ``name`` runs now, else where the store last recorded it, else
        the node the configuration gives it (only where a first start goes)."""
        for hv in self.hypervisors.values():
            if await hv.is_running(name):
                return hv
        if guard is not None:
            placed = await guard.store.placement(name)
            if placed is not None and placed.node in self.hypervisors:
                return self.hypervisors[placed.node]
        self.spec(name)
        return self.hypervisors[self.config.instances[name].node]

    def hypervisor(self, node: str) -> KvmHypervisor:
        if node not in self.hypervisors:
            known = ", ".join(sorted(self.hypervisors))
            raise ConfigError([FieldProblem("node", node, f"a configured node ({known})")])
        return self.hypervisors[node]

    def engine(
        self,
        policy: MigrationPolicy | None,
        limits: Limits | None = None,
        *,
        guard: OperationGuard | None = None,
    ) -> Engine:
        """An engine over the configured nodes. Its operations hold leases through
        ``guard``; it does not recover on entering (that is ``kvmflow recover``'s job, so
        that a migration of one instance never acts on another's leftovers)."""
        entries = [
            NodeEntry(self.hypervisors[name], node.migration_address, node.link_budget_mib)
            for name, node in self.config.nodes.items()
        ]
        return Engine(
            entries,
            limits=limits,
            default_policy=policy,
            close_nodes=True,
            guard=guard,
            recover_on_enter=False,
        )

    def say_waiting(self, instance: Instance, *, force: bool, timeout: float) -> None:
        """Tell the operator (on stderr, never under --json) what a stop waits for."""
        if force or self.as_json or not instance.spec.hvparams.acpi:
            return
        print(
            f"kvmflow: asked {instance.name} on {instance.node_name} to power off (ACPI); "
            f"it is killed if it has not in {timeout:g} s",
            file=sys.stderr,
        )

    def emit(self, data: Any, table: Table | None = None, text: str | None = None) -> None:
        if self.as_json:
            print(json.dumps(data, default=str))
        elif table is not None:
            self.console.print(table)
        elif text is not None:
            self.console.print(text, highlight=False, markup=False)


def refuse_held_nodes(owners: dict[str, str], node: str) -> None:
    """A shell's command acts on no node a controller holds (it asks the controller)."""
    if node in owners:
        raise NodeNotHeldError(
            f"node {node} is managed by controller {owners[node]}: only it acts on its "
            "instances (kvmflow migrate asks it; stop it to act from here)",
            node=node,
            owner=owners[node],
        )


class Terminated(Exception):
    """The command got SIGTERM: it was cancelled and cleaned up as for Ctrl-C."""


async def until_terminated(command: Callable[..., Awaitable[int]], *args: Any) -> int:
    """Run ``command``; SIGTERM (systemd, kill) cancels it as Ctrl-C does, so that what is
    in flight is cleaned up instead of left for recovery, then :class:`Terminated`."""
    failure: Exception | None = None
    result = EXIT_FAILED
    terminated = False
    with anyio.open_signal_receiver(signal.SIGTERM) as signals:
        async with anyio.create_task_group() as tg:

            async def watch() -> None:
                nonlocal terminated
                async for _ in signals:
                    terminated = True
                    tg.cancel_scope.cancel()
                    return

            tg.start_soon(watch)
            try:
                result = await command(*args)
            except Exception as exc:  # raised as it is below, not in an ExceptionGroup
                failure = exc
            finally:
                tg.cancel_scope.cancel()
    if terminated:
        raise Terminated
    if failure is not None:
        raise failure
    return result


def resolve_store_path(flag: str | None, config: Config) -> str:
    """Where the store is: ``--store``, then ``$KVMFLOW_STORE``, then the config file's
    ``[store] path``, then :data:`~kvmflow.store.DEFAULT_PATH` (its directory is created
    then, as the state directory of a controller host)."""
    path = flag or os.environ.get("KVMFLOW_STORE") or config.store_path
    if path:
        return path
    os.makedirs(os.path.dirname(DEFAULT_PATH), mode=0o700, exist_ok=True)
    return DEFAULT_PATH


async def with_progress(
    ctx: Context, engine: Engine, work: Callable[[], Awaitable[T]], *, enabled: bool, total: int = 1
) -> T:
    """Run ``work`` while drawing the engine's migrations as progress bars."""
    events = engine.events()
    failure: Exception | None = None
    with MigrationBars(ctx.console, enabled=enabled, total=total) as bars:
        async with anyio.create_task_group() as tg:

            async def draw() -> None:
                async for event in events:
                    bars.handle(event)

            tg.start_soon(draw)
            try:
                result = await work()
            except Exception as exc:  # raised as it is below, not in an ExceptionGroup
                failure = exc
            finally:
                tg.cancel_scope.cancel()
    if failure is not None:
        raise failure
    return result


class PlainTable(Table):
    """A table whose cells are shown as they are: text from outside (QEMU's answers, paths,
    error messages such as ``[store /x]``) is never read as rich markup."""

    def add_row(self, *cells: RenderableType | None, **options: Any) -> None:
        super().add_row(
            *(Text(cell) if isinstance(cell, str) else cell for cell in cells), **options
        )


def make_table(*columns: str, **options: Any) -> Table:
    return PlainTable(*columns, **{"show_edge": False, "header_style": "bold", **options})
