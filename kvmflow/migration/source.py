"""The source side of one migration: its monitor and QEMU, paused, cancelled and ended.

Everything here is bounded by the policy's timeouts; nothing raises for a monitor that
stops answering during clean-up (the caller decides from what these steps report).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Literal, Protocol

import anyio

from kvmflow._logging import get_logger
from kvmflow.errors import ConnectionLostError, KvmflowError
from kvmflow.kvm.hypervisor import KvmHypervisor
from kvmflow.migration.policy import MigrationPolicy
from kvmflow.migration.status import MigrationSnapshot, MigrationStatus
from kvmflow.migration.watch import query_migration
from kvmflow.monitor.events import EventSubscription
from kvmflow.monitor.queries import CommandRunner, RunState, Status, query_status

_log = get_logger("kvmflow.migration")

#: How long to ask again for the final figures QEMU fills in just after ``completed``.
FINAL_FIGURES_SECONDS = 2.0

Contact = Literal["dead", "reconnected", "unknown"]


class SourceMonitor(CommandRunner, Protocol):
    """What the migration needs of the source's monitor: commands, events (possibly none)
    and a way to reconnect. A :class:`QMPClient` is one; :class:`HmpMigrationMonitor` too."""

    def subscribe(self, *names: str, max_buffered: int = 1000) -> EventSubscription: ...

    async def reconnect(self) -> None: ...


class MigrationSource:
    """The source QEMU of one migration on ``hypervisor``, driven through ``monitor``."""

    def __init__(
        self, monitor: SourceMonitor, hypervisor: KvmHypervisor, name: str, policy: MigrationPolicy
    ) -> None:
        self.monitor = monitor
        self.hypervisor = hypervisor
        self.name = name
        self.policy = policy
        self.paused_at: float | None = None  # when we stopped its vCPUs
        self._log = _log.bind(instance=name, source=hypervisor.node.name)

    @property
    def node_name(self) -> str:
        return self.hypervisor.node.name

    async def pause(self) -> None:
        """Stop the guest's vCPUs (non-live, or the policy's pause)."""
        await self.monitor.execute("stop")
        self.paused_at = time.monotonic()

    async def resume(self) -> None:
        """``cont`` after a pause of ours; logged, never raised (an undo step)."""
        try:
            await self.monitor.execute("cont", timeout=10)
        except KvmflowError as exc:
            self._log.error("source could not be resumed", error=str(exc))

    async def is_running(self) -> bool:
        return await self.hypervisor.is_running(self.name)

    async def reach_again(self) -> Contact:
        """After the monitor connection dropped (QEMU died, or only the path to it, such as
        an SSH session): ``dead``, ``reconnected``, or ``unknown`` if the source node cannot
        be asked within the cancel timeout."""
        with anyio.move_on_after(self.policy.cancel_timeout):
            while True:
                try:
                    if not await self.is_running():
                        return "dead"
                    await self.monitor.reconnect()
                except KvmflowError as exc:
                    self._log.warning("source not reachable yet", error=str(exc))
                    await anyio.sleep(0.5)
                else:
                    self._log.info("source monitor reconnected")
                    return "reconnected"
        return "unknown"

    async def cancel(self) -> MigrationSnapshot | None:
        """``migrate_cancel`` and wait for QEMU to confirm; the ``completed`` snapshot if
        the migration finished first, else None."""
        try:
            try:
                await self.monitor.execute("migrate_cancel", timeout=10)
            except ConnectionLostError:
                # An HMP connection is closed when a command is cut short; reopen it.
                await self.monitor.reconnect()
                await self.monitor.execute("migrate_cancel", timeout=10)
            with anyio.move_on_after(self.policy.cancel_timeout):
                while True:
                    result = await query_migration(self.monitor, self.policy.query_timeout)
                    if isinstance(result, MigrationSnapshot):
                        if result.status is MigrationStatus.COMPLETED:
                            self._log.warning("migration completed before the cancel took effect")
                            return result
                        if result.status in (MigrationStatus.CANCELLED, MigrationStatus.FAILED):
                            return None
                    elif result.raw == "{}":  # `migrate` never reached QEMU: nothing to cancel
                        return None
                    await anyio.sleep(0.05)
        except KvmflowError as exc:
            self._log.warning("migrate_cancel failed", error=str(exc))
            return None
        self._log.warning(
            "QEMU did not confirm the cancel in time", timeout=self.policy.cancel_timeout
        )
        return None

    async def _settled_status(self) -> Status:
        """QEMU's run state once it has left finish-migrate, the transient state at the end
        of a stream (bounded: after the wait, whatever it says then)."""
        status = await query_status(self.monitor, timeout=10)
        with anyio.move_on_after(FINAL_FIGURES_SECONDS):
            while status.state is RunState.FINISH_MIGRATE:
                await anyio.sleep(0.01)  # a run state can only be polled
                status = await query_status(self.monitor, timeout=10)
        return status

    async def settle(self, was_running: bool) -> None:
        """After a failed or cancelled stream QEMU restarts the vCPUs itself, a moment after
        it reports the end (the source sits in finish-migrate meanwhile): wait for that
        (bounded), and resume a guest that was running if QEMU left it stopped. Safe: the
        stream did not complete, so the target never ran the guest."""
        try:
            status = await self._settled_status()
            if was_running and not status.running:
                self._log.warning(
                    "source left stopped after the abort; resuming", state=status.state.value
                )
                await self.monitor.execute("cont", timeout=10)
        except KvmflowError as exc:
            self._log.error("source state after the abort unknown", error=str(exc))

    async def final_figures(self, final: MigrationSnapshot) -> MigrationSnapshot:
        """QEMU reports ``completed`` a moment before it fills in the total time and the
        downtime: ask again (bounded) so that the result never shows a 0 it did not mean."""
        with anyio.move_on_after(FINAL_FIGURES_SECONDS):
            while not final.total_time_ms or final.downtime_ms is None:
                await anyio.sleep(0.01)
                try:
                    answer = await query_migration(self.monitor, self.policy.query_timeout)
                except KvmflowError as exc:  # the figures are nice to have; the move is not
                    self._log.warning("final migration figures unavailable", error=str(exc))
                    break
                if isinstance(answer, MigrationSnapshot) and answer.status is final.status:
                    final = answer
        if not final.total_time_ms:  # still unset: say so rather than report a 0
            final = dataclasses.replace(final, total_time_ms=None)
        return final

    async def end(self) -> str | None:
        """Quit the source QEMU (it is in ``postmigrate``) and remove its files; return the
        run state it was in. Raises if the process cannot be ended."""
        state: str | None = None
        try:
            # Report where it settles (postmigrate), not the finish-migrate it passes through.
            status = await self._settled_status()
            state = status.state.value
            await self.monitor.execute("quit", timeout=10)
        except KvmflowError as exc:
            self._log.warning("source did not quit cleanly; killing", error=str(exc))
        await self.hypervisor.stop(self.name, force=True)
        return state
