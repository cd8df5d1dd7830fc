"""The engine with real QEMU on local nodes: limits, budgets, queueing, evacuation."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from kvmflow.engine import (
    BandwidthRebalanced,
    Engine,
    Limits,
    MigrationCancelled,
    MigrationCompleted,
    MigrationQueued,
    MigrationStarted,
    NodeEntry,
)
from kvmflow.errors import MisuseError, ValidationError
from kvmflow.guest import dirty_guest_spec, wait_for_sweeps
from kvmflow.instance import Instance
from kvmflow.kvm import HvParams, InstanceSpec
from kvmflow.migration import MigrationError, MigrationPolicy
from kvmflow.migration.policy import MIB
from kvmflow.testing import local_nodes

pytestmark = pytest.mark.anyio

FAST = MigrationPolicy.fixed(bandwidth_mib=1000, poll_interval=0.1)
NEVER = MigrationPolicy.fixed(bandwidth_mib=30, downtime_ms=50, poll_interval=0.2)


@pytest.fixture
def entries(runtime_root: Path) -> list[NodeEntry]:
    return local_nodes(runtime_root, "node-a", "node-b", "node-c")


async def start_idle(engine: Engine, name: str, node: str, memory: int = 64) -> Instance:
    spec = InstanceSpec(name, memory_mib=memory, hvparams=HvParams(migration_port=0))
    instance = engine.add_instance(Instance(spec, engine.node(node).hypervisor))
    await instance.start()
    return instance


async def start_dirty(engine: Engine, name: str, node: str, guest: Path) -> Instance:
    spec = dirty_guest_spec(name, guest, migration_port=0, mib=48)
    instance = engine.add_instance(Instance(spec, engine.node(node).hypervisor))
    await instance.start()
    await wait_for_sweeps(engine.node(node).hypervisor, name)
    return instance


async def test_evacuation_honours_limits_and_moves_everything(entries: list[NodeEntry]) -> None:
    async with Engine(entries[:2], limits=Limits(2, 2), default_policy=FAST) as engine:
        events = engine.events()
        for n in range(6):
            await start_idle(engine, f"evac-{n}", "node-a")
        summary = await engine.evacuate("node-a", ["node-b"])
        assert summary.ok
        assert sorted(name for name, _ in summary.moved) == [f"evac-{n}" for n in range(6)]
        assert {target for _, target in summary.moved} == {"node-b"}
        assert engine.on_node("node-a") == []
        assert sorted(await entries[1].hypervisor.list_instances()) == [
            f"evac-{n}" for n in range(6)
        ]
        assert await entries[0].hypervisor.list_instances() == []
        stats = engine.statistics()
        assert (stats.completed, stats.active, stats.queued) == (6, 0, 0)
        assert stats.bytes_moved > 0
    running = peak = 0
    kinds = []
    async for event in events:
        kinds.append(type(event).__name__)
        if isinstance(event, MigrationStarted):
            running += 1
            peak = max(peak, running)
        elif isinstance(event, MigrationCompleted):
            running -= 1
    assert peak == 2
    assert kinds.count("MigrationQueued") == 6
    assert kinds.count("MigrationCompleted") == 6


async def test_instances_sharing_a_fixed_port_take_turns(
    entries: list[NodeEntry], free_port: int
) -> None:
    # Ganeti gives every instance the same migration port; two targets cannot listen on it
    # at once, so the engine runs those migrations one after the other, limits allowing 2.
    async with Engine(entries[:2], limits=Limits(2, 2), default_policy=FAST) as engine:
        events = engine.events()
        for n in range(3):
            spec = InstanceSpec(
                f"same-{n}", memory_mib=64, hvparams=HvParams(migration_port=free_port)
            )
            await engine.add_instance(Instance(spec, entries[0].hypervisor)).start()
        await start_idle(engine, "any-port", "node-a")
        summary = await engine.evacuate("node-a", ["node-b"])
        assert summary.ok, summary.failed
    running: set[str] = set()
    shared_at_once = peak = 0
    async for event in events:
        if isinstance(event, MigrationStarted):
            running.add(event.instance)
            peak = max(peak, len(running))
            shared_at_once = max(shared_at_once, sum(n.startswith("same-") for n in running))
        elif isinstance(event, MigrationCompleted):
            running.discard(event.instance)
    assert shared_at_once == 1
    assert peak == 2  # the instance on port 0 ran alongside


async def test_dry_run_plans_without_touching_anything(entries: list[NodeEntry]) -> None:
    async with Engine(entries, default_policy=FAST) as engine:
        for n in range(3):
            await start_idle(engine, f"dry-{n}", "node-a", memory=64 + n * 32)
        huge = InstanceSpec("dry-huge", memory_mib=10**7)
        engine.add_instance(Instance(huge, entries[0].hypervisor))
        summary = await engine.evacuate("node-a", ["node-b", "node-c"], dry_run=True)
        assert summary.dry_run
        assert summary.moved == []
        assert {name for name, _, _ in summary.plan.moves} == {"dry-0", "dry-1", "dry-2"}
        assert {target for _, target, _ in summary.plan.moves} == {"node-b", "node-c"}
        assert [name for name, _ in summary.plan.unplaceable] == ["dry-huge"]
        assert set(summary.plan.capacity) == {"node-b", "node-c"}
        assert engine.statistics().queued == 0
        assert sorted(await entries[0].hypervisor.list_instances()) == ["dry-0", "dry-1", "dry-2"]
        with pytest.raises(MisuseError, match="onto itself"):
            await engine.plan_evacuation("node-a", ["node-a"])


async def test_queued_migration_can_be_cancelled_and_priority_goes_first(
    entries: list[NodeEntry], dirty_guest: Path
) -> None:
    # The blocker holds the only slot until it is cancelled: at 1 MiB/s its 48 MiB of
    # dirtied pages cannot be sent within the test, however slow or loaded the machine is
    # (a merely non-converging guest does converge when a busy host slows its vCPU).
    stuck = MigrationPolicy.fixed(bandwidth_mib=1, downtime_ms=10, poll_interval=0.2)
    async with Engine(entries, limits=Limits(1, 1, max_total=1), default_policy=FAST) as engine:
        events = engine.events()
        blocker = await start_dirty(engine, "q-block", "node-a", dirty_guest)
        low = await start_idle(engine, "q-low", "node-c")
        high = await start_idle(engine, "q-high", "node-c")
        doomed = await start_idle(engine, "q-doomed", "node-c")
        first = engine.submit_migration(blocker.name, "node-b", policy=stuck)
        with anyio.fail_after(20):
            while not isinstance(await events.receive(), MigrationStarted):
                pass
        t_low = engine.submit_migration(low.name, "node-b", priority=0)
        t_doomed = engine.submit_migration(doomed.name, "node-b")
        t_high = engine.submit_migration(high.name, "node-b", priority=10)
        assert engine.statistics().queued == 3
        t_doomed.cancel()
        with pytest.raises(MigrationError, match="cancelled before it started"):
            await t_doomed.wait()
        first.cancel()  # the non-converging one is cancelled cleanly while active
        with pytest.raises(MigrationError, match="cancelled"):
            await first.wait()
        await t_high.wait()
        await t_low.wait()
        assert engine.where("q-doomed") == "node-c"
        assert engine.where("q-block") == "node-a"
        assert engine.where("q-high") == engine.where("q-low") == "node-b"
        assert await entries[0].hypervisor.is_running("q-block")
    seen = events.drain()  # everything after the blocker's start
    started = [e.instance for e in seen if isinstance(e, MigrationStarted)]
    assert started == ["q-high", "q-low"]
    cancelled = {e.instance: e.started for e in seen if isinstance(e, MigrationCancelled)}
    assert cancelled == {"q-doomed": False, "q-block": True}
    assert [e.priority for e in seen if isinstance(e, MigrationQueued)] == [0, 0, 10]


async def test_link_budget_is_shared_and_raised_when_one_finishes(
    entries: list[NodeEntry], dirty_guest: Path
) -> None:
    entries[0].link_budget_mib = 30
    async with Engine(entries, limits=Limits(3, 3), default_policy=NEVER) as engine:
        events = engine.events()
        for n in range(3):
            await start_dirty(engine, f"bw-{n}", "node-a", dirty_guest)
        tickets = [
            engine.submit_migration(f"bw-{n}", t)
            for n, t in enumerate(("node-b", "node-b", "node-c"))
        ]

        async def bandwidths() -> list[int]:
            values = []
            for ticket in tickets:
                if ticket.state == "active" and ticket.qmp is not None:
                    params = await ticket.qmp.execute("query-migrate-parameters")
                    values.append(params["max-bandwidth"] // MIB)
            return values

        with anyio.fail_after(30):
            while sorted(await bandwidths()) != [10, 10, 10]:
                await anyio.sleep(0.1)
        tickets[0].cancel()
        with pytest.raises(MigrationError):
            await tickets[0].wait()
        with anyio.fail_after(10):
            while sorted(await bandwidths()) != [15, 15]:
                await anyio.sleep(0.1)
        for ticket in tickets[1:]:
            ticket.cancel()
    shares = [e.bandwidth_mib for e in events._queue if isinstance(e, BandwidthRebalanced)]
    assert 15 in shares
    assert 10 in shares


async def test_submission_errors(entries: list[NodeEntry]) -> None:
    engine = Engine(entries, default_policy=FAST)
    spec = InstanceSpec("sub-1", memory_mib=32)
    engine.add_instance(Instance(spec, entries[0].hypervisor))
    with pytest.raises(MisuseError, match="not running"):
        engine.submit_migration("sub-1", "node-b")
    async with engine:
        with pytest.raises(MisuseError, match="unknown instance"):
            engine.submit_migration("nope", "node-b")
        with pytest.raises(MisuseError, match="unknown node 'node-z'"):
            engine.submit_migration("sub-1", "node-z")
        with pytest.raises(MisuseError, match="already runs on node-a"):
            engine.submit_migration("sub-1", "node-a")
        with pytest.raises(ValidationError, match=r"max_outbound=0: at least 1") as bad:
            Limits(0, 2, max_total=-1)
        assert [p.field for p in bad.value.problems] == ["max_outbound", "max_total"]
