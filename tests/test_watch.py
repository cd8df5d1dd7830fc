"""Watching a migration through a monitor that answers badly (the fake monitor)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import structlog.testing

from kvmflow.migration import (
    MigrationFailedError,
    MigrationPolicy,
    MigrationSnapshot,
    MigrationStatus,
    TooManyBadAnswersError,
    parse_query_migrate,
    watch_migration,
)
from kvmflow.migration.status import BadAnswer
from kvmflow.monitor import QMPClient
from kvmflow.testing import Error, FakeQMPServer, Hang, RawLine, Return

pytestmark = pytest.mark.anyio

POLICY = MigrationPolicy(poll_interval=0.05, retry_delay=0.01, query_timeout=0.3)
ACTIVE = Return(
    {
        "status": "active",
        "ram": {
            "transferred": 10,
            "remaining": 90,
            "total": 100,
            "mbps": 8.5,
            "dirty-pages-rate": 3,
            "page-size": 4096,
            "dirty-sync-count": 2,
        },
        "expected-downtime": 40,
    }
)
COMPLETED = Return(
    {
        "status": "completed",
        "downtime": 12,
        "total-time": 345,
        "ram": {"transferred": 100, "remaining": 0, "total": 100},
    }
)


@pytest.fixture
async def fake(sockdir: Path) -> AsyncIterator[FakeQMPServer]:
    async with FakeQMPServer(sockdir / "src.sock") as server:
        yield server


async def test_five_garbage_answers_fail_with_the_raw_answers(fake: FakeQMPServer) -> None:
    fake.script("query-migrate", *[RawLine(b"garbage %d" % n) for n in range(5)], ACTIVE)
    async with QMPClient(fake.path) as qmp:
        with pytest.raises(TooManyBadAnswersError) as info:
            await watch_migration(qmp, None, POLICY)
    assert "too many bad answers (5 in a row)" in str(info.value)
    assert [a.raw for a in info.value.answers] == [f"garbage {n}" for n in range(5)]
    assert len(fake.commands("query-migrate")) == 5


async def test_three_garbage_then_active_then_completed_succeeds(fake: FakeQMPServer) -> None:
    fake.script(
        "query-migrate",
        RawLine(b"{not json"),
        Return({}),
        RawLine(b"[]"),
        ACTIVE,
        RawLine(b"x"),
        RawLine(b"y"),
        RawLine(b"z"),
        RawLine(b"w"),
        COMPLETED,
    )
    seen: list[MigrationSnapshot] = []
    bad: list[tuple[BadAnswer, int]] = []
    async with QMPClient(fake.path) as qmp:
        final = await watch_migration(
            qmp,
            None,
            POLICY,
            on_snapshot=seen.append,
            on_bad_answer=lambda a, n: bad.append((a, n)),
        )
    assert final.status is MigrationStatus.COMPLETED
    assert (final.downtime_ms, final.total_time_ms) == (12, 345)
    assert [s.status for s in seen] == [MigrationStatus.ACTIVE, MigrationStatus.COMPLETED]
    # "active" reset the count: 3 bad, then 4 bad (one short of the limit).
    assert [n for _, n in bad] == [1, 2, 3, 1, 2, 3, 4]
    assert bad[1][0].reason == "empty answer"


async def test_unknown_status_is_in_progress_and_reported_once(fake: FakeQMPServer) -> None:
    """A newer QEMU's status word is not a bad answer: the migration goes on, and the word
    is reported once however often it comes."""
    fake.script("query-migrate", *[Return({"status": "teleporting"})] * 6, COMPLETED)
    seen: list[MigrationSnapshot] = []
    bad: list[BadAnswer] = []
    async with QMPClient(fake.path) as qmp:
        with structlog.testing.capture_logs() as logs:
            final = await watch_migration(
                qmp, None, POLICY, on_snapshot=seen.append, on_bad_answer=lambda a, n: bad.append(a)
            )
    assert final.status is MigrationStatus.COMPLETED
    assert bad == []
    assert [s.raw_status for s in seen[:6]] == ["teleporting"] * 6
    assert {s.status for s in seen[:6]} == {MigrationStatus.UNKNOWN}
    reports = [entry for entry in logs if entry.get("status") == "teleporting"]
    assert len(reports) == 1, logs
    assert reports[0]["log_level"] == "warning"


def test_postcopy_recover_setup_is_known() -> None:
    """QEMU 9.1+ reports ``postcopy-recover-setup`` while a broken post-copy reconnects."""
    parsed = parse_query_migrate({"status": "postcopy-recover-setup"})
    assert isinstance(parsed, MigrationSnapshot)
    assert parsed.status is MigrationStatus.POSTCOPY_RECOVER_SETUP


async def test_error_replies_and_silence_count_as_bad(fake: FakeQMPServer) -> None:
    fake.script("query-migrate", Error("GenericError", "busy"), Hang(), ACTIVE, COMPLETED)
    bad: list[BadAnswer] = []
    async with QMPClient(fake.path) as qmp:
        final = await watch_migration(qmp, None, POLICY, on_bad_answer=lambda a, n: bad.append(a))
    assert final.status is MigrationStatus.COMPLETED
    assert [a.reason for a in bad] == ["error reply GenericError", "no answer within 0.3 s"]


async def test_failed_status_fails_at_once(fake: FakeQMPServer) -> None:
    fake.script(
        "query-migrate",
        ACTIVE,
        Return({"status": "failed", "error-desc": "Unable to write to socket"}),
    )
    async with QMPClient(fake.path) as qmp:
        with pytest.raises(MigrationFailedError, match="Unable to write to socket") as info:
            await watch_migration(qmp, None, POLICY)
    assert info.value.status == "failed"


async def test_event_wakes_the_watcher_before_the_next_poll(fake: FakeQMPServer) -> None:
    slow_polls = MigrationPolicy(poll_interval=30, retry_delay=0.01)
    fake.script("query-migrate", ACTIVE, COMPLETED)
    async with QMPClient(fake.path) as qmp:
        with qmp.subscribe("MIGRATION") as events:
            import anyio

            async def complete_soon() -> None:
                await anyio.sleep(0.2)
                await fake.send_event("MIGRATION", {"status": "completed"})

            async with anyio.create_task_group() as tg:
                tg.start_soon(complete_soon)
                with anyio.fail_after(5):  # far less than the 30 s poll interval
                    final = await watch_migration(qmp, events, slow_polls)
    assert final.status is MigrationStatus.COMPLETED


def test_snapshot_parsing() -> None:
    snapshot = parse_query_migrate(ACTIVE.value)
    assert isinstance(snapshot, MigrationSnapshot)
    assert snapshot.dirty_bytes_rate == 3 * 4096
    assert snapshot.expected_downtime_ms == 40
    assert parse_query_migrate([]) == BadAnswer("not an object", "[]")
    assert isinstance(
        parse_query_migrate({"status": "active", "ram": {"total": "lots"}}), BadAnswer
    )
    assert parse_query_migrate({"ram": {}}).reason == "no status"  # type: ignore[union-attr]
