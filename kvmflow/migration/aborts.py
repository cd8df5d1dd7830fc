"""The failure paths of one migration: an abort before the switch-over (cancel the stream,
unwind the undo steps, settle the source), a source taking the guest back when the target
never got it going, and the exits of post-copy, which never resume the source.

Each runs shielded and within ``policy.cleanup_timeout``, and ends in :func:`conclude`,
which looks the outcome up from (phase, what the clean-up found) and records it on the
instance. They are functions of the :class:`~kvmflow.migration.migrate.Migration` they
clean up after, split off so that each module holds one idea.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio

from kvmflow.errors import ConnectionLostError, KvmflowError
from kvmflow.kvm.runtime import SavedRuntime
from kvmflow.migration.errors import MigrationError
from kvmflow.migration.outcome import INFO, Finding, Side, outcome_of
from kvmflow.migration.phases import MigrationPhase, PhaseEvent
from kvmflow.migration.results import MigrationResult
from kvmflow.migration.source import SourceMonitor
from kvmflow.migration.status import MigrationSnapshot
from kvmflow.migration.watch import watch_migration

if TYPE_CHECKING:
    from kvmflow.migration.migrate import Migration

Phase, Step = MigrationPhase, PhaseEvent


def describe(cause: BaseException) -> str:
    """What stopped a migration, for a log line: a cancel is "cancelled" (its repr names
    tasks and file paths nobody needs), kvmflow's errors say their message."""
    if isinstance(cause, anyio.get_cancelled_exc_class()):
        return "cancelled"
    if isinstance(cause, KvmflowError):
        return f"{type(cause).__name__}: {cause}"
    return repr(cause)


async def take_back(run: Migration, qmp: SourceMonitor, cause: BaseException) -> MigrationError:
    """The source sent everything but the target did not get the guest going (it died
    loading the final device state, hung, or refused ``cont``): the guest never ran
    there, so the source (in ``postmigrate``, its disks handed over) takes it back with
    ``cont``, as libvirt does, once the target is gone."""
    run.log.warning("target never took over; resuming the source", cause=describe(cause))
    await run.phases.step(Step.ABORT)
    finding = Finding.SOURCE_KEPT
    with anyio.move_on_after(run.policy.cleanup_timeout) as scope:
        await run.target.stop()
        await run.disks.remove_images()  # the target never ran the guest on them
        try:
            if await run.target.is_running():
                raise MigrationError(run.name, "the target could not be stopped", runs_on=None)
            if run.was_running:
                await qmp.execute("cont", timeout=10)
        except KvmflowError as exc:
            run.log.error("source could not take the guest back", error=str(exc))
            cause, finding = exc, Finding.UNDO_FAILED
    if scope.cancelled_caught:
        finding = Finding.UNDO_FAILED
    return await end_abort(run, Phase.COMPLETED_ON_SOURCE, finding, cause)


async def after_failure(
    run: Migration, qmp: SourceMonitor, exc: BaseException, runtime: SavedRuntime
) -> MigrationResult:
    """Clean up after ``exc`` according to the phase it hit; return the result if the
    migration completed anyway, else raise (the original exception for a cancel or a
    bug, a :class:`MigrationError` saying where the guest runs otherwise)."""
    phase = run.phases.phase
    with anyio.CancelScope(shield=True):
        if phase is Phase.POSTCOPY:
            moved, error = await postcopy_exit(run, qmp, exc, runtime)
        else:
            moved, error = await abort(run, qmp, exc, runtime)
    if moved is not None:
        # QEMU completed before the abort took effect: the instance moved. A cancel
        # still propagates; any other failure turns into success.
        if isinstance(exc, anyio.get_cancelled_exc_class()):
            raise exc
        return moved
    assert error is not None
    if isinstance(exc, KvmflowError):
        raise error from exc
    if not isinstance(exc, anyio.get_cancelled_exc_class()):
        run.log.exception("migration failed on a bug", error=repr(exc))
    raise exc


