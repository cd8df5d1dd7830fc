"""Node shards: the rendezvous rule (fair, stable, moving little), and controllers sharing
a real etcd cluster over 60 simulated nodes: the shards cover every node once, a
controller refuses a node of another naming its owner, and when one leaves or joins only
its nodes move."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from kvmflow.engine import Engine, NodeEntry
from kvmflow.engine.shards import ShardKeeper, owner_of, shard
from kvmflow.errors import NodeNotHeldError
from kvmflow.instance.guard import OperationGuard
from kvmflow.kvm import KvmHypervisor, RuntimePaths
from kvmflow.store import Owner
from kvmflow.store.etcd import EtcdStore
from kvmflow.store.url import etcd_target
from kvmflow.testing.etcd import EtcdCluster
from kvmflow.testing.fleet import FakeNode, fleet_process

pytestmark = pytest.mark.anyio

NODES = [f"node-{i:03d}" for i in range(60)]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def test_the_rule_is_fair_and_independent_of_order() -> None:
    nodes = [f"n{i}" for i in range(9000)]
    controllers = ["ctl-1", "ctl-2", "ctl-3"]
    shares = [len(shard(nodes, controllers, c)) for c in controllers]
    assert sum(shares) == len(nodes)
    assert all(abs(share - 3000) < 150 for share in shares), shares
    assert all(owner_of(n, controllers) == owner_of(n, controllers[::-1]) for n in nodes)
    assert owner_of("n1", []) is None


def test_a_controller_joining_or_leaving_moves_only_its_own_nodes() -> None:
    nodes = [f"n{i}" for i in range(4000)]
    three = ["ctl-1", "ctl-2", "ctl-3"]
    before = {n: owner_of(n, three) for n in nodes}
    joined = {n: owner_of(n, [*three, "ctl-4"]) for n in nodes}
    moved = [n for n in nodes if joined[n] != before[n]]
    assert all(joined[n] == "ctl-4" for n in moved)
    assert 800 < len(moved) < 1200  # about a quarter
    left = {n: owner_of(n, ["ctl-1", "ctl-3"]) for n in nodes}
    assert all(left[n] == before[n] for n in nodes if before[n] != "ctl-2")


class Member:
    """One controller of the test: its store session, guard, engine and shard keeper."""

    def __init__(self, store: EtcdStore, engine: Engine, keeper: ShardKeeper) -> None:
        self.store, self.engine, self.keeper = store, engine, keeper


@contextlib.asynccontextmanager
async def member(
    stack: contextlib.AsyncExitStack, url: str, ident: str, control: str, root: Path
) -> AsyncIterator[Member]:
    owner = Owner.this_process(ident)
    store = await EtcdStore.open(etcd_target(url), owner, ttl=3, role="controller")
    guard = OperationGuard(store, owner, ttl=3)
    entries = [
        NodeEntry(KvmHypervisor(FakeNode(name, control), RuntimePaths(str(root / name))), name)
        for name in NODES
    ]
    engine = Engine(entries, guard=guard, recover_on_enter=False)
    async with store, engine, ShardKeeper(engine, store, interval=0.2) as keeper:
        yield Member(store, engine, keeper)


async def settled(members: list[Member], timeout: float = 20) -> dict[str, str]:
    """Until the members' shards cover every node once, as the rule says; node -> holder."""
    live = [m.store.controller for m in members]
    with anyio.fail_after(timeout):
        while True:
            held = {n: m.store.controller for m in members for n in m.keeper.held}
            count = sum(len(m.keeper.held) for m in members)
            if count == len(NODES) and all(held.get(n) == owner_of(n, live) for n in NODES):
                return held
            await anyio.sleep(0.1)


async def test_controllers_share_the_nodes_and_take_over_a_leaving_ones(
    shared_etcd: EtcdCluster, tmp_path: Path, runtime_root: Path
) -> None:
    url = shared_etcd.url("/shards")
    with fleet_process(str(tmp_path / "fleet.sock")):
        async with contextlib.AsyncExitStack() as stack:
            members = [
                await stack.enter_async_context(
                    member(stack, url, f"ctl-{i}", str(tmp_path / "fleet.sock"), runtime_root)
                )
                for i in range(3)
            ]
            held = await settled(members)
            assert all(10 <= len(m.keeper.held) <= 30 for m in members)
            # A controller refuses a node of another, naming the owner.
            first = members[0]
            foreign = next(n for n, holder in held.items() if holder != first.store.controller)
            assert first.engine.guard is not None
            with pytest.raises(NodeNotHeldError, match=f"managed by controller {held[foreign]}"):
                async with first.engine.guard.hold("vm", "start", {"node": foreign}):
                    pass
            # One leaves: only its nodes move, to the survivors.
            leaving = members[2]
            lost = set(leaving.keeper.held)
            await leaving.store.aclose()  # its session is revoked: its node keys go at once
            now = await settled(members[:2])
            assert {n for n in NODES if now[n] != held[n]} == lost
