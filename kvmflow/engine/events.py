"""Typed events the engine publishes for embedding controllers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from kvmflow.feed import BoundedFeed
from kvmflow.migration.decide import Decision
from kvmflow.migration.results import MigrationProgress, MigrationResult


@dataclass(frozen=True)
class EngineEvent:
    """Base of every engine event: which migration, from where to where."""

    migration_id: int
    instance: str
    source: str
    target: str


@dataclass(frozen=True)
class MigrationQueued(EngineEvent):
    priority: int = 0


@dataclass(frozen=True)
class MigrationStarted(EngineEvent):
    bandwidth_mib: int | None = None


@dataclass(frozen=True)
class MigrationProgressed(EngineEvent):
    progress: MigrationProgress | None = None


@dataclass(frozen=True)
class PolicyActionTaken(EngineEvent):
    decision: Decision | None = None


@dataclass(frozen=True)
class BandwidthRebalanced(EngineEvent):
    bandwidth_mib: int = 0


@dataclass(frozen=True)
class MigrationCompleted(EngineEvent):
    result: MigrationResult | None = None


@dataclass(frozen=True)
class MigrationFailed(EngineEvent):
    reason: str = ""
    runs_on: str | None = None


@dataclass(frozen=True)
class MigrationCancelled(EngineEvent):
    started: bool = False


@dataclass(frozen=True)
class Statistics:
    """A snapshot of the engine's load."""

    active: int
    queued: int
    completed: int
    failed: int
    cancelled: int
    bytes_moved: int
    outbound: dict[str, int] = field(default_factory=dict)
    inbound: dict[str, int] = field(default_factory=dict)


class EventFeed(BoundedFeed[EngineEvent]):
    """One subscriber's engine events; closing it (or leaving its ``with`` block) detaches
    it from the engine, so that subscribers that come and go leave nothing behind."""

    def __init__(self, max_buffered: int, detach: Callable[[EventFeed], None]) -> None:
        super().__init__(max_buffered)
        self._detach = detach

    def close(self) -> None:
        super().close()
        self._detach(self)

    def __enter__(self) -> EventFeed:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
