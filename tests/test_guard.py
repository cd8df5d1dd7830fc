"""Instance operations held by leases in a shared store, against real QEMU and a real
second process: refusals that name the owner, placement that follows the guest, and the
journal of a migration phase by phase."""

from __future__ import annotations

import contextlib
import functools
import subprocess
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import anyio
import pytest

from kvmflow.errors import (
    InstanceBusyError,
    InstanceRunningError,
    LeaseLostError,
    NothingToAbortError,
    OperationAbortedError,
)
from kvmflow.instance import Instance, InstanceState
from kvmflow.instance.guard import OperationGuard
from kvmflow.kvm import HvParams, InstanceSpec, KvmHypervisor
from kvmflow.migration import MigrationPolicy, migrate
from kvmflow.store import Owner, SQLiteStore, Store

pytestmark = pytest.mark.anyio

FAST = MigrationPolicy.fixed(bandwidth_mib=1000, downtime_ms=300, poll_interval=0.2)

HOLDER = """
import sys, anyio
from kvmflow.store import Owner, SQLiteStore

async def main() -> None:
    async with await SQLiteStore.open(sys.argv[1]) as store:
        await store.acquire(sys.argv[2], Owner.this_process("other-shell"), "reboot", 60)
        print("held", flush=True)
        await anyio.to_thread.run_sync(sys.stdin.read)

anyio.run(main)
"""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def spec(name: str) -> InstanceSpec:
    return InstanceSpec(name, memory_mib=64, hvparams=HvParams(migration_port=0))


async def test_an_operation_from_another_process_refuses_ours_and_nothing_starts(
    nodes: tuple[KvmHypervisor, KvmHypervisor], store: SQLiteStore
) -> None:
    source, _ = nodes
    guard = OperationGuard(store, Owner.this_process("ctl-1"))
    instance = Instance(spec("g-race"), source, guard=guard)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, store.path, "g-race"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(InstanceBusyError, match=r"busy with 'reboot' by other-shell \(pid"):
            await instance.start()
        assert not await source.is_running("g-race")
        assert instance.machine.state is InstanceState.DEFINED  # nothing was even tried
        assert instance.machine.operation is None
    finally:
        holder.kill()
        holder.wait(10)


async def test_placement_follows_the_guest_and_blocks_a_second_copy(
    nodes: tuple[KvmHypervisor, KvmHypervisor], store: SQLiteStore
) -> None:
    source, target = nodes
    guard = OperationGuard(store, Owner.this_process("ctl-1"))
    instance = Instance(spec("g-place"), source, guard=guard)
    await instance.start()
    placed = await store.placement("g-place")
    assert placed is not None
    assert placed.node == "node-a"
    await migrate(instance, target, target_address="127.0.0.1", policy=FAST)
    placed = await store.placement("g-place")
    assert placed is not None
    assert placed.node == "node-b"
    # A later shell that still thinks the instance lives where its config says: refused.
    stale = Instance(spec("g-place"), source, guard=OperationGuard(store, Owner.this_process()))
    with pytest.raises(InstanceRunningError, match="runs on node-b by the store's record"):
        await stale.start()
    assert not await source.is_running("g-place")
    await instance.stop(force=True)
    assert await store.placement("g-place") is None
    await stale.start()  # stopped everywhere: a start on node-a is fine again
    await stale.stop(force=True)
    assert await store.unfinished() == []
    assert await store.holder("g-place") is None  # every lease was given back


async def test_the_journal_holds_each_migration_phase_and_its_outcome(
    nodes: tuple[KvmHypervisor, KvmHypervisor], store: SQLiteStore
) -> None:
    source, target = nodes
    instance = Instance(
        spec("g-journal"), source, guard=OperationGuard(store, Owner.this_process())
    )
    await instance.start()
    seen_open: list[str] = []

    async def while_running(change: object) -> None:
        # The journal has the step before the user's listener hears of it.
        (entry,) = await store.unfinished()
        seen_open.append(entry.phase)

    await migrate(instance, target, target_address="127.0.0.1", policy=FAST, on_phase=while_running)
    *_, journaled = await store.history("g-journal")
    assert (journaled.operation, journaled.outcome) == ("migrate", "moved")
    assert journaled.details["source"] == "node-a"
    assert journaled.details["target"] == "node-b"
    assert journaled.phase == "done"
    assert seen_open == [
        "target-starting",
        "target-listening",
        "streaming",
        "completed-on-source",
        "switched-over",
        "done",
    ]
    await instance.stop(force=True)


