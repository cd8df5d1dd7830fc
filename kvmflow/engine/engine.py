"""The engine: where every instance runs, and many migrations under limits.

An :class:`Engine` knows the nodes (each a :class:`~kvmflow.kvm.hypervisor.KvmHypervisor`
plus the address its QEMUs listen on for incoming migrations) and the instances, and is the
single place that says where an instance runs. Migrations are submitted as tickets; a
dispatcher starts them as the limits allow (outbound and inbound per node, a global
maximum), by priority and then fairly across source nodes, and shares each source node's
link budget among the migrations active on it, rebalancing live with
``migrate-set-parameters`` whenever one starts or finishes.

Use it as ``async with Engine(nodes) as engine:``; the dispatcher and every migration run
in the task group it owns, and leaving the block cancels what is still running (each
cancelled migration cleans up after itself).
"""

from __future__ import annotations

import contextlib
import itertools
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass
from types import TracebackType

import anyio
import anyio.abc

from kvmflow._logging import get_logger
from kvmflow._taskgroups import exit_task_group
from kvmflow.engine.evacuation import (
    Capacity,
    EvacuationPlan,
    EvacuationSummary,
    plan_moves,
    refused_moves,
)
from kvmflow.engine.events import (
    BandwidthRebalanced,
    EngineEvent,
    EventFeed,
    MigrationCancelled,
    MigrationCompleted,
    MigrationFailed,
    MigrationProgressed,
    MigrationQueued,
    MigrationStarted,
    PolicyActionTaken,
    Statistics,
)
from kvmflow.engine.recovery import Recovery
from kvmflow.engine.scheduling import link_share, pick_next
from kvmflow.engine.tickets import Limits, MigrationTicket, TicketState
from kvmflow.engine.upgrade import UpgradeReport, upgrade_node
from kvmflow.engine.verdicts import RecoveryReport
from kvmflow.errors import KvmflowError, MisuseError
from kvmflow.instance.guard import OperationGuard
from kvmflow.instance.instance import Instance
from kvmflow.kvm.hypervisor import InstanceInfo, KvmHypervisor
from kvmflow.migration.disks import set_copy_speed
from kvmflow.migration.errors import MigrationError
from kvmflow.migration.migrate import migrate
from kvmflow.migration.policy import MIB, MigrationPolicy
from kvmflow.migration.results import MigrationProgress

_log = get_logger("kvmflow.engine")


@dataclass
class NodeEntry:
    """A node as the engine sees it."""

    hypervisor: KvmHypervisor
    migration_address: str
    link_budget_mib: int | None = None  # outbound bandwidth shared by this node's migrations

    @property
    def name(self) -> str:
        return self.hypervisor.node.name


