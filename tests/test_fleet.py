"""The fake fleet (kvmflow.testing.fleet) drives the real engine without QEMU."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmflow.engine import Engine, Limits, NodeEntry
from kvmflow.instance import Instance
from kvmflow.kvm import HvParams, InstanceSpec, KvmHypervisor, RuntimePaths
from kvmflow.migration import MigrationError, MigrationPolicy
from kvmflow.testing.fleet import FakeNode

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def fleet(sockdir: Path) -> Iterator[str]:
    control = str(sockdir / "fleet.sock")
    process = subprocess.Popen([sys.executable, "-m", "kvmflow.testing.fleet", control])
    try:
        deadline = time.monotonic() + 10
        while not Path(control).exists():
            assert process.poll() is None, "the fleet process died"
            assert time.monotonic() < deadline, "the fleet process did not start"
            time.sleep(0.02)
        yield control
    finally:
        process.kill()
        process.wait()


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
