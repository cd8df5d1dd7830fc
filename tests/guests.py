"""Helpers of the tests that run the dirtying guest: start one, check where it works."""

from __future__ import annotations

from pathlib import Path

from kvmflow.guest import dirty_guest_spec, wait_for_sweeps
from kvmflow.guest import sweep_count as sweeps
from kvmflow.instance import Instance, InstanceState
from kvmflow.kvm import KvmHypervisor
from kvmflow.monitor import RunState, query_status


async def started_dirty(hv: KvmHypervisor, name: str, guest: Path, mib: int = 16) -> Instance:
    """The dirtying guest ``name`` started on ``hv`` (any free migration port), once it
    has swept its memory twice."""
    instance = Instance(dirty_guest_spec(name, guest, migration_port=0, mib=mib), hv)
    await instance.start()
    await wait_for_sweeps(hv, name)
    return instance


async def assert_runs_on(instance: Instance, hv: KvmHypervisor) -> None:
    """The instance runs on ``hv`` only as far as kvmflow and QEMU say, and goes on
    sweeping its memory there."""
    assert instance.machine.state is InstanceState.RUNNING
    assert instance.machine.node == hv.node.name
    async with hv.qmp(instance.name) as qmp:
        assert (await query_status(qmp)).state is RunState.RUNNING
    first = await sweeps(hv, instance.name)
    await wait_for_sweeps(hv, instance.name, minimum=first + 1)
