"""Live (or non-live) migration of one instance as one cancellable coroutine.

:func:`migrate` moves an instance from the node it runs on to a target node, phase by phase
(:mod:`kvmflow.migration.phases`):

1. ``checking``: pre-checks that change nothing (the source runs and is this instance; the
   target does not run it);
2. ``target-starting`` / ``target-listening``: the target QEMU starts from the source's saved
   runtime and listens (:mod:`kvmflow.migration.target`);
3. ``streaming``: capabilities and limits are set, a non-live migration stops the source,
   ``migrate`` starts the stream and the watcher follows it, the policy acting on every
   sample (:mod:`kvmflow.migration.actions`);
4. ``completed-on-source`` -> ``switched-over`` -> ``done``: the target runs the guest,
   saves its runtime, and the source QEMU quits. From the switch-over on nothing is undone:
   finishing runs shielded and bounded, and ends with the guest recorded on the target.

Every step that needs undoing pushes its undo on one stack next to the step (kill the
target, resume the source we paused); a failure before the switch-over cancels the stream
and unwinds that stack, shielded, within ``policy.cleanup_timeout``
(:mod:`kvmflow.migration.aborts`); the switch-over drops it. How the migration ended is
looked up from (phase, what the clean-up found) in :mod:`kvmflow.migration.outcome`. After
every exit path exactly one copy of the instance runs, or the instance is ``failed`` and
the error says why kvmflow cannot vouch for one.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import anyio

from kvmflow._logging import get_logger
from kvmflow.errors import ContUnanswered, KvmflowError, MisuseError
from kvmflow.feed import BoundedFeed
from kvmflow.instance.instance import Instance
from kvmflow.instance.states import InstanceEvent, InstanceState
from kvmflow.kvm.hypervisor import KvmHypervisor
from kvmflow.kvm.qemu_info import QemuInfo
from kvmflow.kvm.runtime import SavedRuntime
from kvmflow.migration import aborts, prepare
from kvmflow.migration.actions import PolicyActions
from kvmflow.migration.compat import migrate_arguments
from kvmflow.migration.decide import Decision, PolicyEngine
from kvmflow.migration.disks import DiskCopy
from kvmflow.migration.errors import MigrationError
from kvmflow.migration.hmp_monitor import HmpMigrationMonitor
from kvmflow.migration.outcome import INFO, Outcome, outcome_error
from kvmflow.migration.phases import (
    MigrationPhase,
    PhaseChange,
    PhaseEvent,
    PhaseListener,
    PhaseTracker,
)
from kvmflow.migration.policy import MigrationPolicy
from kvmflow.migration.results import MigrationProgress, MigrationResult, ProgressCallback
from kvmflow.migration.source import MigrationSource, SourceMonitor
from kvmflow.migration.status import BadAnswer, MigrationSnapshot, MigrationStatus
from kvmflow.migration.target import MigrationTarget
from kvmflow.migration.watch import watch_migration
from kvmflow.monitor.hmp import HMPClient
from kvmflow.monitor.queries import RunState, query_status

_log = get_logger("kvmflow.migration")

Phase, Step = MigrationPhase, PhaseEvent
_POSTCOPY_STATUSES = (
    MigrationStatus.POSTCOPY_ACTIVE,
    MigrationStatus.POSTCOPY_PAUSED,
    MigrationStatus.POSTCOPY_RECOVER,
    MigrationStatus.POSTCOPY_RECOVER_SETUP,
)


async def migrate(
    instance: Instance,
    target: KvmHypervisor,
    *,
    target_address: str,
    port: int | None = None,
    live: bool = True,
    policy: MigrationPolicy | None = None,
    on_progress: ProgressCallback | None = None,
    on_phase: PhaseListener | None = None,
    source_qmp: SourceMonitor | None = None,
    source_monitor: Literal["qmp", "hmp"] = "qmp",
    source_uri: str | None = None,
) -> MigrationResult:
    """Migrate ``instance`` to ``target``, whose QEMU will listen on ``target_address``.

    ``source_uri`` is where the source connects when that differs from where the target
    listens (a relay or NAT in between); by default the same ``tcp:ADDRESS:PORT``.

    ``port`` defaults to the instance's ``migration_port``; 0 lets the target pick a free port
    (no collisions when many migrations run at once). ``policy`` defaults to the instance's
    own bandwidth and downtime. ``on_phase`` sees every phase step before the next one runs
    (a journal writes it there). ``source_monitor="hmp"`` is the explicit fallback for a
    source without a QMP socket (no events: it polls). Pass ``source_qmp`` to share an open
    monitor connection of the source. Raises :class:`MigrationError` when the migration did
    not happen or did not finish (``runs_on`` says where the instance runs then).
    """
    spec = instance.spec
    port = spec.hvparams.migration_port if port is None else port
    if not 0 <= port <= 65535:
        raise MisuseError(f"port {port} is not a TCP port: use 1 to 65535, or 0 for any free one")
    policy = policy or MigrationPolicy.from_hvparams(spec.hvparams)
    run = Migration(
        instance, target, target_address, port, live, policy, on_progress, on_phase, source_uri
    )
    deadline = policy.deadline_seconds(spec.memory_mib)
    details = {
        "source": instance.node_name,
        "target": target.node.name,
        "live": live,
        "address": target_address,
        "port": port,
        "policy": policy.as_record(),
        "deadline_at": time.time() + deadline if deadline is not None else None,
    }
    try:
        async with instance.operation("migrate", details) as held:
            if held is None:
                return await run.execute(source_qmp, source_monitor)
            run.phases.add_listener(lambda change: held.phase(*run.journal_step(change)))
            run.journal = lambda facts: held.phase(run.phases.phase.value, facts)
            run.report_to = held.report
            try:
                result = await run.execute(source_qmp, source_monitor)
            except MigrationError as error:
                held.outcome = str(error.outcome or "not-started")
                if error.runs_on == target.node.name:  # moved, though not finished
                    held.place(target.node.name)
                raise
            held.outcome = "moved"
            held.place(target.node.name)
            return result
    finally:
        if isinstance(on_progress, BoundedFeed):
            on_progress.close()


class Migration:
    """One migration attempt: its phase, its undo steps and what it reports."""

    def __init__(
        self,
        instance: Instance,
        target: KvmHypervisor,
        address: str,
        port: int,
        live: bool,
        policy: MigrationPolicy,
        on_progress: ProgressCallback | None,
        on_phase: PhaseListener | None,
        source_uri: str | None,
    ) -> None:
        self.instance = instance
        self.name = instance.name
        self.source = instance.hypervisor
        self.target_hv = target
        self.address, self.port = address, port
        self.live = live
        self.policy = policy
        self.on_progress = on_progress
        self.relay_uri = source_uri  # where the source connects, if not where the target is
        self.source_qemu: QemuInfo | None = None  # known once the pre-check ran
        self.disks = DiskCopy(self.name, self.source, target)  # the local disks it copies
        self.started_at = time.monotonic()
        self.reports = 0
        self.bad_answers: list[BadAnswer] = []
        self.policy_engine = PolicyEngine(policy, instance.spec.memory_mib, self.started_at)
        self.phases = PhaseTracker(self.name, self.source.node.name, target.node.name, on_phase)
        self.undo = contextlib.AsyncExitStack()  # undo steps, dropped at the switch-over
        self.was_running = True
        self.may_take_back = True  # False when the target may already have run the guest
        self.paused_ms: int | None = None
        self._target: MigrationTarget | None = None
        self._source: MigrationSource | None = None
        self._actions: PolicyActions | None = None
        # With a store: the journal (facts written before acting) and the progress sink.
        self.journal: Callable[[dict[str, Any]], Awaitable[None]] | None = None
        self.report_to: Callable[[dict[str, Any]], None] | None = None
        self.log = _log.bind(
            instance=self.name, source=self.source.node.name, target=target.node.name
        )

    def journal_step(self, change: PhaseChange) -> tuple[str, dict[str, Any]]:
        """What the journal records for a phase step, before it is taken: the phase, and
        at the stream what recovery needs to find and judge both QEMUs."""
        facts: dict[str, Any] = {"step": change.event.value, "from": change.before.value}
        if change.event is Step.STREAM:
            facts |= {
                "uri": self.source_uri,
                "port": self.target.port,
                "was_running": self.was_running,
                "paused_by_us": self.src.paused_at is not None,
            }
        if change.after is Phase.COMPLETED_ON_SOURCE:
            # Written before `cont` may go to the target: from here, if the target dies,
            # recovery cannot tell whether it ran the guest, and never resumes the source.
            facts["cont_may_be_sent"] = self.was_running
        return change.after.value, facts

    @property
    def target(self) -> MigrationTarget:
        assert self._target is not None
        return self._target

    @property
    def src(self) -> MigrationSource:
        assert self._source is not None
        return self._source

    @property
    def source_uri(self) -> str:
        return self.relay_uri or self.target.uri

    # ------------------------------------------------------------------ checking

    async def execute(
        self, source_qmp: SourceMonitor | None, monitor: Literal["qmp", "hmp"] = "qmp"
    ) -> MigrationResult:
        machine = self.instance.machine
        if machine.state not in (InstanceState.RUNNING, InstanceState.PAUSED):
            raise MisuseError(
                f"instance {self.name} is {machine.state.value}; only a running "
                "or paused instance can migrate"
            )
        if self.target_hv.node.name == self.source.node.name and (
            self.target_hv.paths == self.source.paths
        ):
            raise MisuseError(f"target of {self.name} is the node it runs on")
        runtime = await self.source.load_runtime(self.name)
        if await self.source.find_pid(self.name) is None or runtime is None:
            raise MigrationError(
                self.name, f"it is not running on {self.source.node.name}", runs_on=None
            )
        if await self.target_hv.is_running(self.name):
            raise MigrationError(
                self.name,
                f"it already runs on {self.target_hv.node.name}",
                runs_on=self.source.node.name,
            )
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
        # The resources stack (the target's monitor connection) closes on every path; the
        # undo stack is unwound by an abort or dropped at the switch-over.
        async with contextlib.AsyncExitStack() as resources:
            self.bind(qmp, resources)
            status = await query_status(qmp)
            if status.state not in (RunState.RUNNING, RunState.PAUSED):
                raise MigrationError(
                    self.name, f"source QEMU is {status.state.value}", runs_on=self.source.node.name
                )
            self.was_running = status.running
            runtime = await prepare.checked_runtime(self, qmp, runtime)
            self.instance.machine.fire(InstanceEvent.MIGRATE)
            self.log.info(
                "migration starting",
                address=self.address,
                port=self.port,
                live=self.live,
                bandwidth_mib=self.policy.bandwidth_mib,
                downtime_ms=self.policy.downtime_ms,
            )
            try:
                final = await self._transfer(qmp, runtime)
            except BaseException as exc:
                return await aborts.after_failure(self, qmp, exc, runtime)
            return await self.complete(qmp, final, runtime)

    def bind(self, qmp: SourceMonitor, resources: contextlib.AsyncExitStack) -> None:
        """Make both sides and the policy's actions, on the source monitor ``qmp``."""
        self._source = MigrationSource(qmp, self.source, self.name, self.policy)
        self._target = MigrationTarget(
            self.target_hv, self.name, self.address, self.port, self.policy, resources
        )
        self._actions = PolicyActions(
            qmp,
            self.target,
            self.policy,
            pause_source=self._pause_source,
            switched_to_postcopy=self._enter_postcopy,
        )

    # ----------------------------------------------------------------- streaming

    async def _transfer(self, qmp: SourceMonitor, runtime: SavedRuntime) -> MigrationSnapshot:
        await self.phases.step(Step.START_TARGET)
        if self.disks.wanted:
            await prepare.create_images(self)
        self.undo.push_async_callback(self.target.stop)
        await self.target.start(self.instance.spec, runtime, self.source.node.name)
        await self.phases.step(Step.TARGET_LISTENS)
        capabilities = self.policy.source_capabilities()
        if capabilities:
            await qmp.execute("migrate-set-capabilities", {"capabilities": capabilities})
        await qmp.execute("migrate-set-parameters", self.policy.qemu_parameters())
        if self.policy.tls:
            await prepare.encrypt(self, qmp)
        if self.disks.wanted:
            await prepare.copy_disks(self, qmp)
        if not self.live:
            await self._pause_source()
        with qmp.subscribe("MIGRATION", max_buffered=64) as events:
            await self.phases.step(Step.STREAM)  # before `migrate`: from here it may stream
            await qmp.execute("migrate", migrate_arguments(self.source_qemu, self.source_uri))
            return await watch_migration(
                qmp,
                events if self.policy.use_events else None,
                self.policy,
                on_snapshot=lambda snapshot: self.on_snapshot(snapshot),
                on_bad_answer=self.note_bad_answer,
            )

    async def _pause_source(self) -> None:
        """Stop the source's vCPUs (non-live, or the policy's pause); undone by ``cont``."""
        if not self.was_running or self.src.paused_at is not None:
            return
        if self.journal is not None:  # write-ahead: recovery must know to resume it
            await self.journal({"paused_by_us": True})
        await self.src.pause()
        self.undo.push_async_callback(self.src.resume)

    async def _enter_postcopy(self) -> None:
        """From the switch to post-copy on, the target holds the newest guest state."""
        if self.phases.phase is Phase.STREAMING:
            await self.phases.step(Step.SWITCH_TO_POSTCOPY)
            self.undo.pop_all()  # neither side may be thrown away any more

    async def on_snapshot(self, snapshot: MigrationSnapshot) -> None:
        """Judge one sample by the policy, act on it, and report it."""
        if snapshot.status in _POSTCOPY_STATUSES:
            await self._enter_postcopy()
        decisions = self.policy_engine.observe(snapshot, time.monotonic())
        # Reported first, so that listeners see an abort too.
        self.report_progress(snapshot, tuple(decisions))
        assert self._actions is not None
        for decision in decisions:
            await self._actions.apply(decision)
        if snapshot.status is MigrationStatus.POSTCOPY_PAUSED:
            await self._actions.recover_postcopy(self.source_uri)

    def report_progress(self, snapshot: MigrationSnapshot, decisions: tuple[Decision, ...]) -> None:
        self.reports += 1
        if self.report_to is not None:
            self.report_to(
                {
                    "status": snapshot.status.value,
                    "transferred": snapshot.transferred,
                    "remaining": snapshot.remaining,
                    "total": snapshot.total,
                    "mbps": snapshot.throughput_mbps,
                    "elapsed": round(time.monotonic() - self.started_at, 1),
                    "downtime_ms": self.policy_engine.downtime_ms,
                    "actions": [d.name for d in decisions],
                }
            )
        if self.on_progress is not None:
            self.on_progress(
                MigrationProgress(
                    self.name,
                    self.source.node.name,
                    self.target_hv.node.name,
                    time.monotonic() - self.started_at,
                    snapshot,
                    self.policy_engine.downtime_ms,
                    self.policy_engine.last_estimate,
                    decisions,
                )
            )

    def report_disks(self, copied: int, total: int) -> None:
        """Progress of the local disks' copy, before RAM streams (to the journal's report)."""
        if self.report_to is not None:
            self.report_to(
                {
                    "status": "copying-disks",
                    "disk_copied": copied,
                    "disk_total": total,
                    "elapsed": round(time.monotonic() - self.started_at, 1),
                }
            )

    def note_bad_answer(self, answer: BadAnswer, in_a_row: int) -> None:
        self.bad_answers.append(answer)

    # --------------------------------------------------------------- completion

    async def complete(
        self, qmp: SourceMonitor, final: MigrationSnapshot, runtime: SavedRuntime
    ) -> MigrationResult:
        """The source sent everything: get the target going (or take the guest back), then
        finish. Shielded: a cancel from here on waits for the end instead of tearing it."""
        with anyio.CancelScope(shield=True):
            final = await self.src.final_figures(final)
            await self.phases.step(Step.SOURCE_COMPLETED)
            if self.phases.phase is Phase.COMPLETED_ON_SOURCE:
                try:
                    if self.disks.wanted:  # the source stopped: the copies end at this moment
                        await self.disks.finish(qmp, await self.target.monitor())
                    await self.target.take_over(self.was_running)
                except ContUnanswered as exc:
                    await self.phases.step(Step.CONT_UNANSWERED)
                    raise await aborts.give_up(self, exc) from exc
                except (KvmflowError, TimeoutError) as exc:
                    if not self.may_take_back:  # an earlier controller may have sent `cont`
                        await self.phases.step(Step.CONT_UNANSWERED)
                        raise await aborts.give_up(self, exc) from exc
                    raise await aborts.take_back(self, qmp, exc) from exc
                await self.phases.step(Step.TARGET_TOOK_OVER)
            if self.src.paused_at is not None:
                self.paused_ms = round((time.monotonic() - self.src.paused_at) * 1000)
            self.undo.pop_all()  # the target took over: nothing is undone any more
            self.disks.created.clear()  # its images hold the guest now
            result = await self._finish(qmp, final, runtime)
        return result  # noqa: RET504 (outside the scope: mypy sees a scope that may swallow)

    async def _finish(
        self, qmp: SourceMonitor, final: MigrationSnapshot, runtime: SavedRuntime
    ) -> MigrationResult:
        """The guest runs on the target: record it there and end the source copy. Every
        step is tried within one deadline; a failed one is reported, never half-undone."""
        problems: list[str] = []
        source_state: str | None = None
        with anyio.move_on_after(self.policy.cleanup_timeout, shield=True) as scope:
            try:
                await self.target_hv.save_runtime(self.instance.spec, runtime)
            except KvmflowError as exc:
                problems.append(f"the target's runtime was not saved: {exc}")
            try:
                source_state = await self.src.end()
            except KvmflowError as exc:
                problems.append(f"the source copy on {self.source.node.name} did not end: {exc}")
            else:  # its local disks' copies go once nothing uses them
                problems += await self.disks.remove_source_copies()
        if scope.cancelled_caught:
            problems.append(f"finishing did not complete within {self.policy.cleanup_timeout:g} s")
        self.instance.hypervisor = self.target_hv
        outcome = Outcome.MOVED_UNFINISHED if problems else Outcome.MOVED
        self.instance.machine.fire(
            INFO[outcome].event_for(self.was_running), node=self.target_hv.node.name
        )
        await self.phases.step(Step.FINISHED)
        result = self._result(final, source_state)
        if problems:
            self.log.error("migration moved the guest but did not finish", problems=problems)
            raise self.error_for(Outcome.MOVED_UNFINISHED, "; ".join(problems))
        self.log.info(
            "migration completed",
            elapsed=round(result.elapsed, 3),
            downtime_ms=result.downtime_ms,
            total_time_ms=final.total_time_ms,
            transferred=final.transferred,
        )
        return result

    def _result(self, final: MigrationSnapshot, source_state: str | None) -> MigrationResult:
        return MigrationResult(
            self.name,
            self.source.node.name,
            self.target_hv.node.name,
            self.live,
            time.monotonic() - self.started_at,
            final,
            progress_reports=self.reports,
            bad_answers=self.bad_answers,
            source_final_state=source_state,
            decisions=list(self.policy_engine.decisions),
            postcopy=any(c.after is Phase.POSTCOPY for c in self.phases.history),
            postcopy_recoveries=self._actions.recoveries if self._actions else 0,
            target_uri=self.target.uri,
            paused_ms=self.paused_ms,
            phases=tuple(self.phases.history),
        )

    def error_for(self, outcome: Outcome, cause: BaseException | str) -> MigrationError:
        return outcome_error(
            outcome,
            self.name,
            self.source.node.name,
            self.target_hv.node.name,
            cause,
            self.bad_answers,
            self._target.last_words if self._target is not None else "",
        )


__all__ = ["Migration", "SourceMonitor", "migrate"]
