"""Instance operations against real QEMU: pause and resume, reality read back, recovery."""

from __future__ import annotations

import os
import signal

import anyio
import pytest

from kvmflow.errors import InstanceRunningError, MisuseError
from kvmflow.instance import Instance, InstanceEvent, InstanceState
from kvmflow.kvm import InstanceSpec, KvmHypervisor
from kvmflow.monitor import RunState, query_status

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def state_of(instance: Instance) -> InstanceState:
    """The machine's state, read afresh (operations change it between asserts)."""
    return instance.machine.state


async def run_state(hv: KvmHypervisor, name: str) -> RunState:
    async with hv.qmp(name) as qmp:
        return (await query_status(qmp)).state


async def kill_and_wait(hv: KvmHypervisor, pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    with anyio.fail_after(10):
        while await hv.node.process_cmdline(pid) is not None:
            await anyio.sleep(0.02)


class StopThatFails(KvmHypervisor):
    """A node where the QEMU process survives every stop."""

    async def stop(self, name: str, **kwargs: object) -> None:
        return None


async def test_pause_resume_and_a_failed_stop_keep_the_machine_true(
    nodes: tuple[KvmHypervisor, KvmHypervisor],
) -> None:
    hv, _ = nodes
    instance = Instance(InstanceSpec("in-pause", memory_mib=64), hv)
    await instance.start()
    with pytest.raises(MisuseError, match="resume needs it paused"):
        await instance.resume()
    await instance.pause()
    assert state_of(instance) is InstanceState.PAUSED
    assert await run_state(hv, "in-pause") is RunState.PAUSED
    stubborn = Instance(instance.spec, StopThatFails(hv.node, hv.paths), InstanceState.PAUSED)
    await stubborn.stop(force=True)
    assert state_of(stubborn) is InstanceState.PAUSED  # not RUNNING: it never resumed
    await instance.resume()
    assert state_of(instance) is InstanceState.RUNNING
    assert await run_state(hv, "in-pause") is RunState.RUNNING
    events = [t.event.value for t in instance.machine.history]
    assert events == ["start", "started", "pause", "resume"]
    await instance.stop(force=True)


async def test_refresh_reads_back_what_happened_behind_kvmflow(
    nodes: tuple[KvmHypervisor, KvmHypervisor],
) -> None:
    hv, _ = nodes
    instance = Instance(InstanceSpec("in-refresh", memory_mib=64), hv)
    await instance.start()
    async with hv.qmp("in-refresh") as qmp:
        await qmp.execute("stop")  # an operator's own monitor command
    assert await instance.refresh() is InstanceState.PAUSED
    attached = await Instance.attach(instance.spec, hv)
    assert attached.machine.state is InstanceState.PAUSED
    async with hv.qmp("in-refresh") as qmp:
        await qmp.execute("cont")
    assert await instance.refresh() is InstanceState.RUNNING
    pid = await hv.find_pid("in-refresh")
    assert pid is not None
    await kill_and_wait(hv, pid)
    assert await instance.refresh() is InstanceState.FAILED


async def test_recover_cleans_up_a_failed_instance_once_nothing_runs(
    nodes: tuple[KvmHypervisor, KvmHypervisor],
) -> None:
    hv, _ = nodes
    instance = Instance(InstanceSpec("in-recover", memory_mib=64), hv)
    with pytest.raises(MisuseError, match="only a failed instance is recovered"):
        await instance.recover()
    await instance.start()
    instance.machine.fire(InstanceEvent.CRASHED)  # as after a migration that ran nowhere known
    with pytest.raises(InstanceRunningError, match="still runs on node-a"):
        await instance.recover()
    assert state_of(instance) is InstanceState.FAILED
    pid = await hv.find_pid("in-recover")
    assert pid is not None
    await kill_and_wait(hv, pid)
    await instance.recover()
    assert state_of(instance) is InstanceState.STOPPED
    assert await hv.load_runtime("in-recover") is None  # leftovers are gone
    assert os.listdir(hv.paths.dir("pid")) == []
    await instance.start()  # and it can start again
    await instance.stop(force=True)