async def test_an_operation_that_loses_its_lease_is_stopped(
    nodes: tuple[KvmHypervisor, KvmHypervisor], store: SQLiteStore
) -> None:
    source, _ = nodes
    guard = OperationGuard(store, Owner.this_process("ctl-1"), ttl=0.3)
    instance = Instance(spec("g-lost"), source, guard=guard)
    finished: list[str] = []

    async def operation_whose_lease_is_taken() -> None:
        async with instance.operation("reboot") as held:
            assert held is not None
            # Another controller's recovery takes the lease over (its owner looked gone).
            await store.release(held.lease)
            await store.acquire("g-lost", Owner.this_process("recovery"), "recover", 60)
            await anyio.sleep(5)  # cancelled at the next renewal, long before this ends
            finished.append("body")

    with pytest.raises(LeaseLostError, match="was lost: now held by recovery"):
        await operation_whose_lease_is_taken()
    assert finished == []  # the body sent nothing more
    assert instance.machine.operation is None
    holder = await store.holder("g-lost")
    assert holder is not None
    assert holder.owner.controller == "recovery"  # the new owner's lease is untouched


async def test_the_engine_drives_its_instances_under_leases(
    runtime_root: Path, store: SQLiteStore
) -> None:
    from kvmflow.engine import Engine
    from kvmflow.testing import local_nodes

    entries = local_nodes(runtime_root, "node-a", "node-b")
    guard = OperationGuard(store, Owner.this_process("engine-1"))
    async with Engine(entries, default_policy=FAST, guard=guard) as engine:
        instance = engine.add_instance(Instance(spec("g-engine"), entries[0].hypervisor))
        assert instance.guard is guard
        await instance.start()
        await engine.submit_migration("g-engine", "node-b").wait()
        placed = await store.placement("g-engine")
        assert placed is not None
        assert placed.node == "node-b"
        *_, journaled = await store.history("g-engine")
        assert (journaled.operation, journaled.outcome) == ("migrate", "moved")
        await instance.stop(force=True)
    assert await store.unfinished() == []


class CountingStore:
    """The store, counting the calls each method gets (to see the rounds batch them)."""

    def __init__(self, store: SQLiteStore) -> None:
        self.store = store
        self.calls: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.store, name)

        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            return await method(*args, **kwargs)

        return counted


async def test_one_round_renews_polls_and_reports_for_every_held_operation(
    store: SQLiteStore,
) -> None:
    counting = CountingStore(store)
    guard = OperationGuard(cast(Store, counting), Owner.this_process("ctl-many"), ttl=0.9)
    async with contextlib.AsyncExitStack() as stack:
        held = [
            await stack.enter_async_context(guard.hold(f"many{n}", "migrate")) for n in range(50)
        ]
        first = {lease.instance: lease.expires_at for lease in await store.leases()}
        for n, op in enumerate(held):
            op.report({"status": "active", "n": n})
        counting.calls.clear()
        with anyio.fail_after(10):
            # Until every lease was renewed and every report written (the store is polled).
            while True:
                leases = await store.leases()
                entries = await store.unfinished()
                if all(lease.expires_at > first[lease.instance] for lease in leases) and all(
                    entry.progress for entry in entries
                ):
                    break
                await anyio.sleep(0.05)
        assert sorted(entry.progress["n"] for entry in entries if entry.progress) == list(range(50))
        # 50 operations, yet a handful of calls: one of each kind per round, not per operation.
        assert 1 <= counting.calls["renew_all"] <= 3
        assert 1 <= counting.calls["record_progress"] <= 3
        assert counting.calls["cancel_requests"] <= 10
        assert counting.calls["renew"] == 0


