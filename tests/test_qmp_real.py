"""The QMP client against a real QEMU, on asyncio and on trio."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

import anyio
import pytest

from kvmflow.errors import CommandError, ConnectionLostError, DeadlineError
from kvmflow.kvm import ScratchQemu
from kvmflow.monitor import (
    ConnectionState,
    QMPClient,
    RunState,
    query_kvm,
    query_status,
    query_version,
)

pytestmark = pytest.mark.anyio


async def test_greeting_version_and_status(qemu: ScratchQemu) -> None:
    async with QMPClient(qemu.qmp_path) as qmp:
        states = [qmp.state]
        assert qmp.greeting is not None
        version = await query_version(qmp)
        assert (version.major, version.minor) == (
            qmp.greeting.version.major,
            qmp.greeting.version.minor,
        )
        assert version.major >= 7
        status = await query_status(qmp)
        assert status.state is RunState.PRELAUNCH
        assert status.running is False
        accel = await query_kvm(qmp)
        assert accel.name == qemu.accelerator
    states.append(qmp.state)
    assert states == [ConnectionState.READY, ConnectionState.CLOSED]


async def test_error_reply_is_a_command_error(qemu: ScratchQemu) -> None:
    async with QMPClient(qemu.qmp_path) as qmp:
        with pytest.raises(CommandError) as info:
            await qmp.execute("no-such-command", {"x": 1})
        assert info.value.error_class == "CommandNotFound"
        assert info.value.command == "no-such-command"
        assert info.value.arguments == {"x": 1}
        assert str(qemu.qmp_path) in str(info.value)
        # The connection is still fine.
        assert (await query_status(qmp)).state is RunState.PRELAUNCH


async def test_200_concurrent_callers_each_get_their_own_answer(qemu: ScratchQemu) -> None:
    checks: dict[str, Callable[[Any], bool]] = {
        "query-status": lambda r: r["status"] == "prelaunch",
        "query-name": lambda r: r == {"name": "kvmflow-scratch"},
        "query-kvm": lambda r: set(r) == {"enabled", "present"},
        "query-version": lambda r: "qemu" in r and "package" in r,
        "query-migrate": lambda r: r == {},
    }
    names = list(checks)
    results: dict[int, tuple[str, Any]] = {}

    async with QMPClient(qemu.qmp_path) as qmp:

        async def caller(n: int) -> None:
            command = names[n % len(names)]
            results[n] = (command, await qmp.execute(command))

        async with anyio.create_task_group() as tg:
            for n in range(200):
                tg.start_soon(caller, n)
    assert len(results) == 200
    wrong = [(n, c, r) for n, (c, r) in results.items() if not checks[c](r)]
    assert wrong == []


async def test_stop_and_cont_produce_events_filtered_by_name(qemu: ScratchQemu) -> None:
    async with QMPClient(qemu.qmp_path) as qmp:
        with qmp.subscribe("STOP", "RESUME") as both, qmp.subscribe("STOP") as stops:
            await qmp.execute("cont")
            await qmp.execute("stop")
            first = await both.receive(timeout=5)
            second = await both.receive(timeout=5)
            assert (first.name, second.name) == ("RESUME", "STOP")
            assert second.timestamp >= first.timestamp > 0
            only = await stops.receive(timeout=5)
            assert only.name == "STOP"
            assert stops.pending() == 0
        assert (await query_status(qmp)).state is RunState.PAUSED


async def test_quit_then_eof_is_success(qemu: ScratchQemu) -> None:
    async with QMPClient(qemu.qmp_path) as qmp:
        assert await qmp.execute("quit") == {}
        with anyio.fail_after(5):
            while qmp.state is ConnectionState.READY:
                await anyio.sleep(0.01)
        # QEMU closes (or resets) the socket as it exits.
        with pytest.raises(ConnectionLostError, match="connection is lost"):
            await qmp.execute("query-status")
    assert qemu.process.wait(5) == 0


async def test_second_client_gets_a_deadline_naming_the_socket(qemu: ScratchQemu) -> None:
    async with QMPClient(qemu.qmp_path) as first:
        started = time.monotonic()
        with pytest.raises(DeadlineError) as info:
            async with QMPClient(qemu.qmp_path, connect_timeout=0.5):
                pytest.fail("a second client must not get the monitor")
        assert 0.4 < time.monotonic() - started < 3
        assert str(qemu.qmp_path) in str(info.value)
        assert "another client" in str(info.value)
        # The first client was not disturbed.
        assert (await query_status(first)).state is RunState.PRELAUNCH


async def test_killed_qemu_fails_every_pending_command(qemu: ScratchQemu) -> None:
    failures: list[BaseException] = []
    async with QMPClient(qemu.qmp_path) as qmp:

        async def pending_call() -> None:
            try:
                await qmp.execute("query-status")
            except ConnectionLostError as exc:
                failures.append(exc)

        os.kill(qemu.pid, signal.SIGSTOP)  # QEMU stops answering
        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(pending_call)
            await anyio.wait_all_tasks_blocked()  # all five sent, all waiting for QEMU
            assert failures == []
            os.kill(qemu.pid, signal.SIGKILL)
            with anyio.fail_after(5):
                while len(failures) < 5:
                    await anyio.sleep(0.01)
        assert qmp.state is ConnectionState.LOST
    assert len(failures) == 5
    assert all("got no answer" in str(f) for f in failures)


async def test_timed_out_command_leaves_connection_usable(qemu: ScratchQemu) -> None:
    async with QMPClient(qemu.qmp_path) as qmp:
        os.kill(qemu.pid, signal.SIGSTOP)
        try:
            with pytest.raises(DeadlineError, match="query-name"):
                await qmp.execute("query-name", timeout=0.2)
            with anyio.move_on_after(0.2) as scope:
                await qmp.execute("query-kvm")
            assert scope.cancelled_caught
        finally:
            os.kill(qemu.pid, signal.SIGCONT)
        # The late replies of both abandoned commands are dropped, not handed to us.
        assert (await query_status(qmp)).state is RunState.PRELAUNCH
        assert await qmp.execute("query-name") == {"name": "kvmflow-scratch"}
        assert qmp._pending.by_id == {}


async def test_reconnect_fails_old_pending_and_works_after(qemu: ScratchQemu) -> None:
    async with QMPClient(qemu.qmp_path) as qmp:
        assert await qmp.execute("query-name") == {"name": "kvmflow-scratch"}
        lost: list[BaseException] = []
        os.kill(qemu.pid, signal.SIGSTOP)

        async def stuck() -> None:
            try:
                await qmp.execute("query-status")
            except ConnectionLostError as exc:
                lost.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(stuck)
            await anyio.wait_all_tasks_blocked()  # the command is sent and waits
            os.kill(qemu.pid, signal.SIGCONT)
            await qmp.reconnect()
        assert len(lost) == 1
        assert "reconnecting" in str(lost[0])
        assert qmp.state is ConnectionState.READY
        for _ in range(3):
            assert (await query_status(qmp)).state is RunState.PRELAUNCH
