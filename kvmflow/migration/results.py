"""What a migration reports while it runs and when it ends."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from kvmflow.feed import BoundedFeed
from kvmflow.migration.decide import Decision, Estimate
from kvmflow.migration.phases import PhaseChange
from kvmflow.migration.status import BadAnswer, MigrationSnapshot


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
    """How a completed migration went.

    ``downtime_ms`` is QEMU's figure for the last stop-and-copy of a live migration; for a
    non-live one it is the time the guest was paused, from the source's ``stop`` to the
    target's ``cont`` (QEMU's figure covers only the last copy).
    """

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
    paused_ms: int | None = None  # non-live: how long the guest was stopped
    phases: tuple[PhaseChange, ...] = ()

    @property
    def downtime_ms(self) -> int | None:
        if not self.live and self.paused_ms is not None:
            return self.paused_ms
        return self.final.downtime_ms

    @property
    def total_time_ms(self) -> int | None:
        return self.final.total_time_ms


ProgressCallback = Callable[[MigrationProgress], None]


class ProgressFeed(BoundedFeed[MigrationProgress]):
    """Progress reports as an async iterator: pass it as ``on_progress`` and iterate it in
    another task (``async for report in feed``); it ends when the migration ends."""