async def test_a_cancel_request_stops_the_operation_and_says_who_asked(
    store: SQLiteStore,
) -> None:
    guard = OperationGuard(store, Owner.this_process("ctl-1"), ttl=3)

    async def asked_to_stop() -> None:
        async with guard.hold("asked", "migrate"):
            await store.request_cancel("asked", "the operator")
            await anyio.sleep_forever()

    with pytest.raises(OperationAbortedError, match="aborted on request by the operator"):
        await asked_to_stop()
    (entry,) = await store.history("asked")
    assert entry.outcome == "aborted: requested by the operator"
    assert await store.holder("asked") is None
    with pytest.raises(NothingToAbortError, match="nothing to abort"):
        await store.request_cancel("asked", "the operator")


async def test_rounds_go_on_when_the_leading_operation_ends(store: SQLiteStore) -> None:
    guard = OperationGuard(store, Owner.this_process("ctl-lead"), ttl=0.9)
    done = {n: anyio.Event() for n in range(4)}
    aborted: list[str] = []

    async def holding(n: int) -> None:
        try:
            async with guard.hold(f"lead{n}", "migrate"):
                await done[n].wait()
        except OperationAbortedError as exc:
            aborted.append(exc.requested_by)

    async def until(condition: Callable[[], Awaitable[bool]]) -> None:
        with anyio.fail_after(10):
            while not await condition():  # the store can only be polled
                await anyio.sleep(0.05)

    async def leases_held() -> set[str]:
        return {lease.instance for lease in await store.leases()}

    async with anyio.create_task_group() as tg:
        for n in range(4):  # the first keeper leads the rounds
            tg.start_soon(holding, n)
            await until(functools.partial(_has, leases_held, f"lead{n}"))
        done[0].set()  # the leader leaves
        await until(functools.partial(_lacks, leases_held, "lead0"))
        after = {lease.instance: lease.expires_at for lease in await store.leases()}

        async def renewed_since() -> bool:
            leases = await store.leases()
            return all(lease.expires_at > after[lease.instance] for lease in leases)

        await until(renewed_since)  # a follower took the rounds over
        await store.request_cancel("lead2", "the operator")
        await until(functools.partial(_lacks, leases_held, "lead2"))
        for event in done.values():
            event.set()
    assert aborted == ["the operator"]
    assert [e.outcome for e in await store.history("lead2")] == [
        "aborted: requested by the operator"
    ]


async def _has(names: Callable[[], Awaitable[set[str]]], name: str) -> bool:
    return name in await names()


async def _lacks(names: Callable[[], Awaitable[set[str]]], name: str) -> bool:
    return name not in await names()


class SlowRenewals:
    """A store whose renewal round reads the leases just after the follower's closing
    write (its lease released) and answers while that close is still under way."""

    def __init__(self, store: SQLiteStore) -> None:
        self.store = store
        self.renewing = anyio.Event()
        self.closed = anyio.Event()
        self.answered = anyio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    async def renew_all(self, leases: list[Any], ttl: float) -> Any:
        if "vm-follow" in {lease.instance for lease in leases} and not self.closed.is_set():
            self.renewing.set()
            await self.closed.wait()
            result = await self.store.renew_all(leases, ttl)
            self.answered.set()
            return result
        return await self.store.renew_all(leases, ttl)

    async def finish(self, lease: Any, entry: Any, outcome: str, **kwargs: Any) -> Any:
        closed = await self.store.finish(lease, entry, outcome, **kwargs)
        if lease.instance == "vm-follow":
            self.closed.set()
            await self.answered.wait()
        return closed


async def test_an_operation_that_ends_during_a_renewal_round_is_not_reported_lost(
    store: SQLiteStore,
) -> None:
    """Found by the sharded fleet benchmark: a follower that ended (its lease released)
    while the leader's renewal round was in the store was then marked lost, and its
    completed operation raised LeaseLostError."""
    slow = SlowRenewals(store)
    guard = OperationGuard(cast(Store, slow), Owner.this_process("ctl-1"), ttl=0.3)
    leader_may_end = anyio.Event()

    async def leader() -> None:
        async with guard.hold("vm-lead", "migrate"):
            await leader_may_end.wait()

    async with anyio.create_task_group() as tg:
        tg.start_soon(leader)
        await anyio.sleep(0.05)  # the leader leads the rounds; the follower follows
        async with guard.hold("vm-follow", "migrate"):
            await slow.renewing.wait()  # a round renewing the follower is in the store
        leader_may_end.set()
    assert [e.outcome for e in await store.history("vm-follow")] == ["done"]
    assert await store.leases() == []