class Engine:
    """Nodes, instances and migrations under limits. See the module docstring.

    ``close_nodes=True`` makes the engine the owner of its nodes: leaving its ``async with``
    block closes them (their SSH connections), as the CLI wants; by default whoever made
    the nodes closes them. With a ``guard``, every instance added (that has none of its own)
    operates under leases in the store of record (see :mod:`kvmflow.instance.guard`), and
    entering the engine first runs :meth:`recover` (unless ``recover_on_enter=False``)."""

    def __init__(
        self,
        nodes: dict[str, NodeEntry] | list[NodeEntry],
        *,
        limits: Limits | None = None,
        default_policy: MigrationPolicy | None = None,
        event_buffer: int = 10_000,
        close_nodes: bool = False,
        guard: OperationGuard | None = None,
        recover_on_enter: bool = True,
    ) -> None:
        entries = nodes.values() if isinstance(nodes, dict) else nodes
        self.nodes = {entry.name: entry for entry in entries}
        self.limits = limits or Limits()
        self.default_policy = default_policy
        self.instances: dict[str, Instance] = {}
        self._tickets: dict[int, MigrationTicket] = {}
        self._ids = itertools.count(1)
        self._served: Counter[str] = Counter()
        self._feeds: list[EventFeed] = []
        self._event_buffer = event_buffer
        self._wakeup: anyio.Event | None = None
        self._task_group: anyio.abc.TaskGroup | None = None
        self._counts = Counter[str]()
        self._bytes_moved = 0
        self._close_nodes = close_nodes  # the engine owns its nodes: it closes them on exit
        self.guard = guard  # leases in the store of record for the instances added here
        self.recover_on_enter = recover_on_enter and guard is not None
        self.recovered: list[RecoveryReport] = []  # what the recovery on entering found

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Engine:
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        self._wakeup = anyio.Event()
        self._task_group.start_soon(self._dispatch, name="kvmflow-engine-dispatcher")
        if self.recover_on_enter:
            try:
                self.recovered = await self.recover()
            except BaseException as exc:
                await self.__aexit__(type(exc), exc, exc.__traceback__)
                raise
        return self

    async def recover(
        self,
        *,
        abort: bool = False,
        dry_run: bool = False,
        clean_orphans: bool = False,
        nodes: set[str] | None = None,
        survey: bool = True,
    ) -> list[RecoveryReport]:
        """Reconcile the store's unfinished operations and every node's QEMUs (or only
        those of ``nodes``: a shard taken over), per phase (see
        :mod:`kvmflow.engine.recovery`); ``survey=False`` skips the search for copies no
        entry explains (a takeover needs the open entries only). Needs a ``guard``."""
        if self.guard is None:
            raise MisuseError("recovery needs the store of record: make the engine with guard=")
        hypervisors = {name: entry.hypervisor for name, entry in self.nodes.items()}
        recovery = Recovery(
            hypervisors,
            self.guard,
            abort=abort,
            dry_run=dry_run,
            clean_orphans=clean_orphans,
            only_nodes=nodes,
            survey=survey,
        )
        return await recovery.run()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        task_group, self._task_group = self._task_group, None
        assert task_group is not None
        for ticket in list(self._tickets.values()):
            if not ticket.done:
                self._cancel(ticket)
        task_group.cancel_scope.cancel()
        try:
            return await exit_task_group(task_group, exc_type, exc, tb)
        finally:
            for feed in list(self._feeds):
                feed.close()
            if self._close_nodes:
                with anyio.CancelScope(shield=True):
                    for entry in self.nodes.values():
                        await entry.hypervisor.node.aclose()

    # ------------------------------------------------------------------- registry

    def node(self, name: str) -> NodeEntry:
        try:
            return self.nodes[name]
        except KeyError:
            raise MisuseError(
                f"unknown node {name!r}; known: {', '.join(sorted(self.nodes))}"
            ) from None

    def add_instance(self, instance: Instance) -> Instance:
        if instance.node_name not in self.nodes:
            raise MisuseError(f"instance {instance.name} is on unknown node {instance.node_name!r}")
        if instance.guard is None:
            instance.guard = self.guard
        self.instances[instance.name] = instance
        return instance

    def instance(self, name: str) -> Instance:
        try:
            return self.instances[name]
        except KeyError:
            raise MisuseError(f"unknown instance {name!r}") from None

    async def start(self, name: str) -> InstanceInfo:
        """Start a registered instance on its node; refused when any node of the engine
        runs a copy of it (reality first), or the store records it elsewhere."""
        peers = [entry.hypervisor for entry in self.nodes.values()]
        return await self.instance(name).start(peers=peers)

    def where(self, name: str) -> str:
        """The node ``name`` runs on (the engine's single source of truth)."""
        return self.instance(name).node_name

    def on_node(self, node: str) -> list[Instance]:
        return [i for i in self.instances.values() if i.node_name == node]

    # --------------------------------------------------------------------- events

    def events(self, max_buffered: int | None = None) -> EventFeed:
        """A new feed of every engine event from now on: ``with engine.events() as feed:``
        then ``async for event in feed``. Leaving the block (or ``close()``) detaches it."""
        feed = EventFeed(max_buffered or self._event_buffer, self._detach)
        self._feeds.append(feed)
        return feed

    def _detach(self, feed: EventFeed) -> None:
        with contextlib.suppress(ValueError):
            self._feeds.remove(feed)

    def _emit(self, event: EngineEvent) -> None:
        for feed in self._feeds:
            feed.push(event)

    def statistics(self) -> Statistics:
        outbound: Counter[str] = Counter()
        inbound: Counter[str] = Counter()
        active = queued = 0
        for ticket in self._tickets.values():
            if ticket.state is TicketState.ACTIVE:
                active += 1
                outbound[ticket.source] += 1
                inbound[ticket.target] += 1
            elif ticket.state is TicketState.QUEUED:
                queued += 1
        return Statistics(
            active,
            queued,
            self._counts["completed"],
            self._counts["failed"],
            self._counts["cancelled"],
            self._bytes_moved,
            dict(outbound),
            dict(inbound),
        )

    # ----------------------------------------------------------------- migrations

    def submit_migration(
        self,
        name: str,
        target: str,
        *,
        priority: int = 0,
        policy: MigrationPolicy | None = None,
        live: bool = True,
    ) -> MigrationTicket:
        """Queue a migration of ``name`` to node ``target``; returns its ticket."""
        if self._task_group is None:
            raise MisuseError("the engine is not running; use 'async with Engine(...)'")
        instance = self.instance(name)
        self.node(target)
        if self.guard is not None and self.guard.node_check is not None:
            self.guard.node_check(instance.node_name)  # a cluster: the source's owner runs it
        if instance.node_name == target:
            raise MisuseError(f"instance {name} already runs on {target}")
        for ticket in self._tickets.values():
            if ticket.instance is instance and not ticket.done:
                raise MisuseError(
                    f"instance {name} already has migration {ticket.id} ({ticket.state})"
                )
        ticket = MigrationTicket(
            next(self._ids), instance, target, priority, policy, live, self._cancel
        )
        self._tickets[ticket.id] = ticket
        self._emit(MigrationQueued(ticket.id, name, ticket.source, target, priority))
        self._wake()
        return ticket

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    def _cancel(self, ticket: MigrationTicket) -> None:
        if ticket.state is TicketState.QUEUED:
            ticket.error = MigrationError(
                ticket.instance.name, "cancelled before it started", runs_on=ticket.source
            )
            self._counts["cancelled"] += 1
            ticket.move_to(TicketState.CANCELLED)
            del self._tickets[ticket.id]
            self._emit(
                MigrationCancelled(
                    ticket.id, ticket.instance.name, ticket.source, ticket.target, started=False
                )
            )
            self._wake()
        elif ticket.state is TicketState.ACTIVE and ticket.scope is not None:
            ticket.scope.cancel()

    def _fixed_listener(self, ticket: MigrationTicket) -> tuple[str, int] | None:
        """The address and fixed port the ticket's target will listen on; None for port 0
        (the target picks one, so it never waits). Two migrations cannot listen on one fixed
        port of one address (Ganeti gives every instance port 8102): the second waits."""
        port = ticket.instance.spec.hvparams.migration_port
        return (self.nodes[ticket.target].migration_address, port) if port else None

    async def _dispatch(self) -> None:
        while True:
            assert self._wakeup is not None
            await self._wakeup.wait()
            self._wakeup = anyio.Event()
            self._start_eligible()

    def _start_eligible(self) -> None:
        tickets = self._tickets.values()
        while chosen := pick_next(tickets, self.limits, self._served, self._fixed_listener):
            self._served[chosen.source] += 1
            chosen.move_to(TicketState.ACTIVE)
            chosen.scope = anyio.CancelScope()
            assert self._task_group is not None
            self._task_group.start_soon(self._run, chosen, name=f"migrate {chosen.instance.name}")

    def _share_mib(self, source: str, active: int) -> int | None:
        return link_share(self.nodes[source].link_budget_mib, active)

    def _active_on(self, source: str) -> list[MigrationTicket]:
        return [
            t
            for t in self._tickets.values()
            if t.state is TicketState.ACTIVE and t.source == source and t.qmp is not None
        ]

    async def _rebalance(self, source: str) -> None:
        """Give every active migration of ``source`` an equal share of its link budget."""
        active = self._active_on(source)
        share = self._share_mib(source, len(active))
        if share is None:
            return
        for ticket in active:
            if ticket.bandwidth_mib == share or ticket.qmp is None:
                continue
            try:
                await ticket.qmp.execute(
                    "migrate-set-parameters", {"max-bandwidth": share * MIB}, timeout=10
                )
                if any(disk.local for disk in ticket.instance.spec.disks):
                    await set_copy_speed(ticket.qmp, share * MIB)  # one budget: disks too
            except KvmflowError as exc:
                _log.warning(
                    "bandwidth rebalance failed", instance=ticket.instance.name, error=str(exc)
                )
                continue
            ticket.bandwidth_mib = share
            self._emit(
                BandwidthRebalanced(
                    ticket.id, ticket.instance.name, ticket.source, ticket.target, share
                )
            )

    async def _run(self, ticket: MigrationTicket) -> None:
        instance = ticket.instance
        source = self.nodes[ticket.source]
        target = self.nodes[ticket.target]
        policy = (
            ticket.policy
            or self.default_policy
            or MigrationPolicy.from_hvparams(instance.spec.hvparams)
        )
        assert ticket.scope is not None
        try:
            with ticket.scope:
                if instance.guard is not None:  # before the monitor is opened and held
                    await instance.guard.check_free(instance.name)
                async with source.hypervisor.qmp(
                    instance.name, command_timeout=policy.query_timeout
                ) as qmp:
                    share = self._share_mib(ticket.source, len(self._active_on(ticket.source)) + 1)
                    if share is not None:
                        policy = policy.with_changes(bandwidth_mib=share)
                        ticket.bandwidth_mib = share
                    ticket.qmp = qmp
                    self._emit(
                        MigrationStarted(
                            ticket.id,
                            instance.name,
                            ticket.source,
                            ticket.target,
                            policy.bandwidth_mib,
                        )
                    )
                    await self._rebalance(ticket.source)
                    ticket.result = await migrate(
                        instance,
                        target.hypervisor,
                        target_address=target.migration_address,
                        live=ticket.live,
                        policy=policy,
                        source_qmp=qmp,
                        on_progress=lambda report: self._progress(ticket, report),
                    )
        except MigrationError as exc:
            ticket.error = exc
        except KvmflowError as exc:
            ticket.error = MigrationError(instance.name, str(exc), runs_on=instance.node_name)
        except Exception as exc:  # a bug: the ticket fails, the engine and others go on
            _log.exception("migration failed on a bug", instance=instance.name, ticket=ticket.id)
            ticket.error = exc
        finally:
            ticket.qmp = None
            with anyio.CancelScope(shield=True):
                await self._settle(ticket)

    def _progress(self, ticket: MigrationTicket, report: MigrationProgress) -> None:
        if not ticket.watching:
            # The migration has applied its own starting parameters by now; from here on
            # the engine's share is the one that counts, so apply it (again) at once.
            ticket.watching = True
            ticket.bandwidth_mib = None
            if self._task_group is not None and self.nodes[ticket.source].link_budget_mib:
                self._task_group.start_soon(self._rebalance, ticket.source)
        self._emit(
            MigrationProgressed(
                ticket.id, ticket.instance.name, ticket.source, ticket.target, report
            )
        )
        for decision in report.decisions:
            self._emit(
                PolicyActionTaken(
                    ticket.id, ticket.instance.name, ticket.source, ticket.target, decision
                )
            )

    async def _settle(self, ticket: MigrationTicket) -> None:
        name = ticket.instance.name
        if ticket.result is not None:
            self._counts["completed"] += 1
            self._bytes_moved += ticket.result.final.transferred
            ticket.move_to(TicketState.COMPLETED)
            self._emit(
                MigrationCompleted(ticket.id, name, ticket.source, ticket.target, ticket.result)
            )
        elif ticket.error is None:  # cancelled while active
            ticket.error = MigrationError(name, "cancelled", runs_on=ticket.instance.node_name)
            self._counts["cancelled"] += 1
            ticket.move_to(TicketState.CANCELLED)
            self._emit(
                MigrationCancelled(ticket.id, name, ticket.source, ticket.target, started=True)
            )
        else:
            runs_on = getattr(ticket.error, "runs_on", None)
            self._counts["failed"] += 1
            ticket.move_to(TicketState.FAILED)
            self._emit(
                MigrationFailed(
                    ticket.id, name, ticket.source, ticket.target, str(ticket.error), runs_on
                )
            )
        del self._tickets[ticket.id]  # its owner keeps the ticket; the engine forgets it
        await self._rebalance(ticket.source)
        self._wake()

    # ------------------------------------------------------------------ evacuation

    async def plan_evacuation(
        self, source: str, targets: list[str], policy: MigrationPolicy | None = None
    ) -> EvacuationPlan:
        """Assign every instance of ``source`` to a target by free memory and load, never to
        one whose QEMU the pre-check refuses (machine type, CPU, devices, capabilities);
        change nothing."""
        source_hv = self.node(source).hypervisor
        capacity: dict[str, Capacity] = {}
        for name in targets:
            if name == source:
                raise MisuseError(f"cannot evacuate {source} onto itself")
            info = await self.node(name).hypervisor.node_info()
            capacity[name] = Capacity(info.memory_free_mib, len(self.on_node(name)))
        refusals = await refused_moves(
            source_hv,
            [(i, policy or self.default_policy) for i in self.on_node(source)],
            [self.node(t).hypervisor for t in targets],
        )
        needs = {i.name: i.spec.memory_mib for i in self.on_node(source)}
        return plan_moves(source, needs, capacity, refusals)

    async def evacuate(
        self,
        source: str,
        targets: list[str],
        *,
        dry_run: bool = False,
        policy: MigrationPolicy | None = None,
        priority: int = 0,
    ) -> EvacuationSummary:
        """Move everything off ``source``, continuing past failures; a dry run only plans."""
        plan = await self.plan_evacuation(source, targets, policy)
        summary = EvacuationSummary(plan, dry_run=dry_run)
        if dry_run:
            return summary
        tickets = [
            self.submit_migration(name, target, priority=priority, policy=policy)
            for name, target, _ in plan.moves
        ]
        for ticket in tickets:
            try:
                result = await ticket.wait()
                summary.moved.append((result.instance, result.target))
                summary.results[result.instance] = result
            except KvmflowError as exc:
                summary.failed.append((ticket.instance.name, str(exc)))
            except Exception as exc:  # a bug in one migration: the others still count
                summary.failed.append((ticket.instance.name, f"internal error: {exc!r}"))
        return summary

    async def upgrade_node(
        self,
        node: str,
        command: list[str],
        *,
        targets: list[str] | None = None,
        bring_back: bool | Collection[str] = True,
        policy: MigrationPolicy | None = None,
    ) -> UpgradeReport:
        """A rolling upgrade of ``node``: see :func:`kvmflow.engine.upgrade.upgrade_node`."""
        return await upgrade_node(
            self, node, command, targets=targets, bring_back=bring_back, policy=policy
        )
