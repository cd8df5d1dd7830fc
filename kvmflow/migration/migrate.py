"""Live (or non-live) migration of one instance as one cancellable coroutine.

:func:`migrate` moves an instance from the node it runs on to a target node:

1. pre-checks that change nothing (the source runs and is this instance; the target does
   not run it);
2. the target QEMU is started from the source's saved runtime with ``-incoming defer``,
   then ``migrate-incoming``; that it listens is confirmed by asking its monitor
   (``query-migrate`` shows the socket address, ``query-status`` says ``inmigrate``) --
   never by connecting to the port, which makes QEMU 7.2's target exit;
3. the ``events`` capability and bandwidth/downtime are set, a non-live migration stops the
   source first, ``migrate`` starts it, and the watcher follows it to the end;
4. success: the target runs (resumed if the source was running), saves its runtime, the
   source QEMU quits and its files go. Failure or cancellation: ``migrate_cancel`` (shielded
   and bounded), the source is resumed if we paused it, the target is killed and cleaned.

After every exit path exactly one copy of the instance runs, and the instance's state
machine says where.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

import anyio
import structlog

from kvmflow.errors import CommandError, ConnectionLostError, KvmflowError, MisuseError
from kvmflow.feed import BoundedFeed
from kvmflow.instance.instance import Instance
from kvmflow.instance.states import InstanceEvent, InstanceState
from kvmflow.kvm.hypervisor import KvmHypervisor
from kvmflow.kvm.runtime import SavedRuntime
from kvmflow.migration.decide import Decision, Estimate, PolicyEngine
from kvmflow.migration.errors import (
    MigrationError,
    MigrationFailedError,
    PolicyAbortError,
    PostcopyRecoveryError,
    TooManyBadAnswersError,
)
from kvmflow.migration.hmp_monitor import HmpMigrationMonitor
from kvmflow.migration.policy import Action, MigrationPolicy
from kvmflow.migration.status import BadAnswer, MigrationSnapshot, MigrationStatus
from kvmflow.migration.watch import query_migration, watch_migration
from kvmflow.monitor.events import EventSubscription
from kvmflow.monitor.hmp import HMPClient
from kvmflow.monitor.qmp import ConnectionState, QMPClient
from kvmflow.monitor.queries import CommandRunner, RunState, query_status

_log = structlog.get_logger("kvmflow.migration")

EVENTS_CAPABILITY = {"capabilities": [{"capability": "events", "state": True}]}


@dataclass(frozen=True)
class MigrationProgress:
    """One progress report: QEMU's figures, the policy's estimate, the downtime limit now in
    force, and the decisions the policy took on this sample (with their evidence)."""

    instance: str
    source: str
    target: str
    elapsed: float
    snapshot: MigrationSnapshot
    downtime_limit_ms: int = 0
    estimate: Estimate | None = None
    decisions: tuple[Decision, ...] = ()


@dataclass
class MigrationResult:
    """How a completed migration went."""

    instance: str
    source: str
    target: str
    live: bool
    elapsed: float
    final: MigrationSnapshot
    progress_reports: int = 0
    bad_answers: list[BadAnswer] = field(default_factory=list)
    source_final_state: str | None = None
    decisions: list[Decision] = field(default_factory=list)
    postcopy: bool = False
    postcopy_recoveries: int = 0
    target_uri: str = ""  # where the target listened (the port it picked, for port 0)

    @property
    def downtime_ms(self) -> int | None:
        return self.final.downtime_ms

    @property
    def total_time_ms(self) -> int | None:
        return self.final.total_time_ms


ProgressCallback = Callable[[MigrationProgress], None]


class SourceMonitor(CommandRunner, Protocol):
    """What the migration needs of the source's monitor: commands, events (possibly none)
    and a way to reconnect. A :class:`QMPClient` is one; :class:`HmpMigrationMonitor` too."""

    def subscribe(self, *names: str, max_buffered: int = 1000) -> EventSubscription: ...

    async def reconnect(self) -> None: ...


class ProgressFeed(BoundedFeed[MigrationProgress]):
    """Progress reports as an async iterator: pass it as ``on_progress`` and iterate it in
    another task (``async for report in feed``); it ends when the migration ends."""


async def migrate(
    instance: Instance,
    target: KvmHypervisor,
    *,
    target_address: str,
    port: int | None = None,
    live: bool = True,
    policy: MigrationPolicy | None = None,
    on_progress: ProgressCallback | None = None,
    source_qmp: SourceMonitor | None = None,
    source_monitor: Literal["qmp", "hmp"] = "qmp",
    source_uri: str | None = None,
) -> MigrationResult:
    """Migrate ``instance`` to ``target``, whose QEMU will listen on ``target_address``.

    ``source_uri`` is where the source connects when that differs from where the target
    listens (a relay or NAT in between); by default the same ``tcp:ADDRESS:PORT``.

    ``port`` defaults to the instance's ``migration_port``; 0 lets the target pick a free port
    (no collisions when many migrations run at once). ``policy`` defaults to the instance's
    own bandwidth and downtime. ``source_monitor="hmp"`` is the explicit fallback
    for a source without a QMP socket (no events: it polls). Pass ``source_qmp`` to share an
    open monitor
    connection of the source. Raises :class:`MigrationError` when the migration did not
    happen (the instance then still runs on the source, or ``runs_on`` says otherwise).
    """
    spec = instance.spec
    port = spec.hvparams.migration_port if port is None else port
    if not 0 <= port <= 65535:
        raise MisuseError(f"port {port} is not a TCP port: use 1 to 65535, or 0 for any free one")
    policy = policy or MigrationPolicy.from_hvparams(spec.hvparams)
    run = _Migration(
        instance,
        target,
        target_address,
        port,
        live,
        policy,
        on_progress,
        source_uri,
    )
    try:
        async with instance.machine.operation_scope("migrate"):
            return await run.execute(source_qmp, source_monitor)
    finally:
        if isinstance(on_progress, BoundedFeed):
            on_progress.close()


class _Migration:
    """The state of one migration attempt, so that every exit path can undo what was done."""

    def __init__(
        self,
        instance: Instance,
        target: KvmHypervisor,
        address: str,
        port: int,
        live: bool,
        policy: MigrationPolicy,
        on_progress: ProgressCallback | None,
        source_uri: str | None = None,
    ) -> None:
        self.instance = instance
        self.source = instance.hypervisor
        self.target = target
        self.uri = f"tcp:{_uri_host(address)}:{port}"  # where the target listens
        self.source_uri = source_uri or self.uri  # where the source connects
        self.address = address
        self.port = port
        self.live = live
        self.policy = policy
        self.on_progress = on_progress
        self.name = instance.name
        self.started_at = time.monotonic()
        self.reports = 0
        self.bad_answers: list[BadAnswer] = []
        self.target_started = False
        self.source_paused_by_us = False
        self.migration_started = False
        self.postcopy = False  # from post-copy on, the target holds the authoritative state
        self.postcopy_failed = False
        self.target_may_have_run = False  # a `cont` reached the target, unconfirmed
        self.recoveries = 0
        self.lost_contact = False
        self._stack: contextlib.AsyncExitStack | None = None
        self._target_qmp: QMPClient | None = None
        self.engine = PolicyEngine(policy, instance.spec.memory_mib, self.started_at)
        self.was_running = True
        self._source_alive = True
        self.log = _log.bind(
            instance=self.name, source=self.source.node.name, target=target.node.name
        )

    # ------------------------------------------------------------------- main path

    async def execute(
        self, source_qmp: SourceMonitor | None, monitor: Literal["qmp", "hmp"] = "qmp"
    ) -> MigrationResult:
        machine = self.instance.machine
        if machine.state not in (InstanceState.RUNNING, InstanceState.PAUSED):
            raise MisuseError(
                f"instance {self.name} is {machine.state.value}; only a running "
                "or paused instance can migrate"
            )
        if self.target.node.name == self.source.node.name and (
            self.target.paths == self.source.paths
        ):
            raise MisuseError(f"target of {self.name} is the node it runs on")
        runtime = await self.source.load_runtime(self.name)
        if await self.source.find_pid(self.name) is None or runtime is None:
            raise MigrationError(
                self.name, f"it is not running on {self.source.node.name}", runs_on=None
            )
        if await self.target.is_running(self.name):
            raise MigrationError(
                self.name,
                f"it already runs on {self.target.node.name}",
                runs_on=self.source.node.name,
            )
        return await self._with_source(source_qmp, monitor, runtime)

    async def _with_source(
        self,
        source_qmp: SourceMonitor | None,
        monitor: Literal["qmp", "hmp"],
        runtime: SavedRuntime,
    ) -> MigrationResult:
        if source_qmp is not None:
            return await self._with_source_monitor(source_qmp, runtime)
        if monitor == "hmp":
            connector = self.source.node.monitor_connector(self.source.paths.hmp_socket(self.name))
            async with HMPClient(connector, command_timeout=self.policy.query_timeout) as hmp:
                return await self._with_source_monitor(HmpMigrationMonitor(hmp), runtime)
        async with self.source.qmp(self.name, command_timeout=self.policy.query_timeout) as qmp:
            return await self._with_source_monitor(qmp, runtime)

    async def _with_source_monitor(
        self, qmp: SourceMonitor, runtime: SavedRuntime
    ) -> MigrationResult:
        # The target's monitor connection, once opened, is kept to the end of the migration
        # (set-up, completion, recovery and abort share it); the stack, entered inside the
        # source monitor's scope, closes it on every path.
        async with contextlib.AsyncExitStack() as stack:
            self._stack = stack
            status = await query_status(qmp)
            if status.state not in (RunState.RUNNING, RunState.PAUSED):
                raise MigrationError(
                    self.name, f"source QEMU is {status.state.value}", runs_on=self.source.node.name
                )
            self.was_running = status.running
            self.instance.machine.fire(InstanceEvent.MIGRATE)
            self.log.info(
                "migration starting",
                uri=self.uri,
                live=self.live,
                bandwidth_mib=self.policy.bandwidth_mib,
                downtime_ms=self.policy.downtime_ms,
            )
            try:
                final = await self._transfer(qmp)
            except BaseException as exc:
                with anyio.CancelScope(shield=True):
                    moved = await self._abort(qmp, exc)
                if moved is not None:
                    # QEMU completed before the cancel took effect: the instance moved. A
                    # cancellation still propagates; any other failure turns into success.
                    if isinstance(exc, anyio.get_cancelled_exc_class()):
                        raise
                    return moved
                error = self._failure(exc)
                if error is not None:
                    raise error from exc
                raise
            return await self._finish(qmp, final, runtime)

    def _failure(self, exc: BaseException) -> MigrationError | None:
        """The MigrationError that ``exc`` becomes after the abort (None: re-raise as is)."""
        if self.lost_contact:
            return MigrationError(
                self.name,
                f"lost contact with the source node {self.source.node.name} ({exc}); the "
                f"target on {self.target.node.name} was left waiting for the stream: when the "
                "source is reachable again, check where the guest runs and stop the other copy",
                runs_on=None,
                bad_answers=self.bad_answers,
            )
        if self.postcopy_failed:
            return MigrationError(
                self.name,
                f"post-copy failed after the switch ({exc}); the target "
                f"{self.target.node.name} holds the newest guest state and the source "
                f"{self.source.node.name} must not be resumed: restore the link and resume "
                "the migration, or stop both and restore from backup",
                runs_on=None,
                bad_answers=self.bad_answers,
            )
        if isinstance(exc, KvmflowError) and not isinstance(exc, MigrationError):
            runs_on = self.source.node.name if self._source_alive else None
            return MigrationError(
                self.name, str(exc), runs_on=runs_on, bad_answers=self.bad_answers
            )
        return None

    async def _transfer(self, qmp: SourceMonitor) -> MigrationSnapshot:
        await self._start_target()
        capabilities = self.policy.source_capabilities()
        if capabilities:
            await qmp.execute("migrate-set-capabilities", {"capabilities": capabilities})
        await qmp.execute("migrate-set-parameters", self.policy.qemu_parameters())
        if not self.live and self.was_running:
            await qmp.execute("stop")
            self.source_paused_by_us = True
        with qmp.subscribe("MIGRATION", max_buffered=64) as events:
            await qmp.execute("migrate", {"uri": self.source_uri})
            self.migration_started = True
            return await watch_migration(
                qmp,
                events if self.policy.use_events else None,
                self.policy,
                on_snapshot=lambda snapshot: self._on_snapshot(qmp, snapshot),
                on_bad_answer=self._note_bad_answer,
            )

    async def _start_target(self) -> None:
        spec = self.instance.spec
        runtime = await self.source.load_runtime(self.name)
        assert runtime is not None
        self.target_started = True  # from here on, the target may hold a process or files
        await self.target.start(spec, runtime=runtime, incoming="defer")
        tq = await self._target_monitor()
        capabilities = self.policy.target_capabilities()
        if capabilities:
            await tq.execute("migrate-set-capabilities", {"capabilities": capabilities})
        try:
            await tq.execute("migrate-incoming", {"uri": self.uri})
        except KvmflowError as exc:
            raise MigrationError(
                self.name,
                f"target cannot listen on {self.address}:{self.port}: {exc}",
                runs_on=self.source.node.name,
            ) from exc
        listening = await tq.execute("query-migrate")
        status = await query_status(tq)
        port = _listening_port(listening, self.port)
        if status.state is not RunState.INMIGRATE or port is None:
            raise MigrationError(
                self.name,
                f"target is not listening on {self.uri} "
                f"(status {status.state.value}, {listening!r})",
                runs_on=self.source.node.name,
            )
        if self.port == 0:  # the target picked the port: from now on, use the one it picked
            self._use_port(port)
        self.log.info("target listening", uri=self.uri)

    def _use_port(self, port: int) -> None:
        """Aim the source (unless it goes through a relay) and any recovery at ``port``."""
        uri = f"tcp:{_uri_host(self.address)}:{port}"
        if self.source_uri == self.uri:
            self.source_uri = uri
        self.uri, self.port = uri, port

    async def _on_snapshot(self, qmp: SourceMonitor, snapshot: MigrationSnapshot) -> None:
        """Judge one sample by the policy, act on it, and report it."""
        if snapshot.status in (
            MigrationStatus.POSTCOPY_ACTIVE,
            MigrationStatus.POSTCOPY_PAUSED,
            MigrationStatus.POSTCOPY_RECOVER,
        ):
            self.postcopy = True
        decisions = self.engine.observe(snapshot, time.monotonic())
        self._report(snapshot, tuple(decisions))  # first, so that listeners see an abort too
        for decision in decisions:
            await self._apply(qmp, decision)
        if snapshot.status is MigrationStatus.POSTCOPY_PAUSED:
            await self._recover_postcopy(qmp)

    async def _apply(self, qmp: SourceMonitor, decision: Decision) -> None:
        self.log.info(
            "policy decision",
            action=decision.name,
            trigger=decision.trigger,
            evidence=decision.evidence,
        )
        action = decision.action
        if action is None or action is Action.RAISE_DOWNTIME:
            await qmp.execute("migrate-set-parameters", {"downtime-limit": decision.downtime_ms})
        elif action is Action.AUTO_CONVERGE:
            await qmp.execute("migrate-set-parameters", self.policy.throttle_parameters())
        elif action is Action.POSTCOPY:
            await qmp.execute("migrate-start-postcopy")
            self.postcopy = True
        elif action is Action.PAUSE:
            if self.was_running and not self.source_paused_by_us:
                await qmp.execute("stop")
                self.source_paused_by_us = True
        elif action is Action.ABORT:
            raise PolicyAbortError(decision.trigger, decision.evidence)

    def _report(self, snapshot: MigrationSnapshot, decisions: tuple[Decision, ...]) -> None:
        self.reports += 1
        if self.on_progress is not None:
            self.on_progress(
                MigrationProgress(
                    self.name,
                    self.source.node.name,
                    self.target.node.name,
                    time.monotonic() - self.started_at,
                    snapshot,
                    self.engine.downtime_ms,
                    self.engine.last_estimate,
                    decisions,
                )
            )

    async def _recover_postcopy(self, qmp: SourceMonitor) -> None:
        """The post-copy link broke: ask the target to listen again and the source to
        resume into it, until it works or the recovery deadline passes."""
        self.log.warning(
            "post-copy paused; recovering",
            uri=self.uri,
            deadline=self.policy.postcopy_recovery_seconds,
        )
        last_error = "no attempt finished"
        with anyio.move_on_after(self.policy.postcopy_recovery_seconds):
            while True:
                try:
                    tq = await self._target_monitor()
                    await tq.execute("migrate-recover", {"uri": self.uri}, timeout=10)
                    await qmp.execute("migrate", {"uri": self.source_uri, "resume": True})
                    self.recoveries += 1
                except KvmflowError as exc:
                    last_error = str(exc)
                    self.log.warning("post-copy recovery attempt failed", error=last_error)
                else:
                    self.log.info("post-copy recovery started", uri=self.uri)
                    return
                await anyio.sleep(1.0)
        raise PostcopyRecoveryError(self.policy.postcopy_recovery_seconds, last_error)

    def _note_bad_answer(self, answer: BadAnswer, in_a_row: int) -> None:
        self.bad_answers.append(answer)

    # --------------------------------------------------------------------- success

    async def _finish(
        self, qmp: SourceMonitor, final: MigrationSnapshot, runtime: SavedRuntime
    ) -> MigrationResult:
        try:
            await self._resume_target_if_needed()
        except (KvmflowError, TimeoutError) as exc:
            with anyio.CancelScope(shield=True):
                error = await self._target_never_took_over(qmp, exc)
            raise error from exc
        await self.target.save_runtime(self.instance.spec, runtime)
        source_state = await self._end_source(qmp)
        self.instance.hypervisor = self.target
        event = InstanceEvent.MIGRATED if self.was_running else InstanceEvent.MIGRATED_PAUSED
        self.instance.machine.fire(event, node=self.target.node.name)
        elapsed = time.monotonic() - self.started_at
        self.log.info(
            "migration completed",
            elapsed=round(elapsed, 3),
            downtime_ms=final.downtime_ms,
            total_time_ms=final.total_time_ms,
            transferred=final.transferred,
        )
        return MigrationResult(
            self.name,
            self.source.node.name,
            self.target.node.name,
            self.live,
            elapsed,
            final,
            progress_reports=self.reports,
            bad_answers=self.bad_answers,
            source_final_state=source_state,
            decisions=list(self.engine.decisions),
            postcopy=self.postcopy,
            postcopy_recoveries=self.recoveries,
            target_uri=self.uri,
        )

    async def _target_monitor(self) -> QMPClient:
        """The target's QMP connection, opened on first use and kept until the end."""
        if self._target_qmp is None:
            assert self._stack is not None
            self._target_qmp = await self._stack.enter_async_context(
                self.target.qmp(self.name, command_timeout=self.policy.query_timeout)
            )
        elif self._target_qmp.state is ConnectionState.LOST:
            await self._target_qmp.reconnect()
        return self._target_qmp

    async def _resume_target_if_needed(self) -> None:
        tq = await self._target_monitor()
        with anyio.fail_after(self.policy.target_ready_timeout):
            status = await query_status(tq)
            while status.state is RunState.INMIGRATE:
                await anyio.sleep(0.02)
                status = await query_status(tq)
        if self.was_running and not status.running:
            try:
                await tq.execute("cont")
            except CommandError:
                raise  # QEMU refused: the vCPUs did not start
            except BaseException:
                self.target_may_have_run = True  # sent, but no answer: they may have started
                raise

    async def _target_never_took_over(
        self, qmp: SourceMonitor, cause: BaseException
    ) -> MigrationError:
        """The source sent everything but the target did not get the guest going (it died
        loading the final device state, hung, or refused ``cont``). If the guest never ran
        there, the source (in ``postmigrate``, its disks handed over) takes it back with
        ``cont``, as libvirt does. If a ``cont`` reached the target without an answer, the
        guest may run there: resuming the source could fork it, so both are left as they are."""
        source, target = self.source.node.name, self.target.node.name
        machine = self.instance.machine
        if self.target_may_have_run:
            self.log.error("target may have run the guest, then failed", cause=repr(cause))
            return self._runs_nowhere_known(
                f"the target on {target} may have run the guest, then failed ({cause}); the "
                f"source on {source} is stopped after the migration and its state is older: "
                "check the target, and resume the source only if the target never ran the guest"
            )
        self.log.warning("target never took over; resuming the source", cause=repr(cause))
        await self._stop_target()
        try:
            if await self.target.is_running(self.name):
                raise MigrationError(self.name, "the target could not be stopped", runs_on=None)
            if self.was_running:
                await qmp.execute("cont", timeout=10)
        except KvmflowError as exc:
            self.log.error("source could not take the guest back", error=str(exc))
            return self._runs_nowhere_known(
                f"the target on {target} never took over ({cause}) and the source on "
                f"{source} could not take the guest back ({exc}): check both nodes"
            )
        if self.was_running:
            machine.fire(InstanceEvent.MIGRATION_ABORTED)
        else:
            machine.fire(InstanceEvent.MIGRATION_ABORTED_PAUSED)
        return MigrationError(
            self.name,
            f"the target on {target} never took over after the copy ({cause}); the source "
            f"took the guest back",
            runs_on=source,
            bad_answers=self.bad_answers,
        )

    def _runs_nowhere_known(self, reason: str) -> MigrationError:
        """The guest runs on no node kvmflow can vouch for: the operator must look."""
        self.instance.machine.fire(InstanceEvent.CRASHED)
        return MigrationError(self.name, reason, runs_on=None, bad_answers=self.bad_answers)

    async def _end_source(self, qmp: SourceMonitor) -> str | None:
        """Quit the source QEMU (it is in ``postmigrate``); return the state it was in."""
        state: str | None = None
        try:
            state = (await query_status(qmp, timeout=10)).state.value
            await qmp.execute("quit", timeout=10)
        except KvmflowError as exc:
            self.log.warning("source did not quit cleanly; killing", error=str(exc))
        await self.source.stop(self.name, force=True)
        return state

    # ---------------------------------------------------------------------- failure

    async def _abort(self, qmp: SourceMonitor, cause: BaseException) -> MigrationResult | None:
        """Undo everything; return the result if the migration completed anyway."""
        if self.postcopy:
            return await self._postcopy_exit(qmp, cause)
        self.log.warning("migration aborting", cause=repr(cause))
        completed: MigrationSnapshot | None = None
        source_reachable = True
        if isinstance(cause, ConnectionLostError) and self.migration_started:
            contact = await self._reach_source_again(qmp)
            if contact == "unknown":
                self._lost_contact()
                return None
            source_reachable = contact == "reconnected"
        try:
            if self.migration_started and source_reachable:
                completed = await self._cancel_on_source(qmp)
            if completed is not None:
                runtime = await self.source.load_runtime(self.name)
                assert runtime is not None
                return await self._finish(qmp, completed, runtime)
            if self.source_paused_by_us:
                await qmp.execute("cont", timeout=10)
        except KvmflowError as exc:
            self.log.warning("source could not be restored", error=str(exc))
        finally:
            if completed is None:
                await self._stop_target()
        self._source_alive = await self.source.is_running(self.name)
        machine = self.instance.machine
        if not self._source_alive:
            machine.fire(InstanceEvent.CRASHED)
        elif self.was_running:
            machine.fire(InstanceEvent.MIGRATION_ABORTED)
        else:
            machine.fire(InstanceEvent.MIGRATION_ABORTED_PAUSED)
        return None

    async def _reach_source_again(self, qmp: SourceMonitor) -> str:
        """After the source monitor connection dropped (QEMU died, or only the path to it,
        such as an SSH session): ``dead``, ``reconnected``, or ``unknown`` if the source
        node cannot be asked within the cancel timeout."""
        with anyio.move_on_after(self.policy.cancel_timeout):
            while True:
                try:
                    if not await self.source.is_running(self.name):
                        return "dead"
                    await qmp.reconnect()
                except KvmflowError as exc:
                    self.log.warning("source not reachable yet", error=str(exc))
                    await anyio.sleep(0.5)
                else:
                    self.log.info("source monitor reconnected")
                    return "reconnected"
        return "unknown"

    def _lost_contact(self) -> None:
        """The source may still be migrating and cannot be asked: the target is left
        waiting (it holds nothing that runs) so that no guest state is thrown away."""
        self.lost_contact = True
        self.log.error(
            "lost contact with the source node; target left waiting for the operator",
            target=self.target.node.name,
        )
        self.instance.machine.fire(InstanceEvent.CRASHED)

    async def _postcopy_exit(
        self, qmp: SourceMonitor, cause: BaseException
    ) -> MigrationResult | None:
        """After the switch to post-copy the target holds the newest guest state: the
        source is never resumed and the target never killed. A cancel waits for the
        migration to finish instead; a failure leaves both QEMUs for the operator."""
        if isinstance(cause, anyio.get_cancelled_exc_class()):
            self.log.warning("cancel requested during post-copy; finishing the migration")
            with anyio.move_on_after(self.policy.cancel_timeout):
                try:
                    final = await watch_migration(
                        qmp, None, self.policy, on_snapshot=self._on_snapshot_plain
                    )
                    runtime = await self.source.load_runtime(self.name)
                    assert runtime is not None
                    return await self._finish(qmp, final, runtime)
                except KvmflowError as exc:
                    cause = exc
        self.postcopy_failed = True
        self.log.error(
            "post-copy failed; the target holds the newest guest state and the "
            "source must not be resumed",
            cause=repr(cause),
        )
        self.instance.machine.fire(InstanceEvent.CRASHED)
        return None

    def _on_snapshot_plain(self, snapshot: MigrationSnapshot) -> None:
        self._report(snapshot, ())

    async def _cancel_on_source(self, qmp: SourceMonitor) -> MigrationSnapshot | None:
        try:
            try:
                await qmp.execute("migrate_cancel", timeout=10)
            except ConnectionLostError:
                # An HMP connection is closed when a command is cut short; reopen it.
                await qmp.reconnect()
                await qmp.execute("migrate_cancel", timeout=10)
        except KvmflowError as exc:
            self.log.warning("migrate_cancel failed", error=str(exc))
            return None
        with anyio.move_on_after(self.policy.cancel_timeout):
            while True:
                result = await query_migration(qmp, self.policy.query_timeout)
                if isinstance(result, MigrationSnapshot):
                    if result.status is MigrationStatus.COMPLETED:
                        self.log.warning("migration completed before the cancel took effect")
                        return result
                    if result.status in (MigrationStatus.CANCELLED, MigrationStatus.FAILED):
                        return None
                await anyio.sleep(0.05)
        self.log.warning(
            "QEMU did not confirm the cancel in time", timeout=self.policy.cancel_timeout
        )
        return None

    async def _stop_target(self) -> None:
        if not self.target_started:
            return
        try:
            await self.target.stop(self.name, force=True)
        except KvmflowError as exc:
            self.log.error("target could not be cleaned", error=str(exc))


def _uri_host(address: str) -> str:
    """``address`` as the host part of a ``tcp:`` URI (IPv6 literals in brackets)."""
    return f"[{address}]" if ":" in address and not address.startswith("[") else address


def _listening_port(listening: object, wanted: int) -> int | None:
    """The TCP port the target's ``query-migrate`` says it listens on: ``wanted``, or, when
    ``wanted`` is 0 (any free port), the one it picked. None when it does not listen."""
    addresses = listening.get("socket-address", []) if isinstance(listening, dict) else []
    for address in addresses if isinstance(addresses, list) else []:
        text = str(address.get("port")) if isinstance(address, dict) else ""
        port = int(text) if text.isdigit() else 0
        if port > 0 and wanted in (0, port):
            return port
    return None


__all__ = [
    "MigrationError",
    "MigrationFailedError",
    "MigrationProgress",
    "MigrationResult",
    "ProgressFeed",
    "TooManyBadAnswersError",
    "migrate",
]
