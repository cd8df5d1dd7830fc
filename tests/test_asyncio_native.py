"""Embedding in a plain asyncio program: asyncio's own timeouts and gather work on the client."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from kvmflow.kvm import ScratchQemu
from kvmflow.monitor import QMPClient, RunState, query_status


@pytest.mark.asyncio
async def test_asyncio_timeout_cancels_a_command_cleanly(qemu: ScratchQemu) -> None:
    async with QMPClient(qemu.qmp_path) as qmp:
        os.kill(qemu.pid, signal.SIGSTOP)
        try:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.2):
                    await qmp.execute("query-name")
        finally:
            os.kill(qemu.pid, signal.SIGCONT)
        assert (await query_status(qmp)).state is RunState.PRELAUNCH


@pytest.mark.asyncio
async def test_gather_many_callers(qemu: ScratchQemu) -> None:
    async with QMPClient(qemu.qmp_path) as qmp:
        names = await asyncio.gather(*(qmp.execute("query-name") for _ in range(50)))
        kvm = await asyncio.gather(*(qmp.execute("query-kvm") for _ in range(50)))
    assert names == [{"name": "kvmflow-scratch"}] * 50
    assert all(set(k) == {"enabled", "present"} for k in kvm)


@pytest.mark.asyncio
async def test_task_cancel_from_outside(qemu: ScratchQemu) -> None:
    async with QMPClient(qemu.qmp_path) as qmp:
        os.kill(qemu.pid, signal.SIGSTOP)
        try:
            task = asyncio.create_task(qmp.execute("query-name"))
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        finally:
            os.kill(qemu.pid, signal.SIGCONT)
        assert await qmp.execute("query-name") == {"name": "kvmflow-scratch"}
