"""HMP over its own unix socket and through QMP, against a real QEMU."""

from __future__ import annotations

import os
import signal
import time

import anyio
import pytest

from kvmflow.errors import CommandError, ConnectionLostError, DeadlineError, MisuseError
from kvmflow.kvm import ScratchQemu
from kvmflow.monitor import ConnectionState, HMPClient, QMPClient, hmp_via_qmp
from kvmflow.monitor.hmp import clean_output

# What QEMU 7.2 really wrote for ``info status`` (recorded from a unix-socket monitor).
RECORDED = (
    b"i\x1b[K\x1b[Din\x1b[K\x1b[D\x1b[Dinf\x1b[K\x1b[D\x1b[D\x1b[Dinfo\x1b[K\x1b[D\x1b[D\x1b[D"
    b"\x1b[Dinfo \x1b[K\x1b[D\x1b[D\x1b[D\x1b[D\x1b[Dinfo s\x1b[K\x1b[D\x1b[D\x1b[D\x1b[D\x1b[D"
    b"\x1b[Dinfo st\x1b[K\x1b[D\x1b[D\x1b[D\x1b[D\x1b[D\x1b[D\x1b[Dinfo status\x1b[K\r\n"
    b"VM status: paused (prelaunch)\r\n(qemu) "
)


def test_clean_output_strips_echo_escapes_and_prompt() -> None:
    assert clean_output(RECORDED) == "VM status: paused (prelaunch)"
    assert clean_output(b"echo\r\nline 1\r\n\x1b[1mline 2\x1b[0m\r\n(qemu) ") == "line 1\nline 2"
    assert clean_output(b"cont\x1b[K\r\n(qemu) ") == ""


@pytest.mark.anyio
async def test_hmp_info_status_is_clean_text(qemu: ScratchQemu) -> None:
    async with HMPClient(qemu.hmp_path) as hmp:
        assert hmp.banner.startswith("QEMU ")
        assert "monitor" in hmp.banner
        assert await hmp.run("info status") == "VM status: paused (prelaunch)"
        assert await hmp.run("cont") == ""
        assert await hmp.run("info status") == "VM status: running"
        assert await hmp.run("stop") == ""
        version = await hmp.run("info version")
        assert version.startswith("7.") or version[0].isdigit()
        assert "\x1b" not in version
        assert "(qemu)" not in version


@pytest.mark.anyio
async def test_hmp_unknown_command_is_a_command_error(qemu: ScratchQemu) -> None:
    async with HMPClient(qemu.hmp_path) as hmp:
        with pytest.raises(CommandError, match="unknown command: 'migrate_set_speed_x'"):
            await hmp.run("migrate_set_speed_x 10")
        raw = await hmp.run("migrate_set_speed_x 10", check=False)
        assert raw.startswith("unknown command")
        assert await hmp.run("info status") == "VM status: paused (prelaunch)"


@pytest.mark.anyio
async def test_hmp_rejects_multi_line_input(qemu: ScratchQemu) -> None:
    async with HMPClient(qemu.hmp_path) as hmp:
        for bad in ("info status\nquit", "", "   ", "stop\r"):
            with pytest.raises(MisuseError, match="one non-empty line"):
                await hmp.run(bad)
        # Nothing was sent: QEMU still runs and answers.
        assert await hmp.run("info status") == "VM status: paused (prelaunch)"


@pytest.mark.anyio
async def test_hmp_concurrent_callers_are_serialised(qemu: ScratchQemu) -> None:
    answers: list[str] = []
    async with HMPClient(qemu.hmp_path) as hmp:

        async def ask() -> None:
            answers.append(await hmp.run("info status"))

        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(ask)
    assert answers == ["VM status: paused (prelaunch)"] * 20


@pytest.mark.anyio
async def test_hmp_timeout_closes_the_out_of_step_connection(qemu: ScratchQemu) -> None:
    async with HMPClient(qemu.hmp_path) as hmp:
        os.kill(qemu.pid, signal.SIGSTOP)
        try:
            with pytest.raises(DeadlineError, match="info status"):
                await hmp.run("info status", timeout=0.2)
        finally:
            os.kill(qemu.pid, signal.SIGCONT)
        assert hmp.state is ConnectionState.LOST
        with pytest.raises(ConnectionLostError):
            await hmp.run("info status")
        await hmp.reconnect()
        assert await hmp.run("info status") == "VM status: paused (prelaunch)"


@pytest.mark.anyio
async def test_second_hmp_client_gets_a_deadline(qemu: ScratchQemu) -> None:
    async with HMPClient(qemu.hmp_path):
        started = time.monotonic()
        with pytest.raises(DeadlineError, match="HMP prompt"):
            async with HMPClient(qemu.hmp_path, connect_timeout=0.4):
                pass
        assert time.monotonic() - started < 3


@pytest.mark.anyio
async def test_hmp_through_qmp(qemu: ScratchQemu) -> None:
    async with QMPClient(qemu.qmp_path) as qmp:
        assert await hmp_via_qmp(qmp, "info status") == "VM status: paused (prelaunch)"
        with pytest.raises(CommandError, match="unknown command"):
            await hmp_via_qmp(qmp, "no_such_thing")
        with pytest.raises(MisuseError):
            await hmp_via_qmp(qmp, "info status\ninfo version")
