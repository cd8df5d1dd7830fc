"""Adopting a migration whose controller died: QEMU goes on streaming with nobody watching;
recovery attaches a new watcher and carries on under the recorded policy and deadline, on
the very abort and finishing paths of the original driver (or aborts it at once).

What the journal recorded is read back as a :class:`RecordedMigration`; :func:`adopt`
rebuilds the driver at the recorded phase with the undo steps that phase holds (kill the
target, resume a source we paused; none after the switch to post-copy) and lets QEMU's
answers decide the rest: a stream still active is watched, one completed is finished, one
failed or cancelled is cleaned up.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from kvmflow._logging import get_logger
from kvmflow.errors import KvmflowError, OperationAbortedError, RecoveryError
from kvmflow.instance.instance import Instance
from kvmflow.instance.states import InstanceEvent
from kvmflow.kvm.hypervisor import KvmHypervisor
from kvmflow.migration.aborts import after_failure
from kvmflow.migration.decide import PolicyEngine
from kvmflow.migration.disks import LocalDisk
from kvmflow.migration.errors import MigrationError
from kvmflow.migration.migrate import Migration
from kvmflow.migration.phases import MigrationPhase, PhaseListener, PhaseTracker
from kvmflow.migration.policy import MigrationPolicy
from kvmflow.migration.results import MigrationResult, ProgressCallback
from kvmflow.migration.watch import watch_migration

Phase = MigrationPhase
_log = get_logger("kvmflow.migration")

#: The phases from which an adopted migration resumes with its driver (the rest are
#: finished or cleaned by recovery directly).
ADOPTABLE: frozenset[MigrationPhase] = frozenset(
    {Phase.STREAMING, Phase.POSTCOPY, Phase.COMPLETED_ON_SOURCE, Phase.ABORTING}
)


@dataclass(frozen=True)
class RecordedMigration:
    """What the journal holds about one migration: enough to find and judge both QEMUs."""

    instance: str
    source: str
    target: str
    address: str
    port: int
    uri: str | None
    live: bool
    policy: MigrationPolicy
    phase: MigrationPhase
    before: MigrationPhase | None  # the phase before the last step (the abort's origin)
    was_running: bool
    paused_by_us: bool
    cont_may_be_sent: bool  # the dead controller may have started the target's vCPUs
    started_at: float  # time.time() of the intent
    deadline_at: float | None
    local_disks: tuple[LocalDisk, ...] = ()  # copied with it (journaled before the images)

    @classmethod
    def from_journal(
        cls, instance: str, phase: str, details: dict[str, Any], started_at: float
    ) -> RecordedMigration:
        """Read a migration back from its journal entry's phase and details."""
        try:
            before = details.get("from")
            return cls(
                instance,
                str(details["source"]),
                str(details["target"]),
                str(details["address"]),
                int(details["port"]),
                details.get("uri"),
                bool(details.get("live", True)),
                MigrationPolicy.from_record(details["policy"]),
                Phase(phase) if phase != "intent" else Phase.CHECKING,
                Phase(before) if before else None,
                bool(details.get("was_running", True)),
                bool(details.get("paused_by_us", False)),
                bool(details.get("cont_may_be_sent", False)),
                started_at,
                details.get("deadline_at"),
                tuple(LocalDisk.from_record(d) for d in details.get("local_disks", ())),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise RecoveryError(
                f"the journal entry of {instance}'s migration is incomplete or unreadable "
                f"({exc!r}); nothing was touched"
            ) from exc

    @property
    def resumes_from(self) -> MigrationPhase:
        """The phase the driver is rebuilt at: where the stream stood."""
        if self.phase is Phase.ABORTING:
            return (
                self.before
                if self.before in (Phase.STREAMING, Phase.POSTCOPY)
                else (Phase.STREAMING)
            )
        if self.phase is Phase.COMPLETED_ON_SOURCE:
            return Phase.STREAMING  # QEMU's `completed` is replayed, then the switch-over
        return self.phase


async def adopt(
    instance: Instance,
    target: KvmHypervisor,
    record: RecordedMigration,
    *,
    abort: bool = False,
    on_phase: PhaseListener | None = None,
    on_progress: ProgressCallback | None = None,
    journal: Callable[[str, dict[str, Any]], Awaitable[None]] | None = None,
    report_to: Callable[[dict[str, Any]], None] | None = None,
) -> MigrationResult:
    """Carry on the recorded migration of ``instance`` (bound to its source node) to
    ``target``; ``abort`` cancels it instead (as does a recorded abort). Returns the result
    of a migration that completed; raises :class:`MigrationError` (saying where the guest
    runs) otherwise, exactly like :func:`~kvmflow.migration.migrate`. ``journal(phase, facts)``
    and ``report_to`` are the store's sinks for steps and progress, as in a fresh migration."""
    if record.phase not in ADOPTABLE:
        raise RecoveryError(f"a migration in phase {record.phase} is not adopted")
    phase = record.resumes_from
    run = Migration(
        instance,
        target,
        record.address,
        record.port,
        record.live,
        record.policy,
        on_progress,
        on_phase,
        record.uri,
    )
    run.phases = PhaseTracker(
        instance.name, instance.node_name, target.node.name, on_phase, phase=phase
    )
    # The deadline runs from the original start, not from the adoption.
    run.started_at = time.monotonic() - max(0.0, time.time() - record.started_at)
    run.policy_engine = PolicyEngine(record.policy, instance.spec.memory_mib, run.started_at)
    run.was_running = record.was_running
    run.may_take_back = not record.cont_may_be_sent
    if journal is not None:  # the store's journal, first: every step before it is taken
        run.phases.add_listener(lambda change: journal(*run.journal_step(change)))
        run.journal = lambda facts: journal(run.phases.phase.value, facts)
    run.report_to = report_to
    runtime = await instance.hypervisor.load_runtime(instance.name)
    if runtime is None:
        raise MigrationError(
            instance.name,
            f"its runtime on {instance.node_name} is gone; the migration cannot be adopted",
            runs_on=None,
        )
    policy = record.policy
    async with instance.machine.operation_scope("migrate"), contextlib.AsyncExitStack() as stack:
        qmp = await stack.enter_async_context(
            instance.hypervisor.qmp(instance.name, command_timeout=policy.query_timeout)
        )
        run.bind(qmp, stack)
        run.target.started = True
        try:  # opened here, outside the shielded finishing, as a fresh migration does
            await run.target.monitor()
        except KvmflowError as exc:  # gone: the driver's paths deal with a missing target
            _log.warning("target monitor not reachable", instance=instance.name, error=str(exc))
        run.disks.disks = list(record.local_disks)
        if phase is Phase.STREAMING:  # the undo steps that phase holds
            if record.local_disks:
                run.disks.created = [d.target_path for d in record.local_disks]
                run.undo.push_async_callback(run.disks.remove_images)
            run.undo.push_async_callback(run.target.stop)
            if record.local_disks:
                run.undo.push_async_callback(run.disks.cancel, qmp)
            if record.paused_by_us:
                run.src.paused_at = time.monotonic()
                run.undo.push_async_callback(run.src.resume)
        instance.machine.fire(InstanceEvent.MIGRATE)
        with qmp.subscribe("MIGRATION", max_buffered=64) as events:
            try:
                if abort or record.phase is Phase.ABORTING:
                    raise OperationAbortedError(
                        f"recovery aborts the migration of {instance.name}",
                        requested_by="recovery",
                    )
                final = await watch_migration(
                    qmp,
                    events if policy.use_events else None,
                    policy,
                    on_snapshot=run.on_snapshot,
                    on_bad_answer=run.note_bad_answer,
                )
            except BaseException as exc:
                return await after_failure(run, qmp, exc, runtime)
            return await run.complete(qmp, final, runtime)


__all__ = ["ADOPTABLE", "RecordedMigration", "adopt"]
