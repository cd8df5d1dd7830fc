"""The fake fleet (kvmflow.testing.fleet) drives the real engine without QEMU."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from kvmflow.engine import Engine, Limits, MigrationCancelled, MigrationFailed, NodeEntry
from kvmflow.engine.tickets import MigrationTicket
from kvmflow.instance import Instance, InstanceState
from kvmflow.kvm import HvParams, InstanceInfo, InstanceSpec, KvmHypervisor, RuntimePaths
from kvmflow.migration import MigrationError, MigrationPolicy
from kvmflow.testing.fleet import FakeNode, fleet_process

pytestmark = pytest.mark.anyio


@pytest.fixture
def fleet(sockdir: Path) -> Iterator[str]:
    control = str(sockdir / "fleet.sock")
    with fleet_process(control):
        yield control


async def test_simulated_migrations_complete_and_cancel(fleet: str, sockdir: Path) -> None:
    nodes = [FakeNode("src", fleet, dirty_rate=4 << 20), FakeNode("dst", fleet)]
    entries = [
        NodeEntry(KvmHypervisor(n, RuntimePaths(str(sockdir / n.name))), "127.0.0.1") for n in nodes
    ]
    fast = MigrationPolicy.fixed(bandwidth_mib=400, poll_interval=0.1)
    stuck = MigrationPolicy.fixed(bandwidth_mib=1, downtime_ms=10, poll_interval=0.1)
    async with Engine(entries, limits=Limits(10, 10), default_policy=fast) as engine:
        for n in range(6):
            spec = InstanceSpec(
                f"f{n}", memory_mib=256, hvparams=HvParams(migration_port=30000 + n)
            )
            await engine.add_instance(Instance(spec, entries[0].hypervisor)).start()
        tickets = [engine.submit_migration(f"f{n}", "dst") for n in range(5)]
        slow = engine.submit_migration("f5", "dst", policy=stuck)
        for ticket in tickets:
            result = await ticket.wait()
            assert result.source_final_state == "postmigrate"
        slow.cancel()
        with pytest.raises(MigrationError):
            await slow.wait()
        assert sorted(await entries[1].hypervisor.list_instances()) == [f"f{n}" for n in range(5)]
        assert await entries[0].hypervisor.list_instances() == ["f5"]
        assert engine.where("f5") == "src"
    for node in nodes:
        await node.aclose()


class BuggyTarget(KvmHypervisor):
    """A target whose start hits a bug (not a kvmflow error) while ``broken`` is set."""

    broken = True

    async def start(self, spec: InstanceSpec, **kwargs: Any) -> InstanceInfo:
        if self.broken:
            raise AssertionError("a bug in the target's start")
        return await super().start(spec, **kwargs)


def fleet_entries(fleet: str, sockdir: Path, *names: str) -> list[NodeEntry]:
    return [
        NodeEntry(KvmHypervisor(FakeNode(n, fleet), RuntimePaths(str(sockdir / n))), "127.0.0.1")
        for n in names
    ]


async def test_a_bug_in_one_migration_fails_its_ticket_and_the_engine_goes_on(
    fleet: str, sockdir: Path
) -> None:
    src, dst = fleet_entries(fleet, sockdir, "src", "dst")
    buggy = BuggyTarget(dst.hypervisor.node, dst.hypervisor.paths)
    fast = MigrationPolicy.fixed(bandwidth_mib=400, poll_interval=0.1)
    async with Engine([src, NodeEntry(buggy, "127.0.0.1")], default_policy=fast) as engine:
        with engine.events() as events:
            for name in ("bug1", "fine1"):
                spec = InstanceSpec(name, memory_mib=64, hvparams=HvParams(migration_port=0))
                await engine.add_instance(Instance(spec, src.hypervisor)).start()
            ticket = engine.submit_migration("bug1", "dst")
            with pytest.raises(AssertionError, match="a bug in the target's start"):
                await ticket.wait()
            assert ticket.state == "failed"
            stats = engine.statistics()
            assert (stats.failed, stats.cancelled) == (1, 0)
            assert engine.where("bug1") == "src"
            assert engine.instance("bug1").machine.state is InstanceState.RUNNING
            seen = events.drain()
            assert any(isinstance(e, MigrationFailed) for e in seen)
            assert not any(isinstance(e, MigrationCancelled) for e in seen)
            # The engine still works: the bug ended one ticket, not the task group.
            buggy.broken = False
            result = await engine.submit_migration("fine1", "dst").wait()
            assert result.target == "dst"
    for entry in (src, dst):
        await entry.hypervisor.node.aclose()


async def test_two_thousand_migrations_leave_the_engine_flat(fleet: str, sockdir: Path) -> None:
    a, b = fleet_entries(fleet, sockdir, "a", "b")
    fast = MigrationPolicy.fixed(bandwidth_mib=2000, poll_interval=0.05)
    instances = 100
    async with Engine([a, b], limits=Limits(100, 100), default_policy=fast) as engine:
        for n in range(instances):
            spec = InstanceSpec(f"m{n}", memory_mib=16, hvparams=HvParams(migration_port=0))
            await engine.add_instance(Instance(spec, a.hypervisor)).start()
        feeds_before = len(engine._feeds)
        for round_trip in range(20):  # 100 instances x 20 moves = 2,000 migrations
            target = "b" if round_trip % 2 == 0 else "a"
            with engine.events() as events:
                tickets = [engine.submit_migration(f"m{n}", target) for n in range(instances)]
                for ticket in tickets:
                    await ticket.wait()
                assert events.pending() > 0
            assert len(engine._tickets) == 0  # finished tickets are forgotten
            assert len(engine._feeds) == feeds_before  # a detached feed is gone
            del tickets, ticket
            await anyio.wait_all_tasks_blocked()  # the migrations' tasks have ended
            gc.collect()
            live = sum(isinstance(o, MigrationTicket) for o in gc.get_objects())
            assert live == 0, f"{live} tickets still alive after round {round_trip}"
        stats = engine.statistics()
        assert (stats.completed, stats.active, stats.queued) == (2000, 0, 0)
    for entry in (a, b):
        await entry.hypervisor.node.aclose()
