"""Live progress bars for migrations (rich), fed by engine events.

One bar per migration shows what an operator needs to judge it: the bar fills as QEMU's
``remaining`` falls (not bytes sent against RAM size, which overshoots while the guest
dirties memory), then the rate sent against the rate the guest dirties (both MiB/s), the
pass (dirty-sync count), the downtime limit in force, the policy's estimate and its latest
action. An overall bar counts finished migrations. Nothing is drawn when output is not a
terminal or in ``--json`` mode.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn

from kvmflow.engine.events import (
    EngineEvent,
    MigrationCancelled,
    MigrationCompleted,
    MigrationFailed,
    MigrationProgressed,
    MigrationQueued,
    MigrationStarted,
    PolicyActionTaken,
)

MIB = 1024 * 1024
#: Every text column of a bar, empty.
_BLANK: dict[str, Any] = {
    "moved": "",
    "rate": "",
    "left": "",
    "passes": "",
    "eta": "",
    "downtime": "",
    "action": "",
}


def human_bytes(value: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"  # pragma: no cover


class MigrationBars:
    """Draws one bar per migration plus an overall bar; a no-op when disabled."""

    def __init__(self, console: Console, *, enabled: bool, total: int = 0) -> None:
        self.enabled = enabled
        self.progress = Progress(
            TextColumn("{task.description}", justify="left"),
            BarColumn(bar_width=24),
            TextColumn("{task.fields[moved]}"),
            TextColumn("{task.fields[rate]}"),
            TextColumn("{task.fields[left]}"),
            TextColumn("{task.fields[passes]}"),
            TextColumn("[cyan]{task.fields[eta]}"),
            TextColumn("{task.fields[downtime]}"),
            TextColumn("[magenta]{task.fields[action]}"),
            console=console,
            transient=False,
            disable=not enabled,
        )
        self._tasks: dict[int, TaskID] = {}
        self._overall: TaskID | None = None
        self._total = total
        self._finished = 0

    def __enter__(self) -> MigrationBars:
        if self.enabled:
            self.progress.start()
            if self._total > 1:
                self._overall = self.progress.add_task(
                    "[bold]all migrations",
                    total=self._total,
                    **_BLANK,
                )
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.enabled:
            self.progress.stop()

    def handle(self, event: EngineEvent) -> None:
        """Update the bars from one engine event."""
        if not self.enabled:
            return
        task = self._tasks.get(event.migration_id)
        if isinstance(event, MigrationQueued) and task is None:
            self._tasks[event.migration_id] = self.progress.add_task(
                f"{event.instance} {event.source}->{event.target}",
                total=None,
                **(_BLANK | {"moved": "queued"}),
            )
        elif task is None:
            return
        elif isinstance(event, MigrationStarted):
            self.progress.update(task, moved="starting")
        elif isinstance(event, MigrationProgressed) and event.progress is not None:
            report = event.progress
            snap = report.snapshot
            self.progress.update(
                task,
                total=snap.total or None,
                completed=max(0, snap.total - snap.remaining),
                moved=f"{human_bytes(snap.remaining)} left of {human_bytes(snap.total)}",
                rate=f"sent {snap.throughput_mbps * 1e6 / 8 / MIB:.1f} MiB/s",
                left=f"dirtied {snap.dirty_bytes_rate / MIB:.1f} MiB/s",
                passes=f"pass {snap.dirty_sync_count}",
                eta=str(report.estimate) if report.estimate else snap.status.value,
                downtime=f"downtime limit {report.downtime_limit_ms} ms",
            )
        elif isinstance(event, PolicyActionTaken) and event.decision is not None:
            self.progress.update(task, action=event.decision.name)
        elif isinstance(event, (MigrationCompleted, MigrationFailed, MigrationCancelled)):
            label = {
                MigrationCompleted: "[green]done",
                MigrationFailed: "[red]failed",
                MigrationCancelled: "[yellow]cancelled",
            }[type(event)]
            current = self.progress.tasks[self._index(task)]
            self.progress.update(
                task, eta=label, completed=current.total or 1, total=current.total or 1
            )
            self._finished += 1
            if self._overall is not None:
                self.progress.update(self._overall, completed=self._finished)

    def _index(self, task: TaskID) -> int:
        for index, item in enumerate(self.progress.tasks):
            if item.id == task:
                return index
        raise KeyError(task)  # pragma: no cover
