"""The QMP client against a monitor that misbehaves on purpose (kvmflow.testing)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from kvmflow.errors import (
    CommandError,
    ConnectionLostError,
    DeadlineError,
    MalformedReplyError,
    MisuseError,
)
from kvmflow.monitor import ConnectionState, EndOfSubscription, QMPClient
from kvmflow.monitor.qmp import MAX_EARLY_EVENTS
from kvmflow.testing import Close, Emit, Error, FakeQMPServer, Hang, RawLine, Return

pytestmark = pytest.mark.anyio


@pytest.fixture
async def fake(sockdir: Path) -> AsyncIterator[FakeQMPServer]:
    async with FakeQMPServer(sockdir / "qmp.sock") as server:
        yield server


async def test_non_json_answer_fails_that_command_only(fake: FakeQMPServer) -> None:
    fake.script("query-migrate", RawLine(b"this is not json"))
    async with QMPClient(fake.path) as qmp:
        with pytest.raises(MalformedReplyError) as info:
            await qmp.execute("query-migrate")
        assert info.value.raw == b"this is not json"
        assert "not JSON" in str(info.value)
        assert (await qmp.execute("query-status"))["running"] is True


async def test_json_that_is_not_an_object(fake: FakeQMPServer) -> None:
    fake.script("query-migrate", RawLine(b"[1, 2]"))
    async with QMPClient(fake.path) as qmp:
        with pytest.raises(MalformedReplyError, match="JSON list, not an object"):
            await qmp.execute("query-migrate")
        assert qmp.state is ConnectionState.READY


async def test_reply_without_return_or_error(fake: FakeQMPServer) -> None:
    fake.script("query-migrate", RawLine(b'{"id": 2, "answer": 42}'))
    async with QMPClient(fake.path) as qmp:
        with pytest.raises(MalformedReplyError, match="neither return, error"):
            await qmp.execute("query-migrate")


async def test_reply_with_unknown_id_fails_the_oldest_command(fake: FakeQMPServer) -> None:
    fake.script("query-migrate", RawLine(b'{"return": {}, "id": 9999}'))
    async with QMPClient(fake.path) as qmp:
        with pytest.raises(MalformedReplyError, match="id 9999, which no command has"):
            await qmp.execute("query-migrate", timeout=5)
        assert (await qmp.execute("query-status"))["running"] is True


async def test_a_late_duplicate_answer_is_dropped_not_pinned_on_the_next_command(
    fake: FakeQMPServer,
) -> None:
    # The first command is answered twice (the second copy arrives late); the next command
    # must get its own answer, not a MalformedReplyError for the stray one.
    # Ids: qmp_capabilities 1, query-name 2, query-uuid 3.
    fake.script("query-name", Return({"name": "a"}))
    late_copy = b'{"return": {"name": "a"}, "id": 2}\r\n'
    fake.script("query-uuid", RawLine(late_copy + b'{"return": {"UUID": "u"}, "id": 3}'))
    async with QMPClient(fake.path) as qmp:
        assert await qmp.execute("query-name") == {"name": "a"}
        assert await qmp.execute("query-uuid", timeout=5) == {"UUID": "u"}
        assert (await qmp.execute("query-status"))["running"] is True


async def test_events_flooding_the_negotiation_are_bounded(fake: FakeQMPServer) -> None:
    flood = [{"event": "EARLY", "data": {"n": n}} for n in range(MAX_EARLY_EVENTS + 500)]
    async with QMPClient(fake.path) as qmp:
        with qmp.subscribe("EARLY", max_buffered=10 * MAX_EARLY_EVENTS) as early:
            fake.script("qmp_capabilities", Emit(flood))
            await qmp.reconnect()  # the subscription is there before this handshake
            kept = early.drain()
    assert len(kept) == MAX_EARLY_EVENTS  # the newest ones, in order
    assert [e.data["n"] for e in kept[:2]] == [500, 501]
    assert kept[-1].data["n"] == MAX_EARLY_EVENTS + 499


async def test_reply_without_id_goes_to_the_oldest_command(fake: FakeQMPServer) -> None:
    fake.script("query-migrate", RawLine(b'{"return": {"status": "active"}}'))
    async with QMPClient(fake.path) as qmp:
        assert await qmp.execute("query-migrate") == {"status": "active"}


async def test_error_reply_carries_class_and_command(fake: FakeQMPServer) -> None:
    fake.script("migrate", Error("GenericError", "disk is busy"))
    async with QMPClient(fake.path) as qmp:
        with pytest.raises(CommandError) as info:
            await qmp.execute("migrate", {"uri": "tcp:127.0.0.1:4444"})
    assert info.value.error_class == "GenericError"
    assert info.value.description == "disk is busy"
    assert info.value.command == "migrate"
    assert info.value.arguments == {"uri": "tcp:127.0.0.1:4444"}


async def test_line_over_the_limit_is_refused_and_the_session_goes_on(
    fake: FakeQMPServer,
) -> None:
    fake.script("query-migrate", RawLine(b'{"return": "' + b"x" * 300_000 + b'", "id": 2}'))
    async with QMPClient(fake.path, max_line_bytes=64 * 1024) as qmp:
        with pytest.raises(MalformedReplyError, match="exceeds the 65536-byte limit"):
            await qmp.execute("query-migrate", timeout=5)
        assert (await qmp.execute("query-status"))["running"] is True


async def test_truncated_json_then_eof_fails_with_the_partial_answer(
    fake: FakeQMPServer,
) -> None:
    fake.script("query-migrate", Close(b'{"return": {"status": "act'))
    async with QMPClient(fake.path) as qmp:
        with pytest.raises(ConnectionLostError) as info:
            await qmp.execute("query-migrate", timeout=5)
        assert "in the middle of an answer" in str(info.value)
        assert "act" in str(info.value)
        assert qmp.state is ConnectionState.LOST
        with pytest.raises(ConnectionLostError, match="lost"):
            await qmp.execute("query-status")


async def test_event_flood_keeps_memory_bounded_and_commands_flowing(
    fake: FakeQMPServer,
) -> None:
    async with QMPClient(fake.path) as qmp:
        with qmp.subscribe("FLOOD", max_buffered=100) as slow, qmp.subscribe("OTHER") as other:
            await fake.flood(100_000)
            fake.script("query-name", Return({"name": "after-flood"}))
            with anyio.fail_after(30):
                assert await qmp.execute("query-name") == {"name": "after-flood"}
            assert slow.pending() == 100
            assert slow.dropped == 99_900
            assert other.pending() == 0
            event = await slow.receive(timeout=1)
            assert event.name == "FLOOD"


async def test_silence_after_connect_is_a_deadline(sockdir: Path) -> None:
    async with FakeQMPServer(sockdir / "silent.sock", greeting=None) as fake:
        started = time.monotonic()
        with pytest.raises(DeadlineError) as info:
            async with QMPClient(fake.path, connect_timeout=0.3):
                pass
        assert time.monotonic() - started < 2
        assert str(fake.path) in str(info.value)


async def test_eof_before_greeting(sockdir: Path) -> None:
    async with FakeQMPServer(sockdir / "eof.sock", close_on_connect=True) as fake:
        with pytest.raises(ConnectionLostError, match="before the greeting"):
            async with QMPClient(fake.path, connect_timeout=2):
                pass


async def test_greeting_without_qmp_key(sockdir: Path) -> None:
    async with FakeQMPServer(sockdir / "bad.sock", greeting=b'{"hello": "world"}\r\n') as fake:
        with pytest.raises(MalformedReplyError, match="expected the QMP greeting") as info:
            async with QMPClient(fake.path, connect_timeout=2):
                pass
        assert info.value.raw == b'{"hello": "world"}'


async def test_no_socket_is_a_transport_error(sockdir: Path) -> None:
    from kvmflow.errors import TransportError

    with pytest.raises(TransportError, match="No such file or directory"):
        async with QMPClient(sockdir / "missing.sock"):
            pass


async def test_unanswered_command_times_out_and_later_ones_work(fake: FakeQMPServer) -> None:
    fake.script("query-migrate", Hang())
    async with QMPClient(fake.path, command_timeout=0.2) as qmp:
        with pytest.raises(DeadlineError, match="query-migrate"):
            await qmp.execute("query-migrate")
        assert (await qmp.execute("query-status", timeout=5))["running"] is True


async def test_dropped_connection_fails_all_pending_at_once(fake: FakeQMPServer) -> None:
    fake.script("query-migrate", *[Hang()] * 10)
    errors: list[BaseException] = []
    async with QMPClient(fake.path) as qmp:

        async def call() -> None:
            try:
                await qmp.execute("query-migrate")
            except ConnectionLostError as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(call)
            with anyio.fail_after(5):
                while len(fake.commands("query-migrate")) < 10:
                    await anyio.sleep(0.01)
            await fake.disconnect_all()
            with anyio.fail_after(2):
                while len(errors) < 10:
                    await anyio.sleep(0.01)
    assert len(errors) == 10


async def test_quit_answered_by_eof_alone_is_success(fake: FakeQMPServer) -> None:
    fake.script("quit", Close())
    async with QMPClient(fake.path) as qmp:
        assert await qmp.execute("quit", timeout=5) == {}


async def test_events_before_the_answer_and_subscription_end(fake: FakeQMPServer) -> None:
    fake.script("stop", Emit([{"event": "STOP"}, {"event": "X", "data": {"a": 1}}]))
    async with QMPClient(fake.path) as qmp:
        events = qmp.subscribe()
        await qmp.execute("stop")
        assert [e.name for e in (await events.receive(1), await events.receive(1))] == [
            "STOP",
            "X",
        ]
    with pytest.raises(EndOfSubscription):
        await events.receive(1)
    assert [e async for e in events] == []


async def test_reconnect_after_the_monitor_went_away(fake: FakeQMPServer) -> None:
    async with QMPClient(fake.path) as qmp:
        await fake.disconnect_all()
        with anyio.fail_after(2):
            while qmp.state is ConnectionState.READY:
                await anyio.sleep(0.01)
        await qmp.reconnect()
        assert (await qmp.execute("query-status"))["running"] is True
        assert fake.connections == 2


async def test_misuse_is_reported(fake: FakeQMPServer) -> None:
    async with QMPClient(fake.path) as qmp:
        with pytest.raises(MisuseError, match="must be a dict"):
            await qmp.execute("query-status", ["x"])  # type: ignore[arg-type]
        with pytest.raises(MisuseError, match="max_buffered"):
            qmp.subscribe(max_buffered=0)
        with pytest.raises(MisuseError):
            await qmp.__aenter__()
    with pytest.raises(MisuseError, match="not open"):
        await qmp.reconnect()
