"""The etcd cluster losing members under a real migration: one member lost is a log line;
quorum lost holds the next QEMU-changing step until it is back (bounded by the lease's
TTL), or leaves the instance safe (the source running, nothing sent) and refuses new
operations clearly; quorum back, work resumes.

Members are killed by a hook at the phase that writes the stream's intent, just before
``migrate`` goes to the source: the next step that needs a proof of ownership.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from kvmflow.engine import Recovery
from kvmflow.errors import KvmflowError, StoreUnavailableError
from kvmflow.guest import dirty_guest_spec, sweep_count, wait_for_sweeps
from kvmflow.instance import Instance, InstanceState
from kvmflow.instance.guard import OperationGuard
from kvmflow.kvm import KvmHypervisor
from kvmflow.migration import MigrationPolicy, migrate
from kvmflow.migration.phases import PhaseChange
from kvmflow.store import Owner
from kvmflow.store.etcd import EtcdStore
from kvmflow.store.url import etcd_target
from kvmflow.testing.etcd import EtcdCluster
from tests.conftest import qemus_under

pytestmark = pytest.mark.anyio

TTL = 3
FAST = MigrationPolicy.fixed(bandwidth_mib=200, downtime_ms=300, poll_interval=0.1)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def guard(etcd: EtcdCluster) -> AsyncIterator[OperationGuard]:
    owner = Owner.this_process("quorum-test")
    target = etcd_target(etcd.url("/quorum"))
    async with await EtcdStore.open(target, owner, ttl=TTL, role="controller") as store:
        yield OperationGuard(store, owner, ttl=TTL)


async def guest(hv: KvmHypervisor, guard: OperationGuard, image: Path) -> Instance:
    spec = dirty_guest_spec("vm", image, migration_port=0, mib=8, pause=20)
    instance = Instance(spec, hv, guard=guard)
    await instance.start()
    await wait_for_sweeps(hv, "vm")
    return instance


def at_stream(action: Any) -> Any:
    def hook(change: PhaseChange) -> None:
        if change.after.value == "streaming":
            action()

    return hook


async def test_one_member_lost_mid_migration_is_a_log_line_only(
    etcd: EtcdCluster,
    guard: OperationGuard,
    nodes: tuple[KvmHypervisor, KvmHypervisor],
    dirty_guest: Path,
) -> None:
    instance = await guest(nodes[0], guard, dirty_guest)
    with structlog.testing.capture_logs() as logs:
        result = await migrate(
            instance,
            nodes[1],
            target_address="127.0.0.1",
            policy=FAST,
            on_phase=at_stream(lambda: etcd.stop(0)),
        )
    assert result.downtime_ms is not None
    assert instance.node_name == "node-b"
    entry = (await guard.store.history("vm"))[-1]
    assert (entry.operation, entry.outcome) == ("migrate", "moved")
    assert await guard.store.unfinished() == []
    assert not [line for line in logs if line["log_level"] == "error"], logs


async def test_quorum_lost_holds_the_next_step_until_it_is_back(
    etcd: EtcdCluster,
    guard: OperationGuard,
    nodes: tuple[KvmHypervisor, KvmHypervisor],
    dirty_guest: Path,
) -> None:
    instance = await guest(nodes[0], guard, dirty_guest)

    def lose_quorum_for_a_while() -> None:
        etcd.stop(1)
        etcd.stop(2)

        def back() -> None:
            etcd.start(1)
            etcd.start(2)

        threading.Timer(1.0, back).start()  # well inside the proof's patience (the TTL)

    with structlog.testing.capture_logs() as logs:
        await migrate(
            instance,
            nodes[1],
            target_address="127.0.0.1",
            policy=FAST,
            on_phase=at_stream(lose_quorum_for_a_while),
        )
    events = [line["event"] for line in logs]
    # The proof before `migrate` waited: in the client's retries, or in the guard's wait.
    assert {
        "etcd does not answer; trying again",
        "store unavailable: waiting for it before a step",
    } & set(events), events
    assert "etcd does not answer; giving up" not in events
    assert instance.node_name == "node-b"
    entry = (await guard.store.history("vm"))[-1]
    assert (entry.operation, entry.outcome) == ("migrate", "moved")


async def test_quorum_lost_for_long_leaves_the_source_running_and_refuses_new_work(
    etcd: EtcdCluster,
    guard: OperationGuard,
    nodes: tuple[KvmHypervisor, KvmHypervisor],
    dirty_guest: Path,
) -> None:
    source, target = nodes
    instance = await guest(source, guard, dirty_guest)
    pid = await source.find_pid("vm")

    def lose_quorum() -> None:
        etcd.stop(1)
        etcd.stop(2)

    with pytest.raises(KvmflowError, match="does not answer"):
        await migrate(
            instance,
            target,
            target_address="127.0.0.1",
            policy=FAST,
            on_phase=at_stream(lose_quorum),
        )
    # Safe: the source runs its guest as before, and `migrate` never reached it.
    assert await source.find_pid("vm") == pid
    async with source.qmp("vm") as qmp:
        assert await qmp.execute("query-migrate") == {}
    first = await sweep_count(source, "vm")
    await wait_for_sweeps(source, "vm", minimum=first + 1)
    # New operations are refused, saying why, before anything starts.
    other = Instance(dirty_guest_spec("vm2", dirty_guest, migration_port=0), source, guard=guard)
    with pytest.raises(StoreUnavailableError, match="new operations are refused"):
        await other.start()
    assert await source.find_pid("vm2") is None
    # Quorum back: the operation left open is recovered, and work goes on.
    etcd.start(1)
    etcd.start(2)
    etcd.wait_healthy()
    await guard._settle_unsettled()
    reports = await Recovery({"node-a": source, "node-b": target}, guard).run()
    assert [(r.instance, r.ok) for r in reports] == [("vm", True)], reports
    assert qemus_under(Path(target.paths.root)) == []
    runtime = await source.load_runtime("vm")
    assert runtime is not None
    again = Instance(runtime.spec, source, InstanceState.RUNNING, guard=guard)
    await migrate(again, target, target_address="127.0.0.1", policy=FAST)
    assert again.node_name == "node-b"
    assert await guard.store.unfinished() == []
