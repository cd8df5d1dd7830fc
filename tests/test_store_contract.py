"""What every store of record must do, on both backends: SQLite (one host) and a real
3-member etcd cluster (each test under a prefix of its own).

Leases refuse a second owner naming the first, fence a writer that lost its lease, and are
taken over only by recovery once their owner is gone; the journal keeps intent, phases,
progress and outcome; placement and release close with the outcome in one write. Both
anyio backends: the etcd client runs on asyncio only, on a loop of its own, also under trio.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from kvmflow.errors import (
    InstanceBusyError,
    LeaseLostError,
    NothingToAbortError,
    StoreError,
)
from kvmflow.store import Owner, SQLiteStore, Store
from kvmflow.store.base import Lease, PlacementChange
from kvmflow.store.etcd import EtcdStore
from kvmflow.store.url import etcd_target
from kvmflow.testing.etcd import EtcdCluster

pytestmark = pytest.mark.anyio

_prefixes = itertools.count()

#: Opens a second process's view of the same store, as ``controller``.
Opener = Callable[[str], Awaitable[Store]]


@pytest.fixture(params=["sqlite", "etcd"])
async def stores(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[Store, Opener]]:
    """A store, and a way to open another session of the same store (another controller)."""
    opened: list[Store] = []
    if request.param == "sqlite":
        path = tmp_path / "store.sqlite"

        async def open_sqlite(controller: str) -> Store:
            store = await SQLiteStore.open(path)
            opened.append(store)
            return store

        opener: Opener = open_sqlite
    else:
        cluster: EtcdCluster = request.getfixturevalue("shared_etcd")
        target = etcd_target(cluster.url(f"/contract{next(_prefixes)}"))

        async def open_etcd(controller: str) -> Store:
            store = await EtcdStore.open(target, Owner.this_process(controller), ttl=3)
            opened.append(store)
            return store

        opener = open_etcd
    try:
        yield await opener("first"), opener
    finally:
        for store in opened:
            await store.aclose()


def owner(store: Store, controller: str) -> Owner:
    """The owner a store's session stands for (etcd: its session's; SQLite: any)."""
    if isinstance(store, EtcdStore):
        return store.session.owner
    return Owner.this_process(controller)


async def test_a_second_owner_is_refused_naming_the_first(stores: tuple[Store, Opener]) -> None:
    store, open_other = stores
    other = await open_other("second")
    lease = await store.acquire("vm", owner(store, "first"), "migrate", 30)
    with pytest.raises(InstanceBusyError, match="busy with 'migrate' by first") as refused:
        await other.acquire("vm", owner(other, "second"), "stop", 30)
    assert isinstance(refused.value.holder, Lease)
    assert refused.value.holder.token == lease.token
    held = await other.holder("vm")
    assert held is not None
    assert held.owner.controller == "first"
    # A live owner's lease is not taken over, not even by recovery.
    with pytest.raises(InstanceBusyError):
        await other.acquire("vm", owner(other, "second"), "recover", 30, take_over=True)


async def test_the_journal_keeps_intent_phases_progress_and_outcome(
    stores: tuple[Store, Opener],
) -> None:
    store, _ = stores
    lease = await store.acquire("vm", owner(store, "first"), "migrate", 30)
    entry = await store.begin(lease, "intent", {"source": "node-a", "target": "node-b"})
    entry = await store.record_phase(lease, entry, "streaming", {"port": 4444})
    await store.record_progress([(lease, entry, {"remaining": 12})])
    [open_entry] = await store.unfinished()
    assert open_entry.phase == "streaming"
    assert open_entry.details == {"source": "node-a", "target": "node-b", "port": 4444}
    assert open_entry.progress == {"remaining": 12}
    await store.prove(lease)
    await store.finish(lease, entry, "moved", placement=PlacementChange("node-b"), release=True)
    assert await store.unfinished() == []
    assert await store.holder("vm") is None
    placement = await store.placement("vm")
    assert placement is not None
    assert (placement.node, placement.token) == ("node-b", lease.token)
    [closed] = await store.history("vm")
    assert (closed.outcome, closed.phase) == ("moved", "streaming")
    with pytest.raises(StoreError, match=r"not open|lost"):
        await store.record_phase(lease, closed, "again", {})


async def test_recovery_takes_over_an_abandoned_lease_and_fences_the_old_owner(
    stores: tuple[Store, Opener],
) -> None:
    store, open_other = stores
    lease = await store.acquire("vm", owner(store, "first"), "migrate", 30)
    entry = await store.begin(lease, "intent", {})
    await store.abandon(lease)  # left for recovery: plain operations are still refused
    other = await open_other("second")
    with pytest.raises(InstanceBusyError, match="only recovery may take it over"):
        await other.acquire("vm", owner(other, "second"), "stop", 30)
    taken = await other.acquire("vm", owner(other, "second"), "recover", 30, take_over=True)
    assert taken.token > lease.token
    with pytest.raises(LeaseLostError, match="lost"):
        await store.record_phase(lease, entry, "streaming", {})
    with pytest.raises(LeaseLostError):
        await store.prove(lease)
    [still_open] = await other.unfinished()
    assert still_open.phase == "intent"  # the fenced write changed nothing
    await other.finish(taken, still_open, "recovered", release=True)
    assert await other.unfinished() == []


async def test_cancel_requests_reach_the_holder_and_go_with_its_lease(
    stores: tuple[Store, Opener],
) -> None:
    store, open_other = stores
    other = await open_other("second")
    with pytest.raises(NothingToAbortError, match="nothing to abort"):
        await other.request_cancel("vm", "operator")
    lease = await store.acquire("vm", owner(store, "first"), "migrate", 30)
    asked = await other.request_cancel("vm", "operator")
    assert asked.token == lease.token
    assert await store.cancel_requests() == {("vm", lease.token): "operator"}
    await store.release(lease)
    assert await store.cancel_requests() == {}


async def test_fences_and_placements_are_kept(stores: tuple[Store, Opener]) -> None:
    store, _ = stores
    assert await store.fence("node-a") is None
    fence = await store.record_fence("node-a", "operator", "stated-down")
    recorded = await store.fence("node-a")
    assert recorded is not None
    assert (recorded.by, recorded.how) == (fence.by, "stated-down")
    lease = await store.acquire("vm", owner(store, "first"), "start", 30)
    await store.record_placement(lease, "node-a")
    assert [(p.instance, p.node) for p in await store.placements()] == [("vm", "node-a")]
    await store.forget_placement(lease)
    assert await store.placements() == []
    assert [held.instance for held in await store.leases()] == ["vm"]
