"""QEMU's migration status and typed snapshots of ``query-migrate`` answers.

An answer is either a :class:`MigrationSnapshot` or a :class:`BadAnswer` (unparseable,
empty, no status), which the watcher counts in the ancestor's spirit. A status this module
does not know (a newer QEMU's) is not a bad answer: the snapshot says
:attr:`MigrationStatus.UNKNOWN`, keeps the word in ``raw_status``, and counts as in progress.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any


class MigrationStatus(enum.StrEnum):
    """QAPI ``MigrationStatus`` (QEMU 7.2 to 10.x), and UNKNOWN for a word none of them has."""

    NONE = "none"
    SETUP = "setup"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    ACTIVE = "active"
    POSTCOPY_ACTIVE = "postcopy-active"
    POSTCOPY_PAUSED = "postcopy-paused"
    POSTCOPY_RECOVER = "postcopy-recover"
    COMPLETED = "completed"
    FAILED = "failed"
    COLO = "colo"
    PRE_SWITCHOVER = "pre-switchover"
    DEVICE = "device"
    WAIT_UNPLUG = "wait-unplug"
    POSTCOPY_RECOVER_SETUP = "postcopy-recover-setup"  # QEMU 9.1+
    UNKNOWN = "(unknown)"  # never sent by QEMU: parentheses are not in its enum's alphabet

    @property
    def finished(self) -> bool:
        return self in (
            MigrationStatus.COMPLETED,
            MigrationStatus.FAILED,
            MigrationStatus.CANCELLED,
        )


@dataclass(frozen=True)
class MigrationSnapshot:
    """One ``query-migrate`` answer, typed. Byte counts are bytes; times milliseconds."""

    status: MigrationStatus
    transferred: int = 0
    remaining: int = 0
    total: int = 0
    throughput_mbps: float = 0.0
    dirty_pages_rate: int = 0
    page_size: int = 4096
    dirty_sync_count: int = 0
    expected_downtime_ms: int | None = None
    downtime_ms: int | None = None
    total_time_ms: int | None = None
    error: str | None = None
    raw_status: str = ""  # what QEMU said, for UNKNOWN

    @property
    def dirty_bytes_rate(self) -> int:
        """Bytes dirtied per second (dirty pages/s times page size)."""
        return self.dirty_pages_rate * self.page_size


@dataclass(frozen=True)
class BadAnswer:
    """An answer the watcher could not use, with why and what came."""

    reason: str
    raw: str


def parse_query_migrate(answer: Any) -> MigrationSnapshot | BadAnswer:
    """Classify one ``query-migrate`` return value."""
    if not isinstance(answer, dict):
        return BadAnswer("not an object", repr(answer))
    if not answer:
        return BadAnswer("empty answer", "{}")
    raw_status = answer.get("status")
    if not isinstance(raw_status, str):
        return BadAnswer("no status", repr(answer))
    try:
        status = MigrationStatus(raw_status)
    except ValueError:
        status = MigrationStatus.UNKNOWN
    ram = answer.get("ram")
    ram = ram if isinstance(ram, dict) else {}
    try:
        return MigrationSnapshot(
            status=status,
            transferred=int(ram.get("transferred", 0)),
            remaining=int(ram.get("remaining", 0)),
            total=int(ram.get("total", 0)),
            throughput_mbps=float(ram.get("mbps", 0.0)),
            dirty_pages_rate=int(ram.get("dirty-pages-rate", 0)),
            page_size=int(ram.get("page-size", 4096)) or 4096,
            dirty_sync_count=int(ram.get("dirty-sync-count", 0)),
            expected_downtime_ms=_optional_int(answer.get("expected-downtime")),
            downtime_ms=_optional_int(answer.get("downtime")),
            total_time_ms=_optional_int(answer.get("total-time")),
            error=answer.get("error-desc") if isinstance(answer.get("error-desc"), str) else None,
            raw_status=raw_status,
        )
    except (TypeError, ValueError):
        return BadAnswer("numbers that are not numbers", repr(answer))


def _optional_int(value: Any) -> int | None:
    if value is None:
        return None
    return int(value)