async def abort(
    run: Migration, qmp: SourceMonitor, cause: BaseException, runtime: SavedRuntime
) -> tuple[MigrationResult | None, MigrationError | None]:
    """Cancel the stream and unwind the undo stack within one deadline."""
    phase = run.phases.phase
    run.log.warning("migration aborting", phase=phase.value, cause=describe(cause))
    await run.phases.step(Step.ABORT)
    finding = Finding.SOURCE_KEPT
    completed: MigrationSnapshot | None = None
    with anyio.move_on_after(run.policy.cleanup_timeout) as scope:
        reachable = True
        if phase is Phase.STREAMING and isinstance(cause, ConnectionLostError):
            contact = await run.src.reach_again()
            if contact == "unknown":
                # The source may still stream and cannot be asked: the target is left
                # waiting (it runs nothing) so that no guest state is thrown away.
                run.undo.pop_all()
                await run.phases.step(Step.GIVE_UP)
                return None, await conclude(run, phase, Finding.CONTACT_LOST, cause)
            reachable = contact == "reconnected"
        if phase is Phase.STREAMING and reachable:
            completed = await run.src.cancel()
        if completed is not None:
            run.undo.pop_all()
        else:
            await run.undo.aclose()
            if await run.target.is_running():
                finding = Finding.UNDO_FAILED
            elif not await run.src.is_running():
                finding = Finding.SOURCE_DIED
            elif phase is Phase.STREAMING and reachable:
                await run.src.settle(run.was_running)
    if scope.cancelled_caught:
        finding = Finding.UNDO_FAILED
    elif completed is not None:
        try:
            return await run.complete(qmp, completed, runtime), None
        except MigrationError as error:
            return None, error
    return None, await end_abort(run, phase, finding, cause)


async def postcopy_exit(
    run: Migration, qmp: SourceMonitor, cause: BaseException, runtime: SavedRuntime
) -> tuple[MigrationResult | None, MigrationError | None]:
    """After the switch to post-copy the target holds the newest guest state: the
    source is never resumed and the target never killed. A cancel waits for the
    migration to finish instead; a failure leaves both QEMUs for the operator."""
    if isinstance(cause, anyio.get_cancelled_exc_class()):
        run.log.warning("cancel requested during post-copy; finishing the migration")
        with anyio.move_on_after(run.policy.cancel_timeout):
            try:
                final = await watch_migration(
                    qmp, None, run.policy, on_snapshot=lambda s: run.report_progress(s, ())
                )
                return await run.complete(qmp, final, runtime), None
            except MigrationError as error:
                return None, error
            except KvmflowError as exc:
                cause = exc
    run.log.error(
        "post-copy failed; the target holds the newest guest state and the "
        "source must not be resumed",
        cause=describe(cause),
    )
    await run.phases.step(Step.GIVE_UP)
    return None, await conclude(run, Phase.POSTCOPY, Finding.LEFT_AS_IS, cause)


async def end_abort(
    run: Migration, phase: MigrationPhase, finding: Finding, cause: BaseException
) -> MigrationError:
    """The abort is over: ``aborted`` if the source has the guest, else ``stranded``."""
    source_has_it = INFO[outcome_of(phase, finding)].side is Side.SOURCE
    await run.phases.step(Step.ABORT_DONE if source_has_it else Step.GIVE_UP)
    return await conclude(run, phase, finding, cause)


async def give_up(run: Migration, cause: BaseException) -> MigrationError:
    """Neither copy can be vouched for: leave both for the operator."""
    phase = run.phases.phase
    run.log.error("migration stranded; both QEMUs left as they are", cause=describe(cause))
    await run.phases.step(Step.GIVE_UP)
    return await conclude(run, phase, Finding.LEFT_AS_IS, cause)


async def conclude(
    run: Migration, phase: MigrationPhase, finding: Finding, cause: BaseException
) -> MigrationError:
    """Record the outcome of (phase, finding) on the instance; the error that says it."""
    outcome = outcome_of(phase, finding)
    info = INFO[outcome]
    node = run.target_hv.node.name if info.side is Side.TARGET else None
    if info.side is Side.TARGET:
        run.instance.hypervisor = run.target_hv
    run.instance.machine.fire(info.event_for(run.was_running), node=node)
    run.log.warning("migration ended", outcome=outcome.value, phase=phase.value)
    return run.error_for(outcome, cause)
