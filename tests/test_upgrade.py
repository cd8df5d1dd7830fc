"""A rolling upgrade, for real: node-a's QEMU goes from the system's (7.2) to QEMU 10.0 while
its guest lives on node-b, and the guest comes back onto the new QEMU, live.

The "upgrade command" swaps what node-a's ``qemu_binary`` points to (a symbolic link), as a
package upgrade replaces ``/usr/bin/qemu-system-x86_64``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from kvmflow.engine import Engine, NodeEntry
from kvmflow.engine.upgrade import NODE_LEASE_PREFIX
from kvmflow.errors import UpgradeError
from kvmflow.guest import dirty_guest_spec, wait_for_sweeps
from kvmflow.guest import sweep_count as sweeps
from kvmflow.instance import Instance
from kvmflow.instance.guard import OperationGuard
from kvmflow.migration import MigrationPolicy
from kvmflow.store import Owner, SQLiteStore
from kvmflow.testing import local_hypervisors
from kvmflow.testing.qemu_builds import QemuBuild

pytestmark = pytest.mark.anyio
FAST = MigrationPolicy.fixed(bandwidth_mib=1024, downtime_ms=300, poll_interval=0.1)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def link(tmp_path: Path) -> Path:
    """node-a's QEMU binary: a link to the system's QEMU, until the upgrade moves it."""
    path = tmp_path / "node-a-bin" / "qemu-system-x86_64"
    path.parent.mkdir()
    found = shutil.which("qemu-system-x86_64")
    assert found is not None
    path.symlink_to(found)
    return path


@pytest.fixture
def entries(runtime_root: Path, link: Path) -> list[NodeEntry]:
    a, b = local_hypervisors(runtime_root, "node-a", "node-b", qemu_binaries={"node-a": str(link)})
    return [NodeEntry(a, "127.0.0.1"), NodeEntry(b, "127.0.0.1")]


def upgrade_to(build: QemuBuild, link: Path) -> list[str]:
    return ["ln", "-sfn", build.binary, str(link)]


async def test_rolling_upgrade_moves_the_guest_away_and_back_onto_the_new_qemu(
    entries: list[NodeEntry],
    link: Path,
    dirty_guest: Path,
    store: SQLiteStore,
    qemu_builds: dict[str, QemuBuild],
) -> None:
    if "second" not in qemu_builds:
        pytest.skip("one QEMU build only on this host: nothing to upgrade to")
    guard = OperationGuard(store, Owner.this_process("upgrader"))
    async with Engine(entries, default_policy=FAST, guard=guard) as engine:
        node_a = engine.node("node-a").hypervisor
        spec = dirty_guest_spec("up-guest", dirty_guest, migration_port=0, mib=16)
        instance = engine.add_instance(Instance(spec, node_a))
        await instance.start()
        await wait_for_sweeps(node_a, "up-guest")
        report = await engine.upgrade_node("node-a", upgrade_to(qemu_builds["second"], link))
        assert report.qemu_before == qemu_builds["system"].version
        assert report.qemu_after == qemu_builds["second"].version
        assert report.evacuation.moved == [("up-guest", "node-b")]
        assert sorted(report.returned) == ["up-guest"]
        assert report.not_returned == {}
        assert engine.where("up-guest") == "node-a"
        pid = await node_a.find_pid("up-guest")
        assert pid is not None
        # The guest runs under node-a's new QEMU 10 (the wrapper's binary), and keeps working.
        assert "bookworm-backports" in os.readlink(f"/proc/{pid}/exe")
        first = await sweeps(node_a, "up-guest")
        await wait_for_sweeps(node_a, "up-guest", minimum=first + 1)
        assert not await engine.node("node-b").hypervisor.is_running("up-guest")
        await instance.stop(force=True)
    [record] = await store.history(NODE_LEASE_PREFIX + "node-a")
    assert record.outcome == "done"
    assert record.phase == "returned"
    assert record.details["command"][0] == "ln"
    assert await store.leases() == []


async def test_a_failing_upgrade_command_leaves_the_guests_where_they_went(
    entries: list[NodeEntry], dirty_guest: Path, store: SQLiteStore
) -> None:
    guard = OperationGuard(store, Owner.this_process("upgrader"))
    async with Engine(entries, default_policy=FAST, guard=guard) as engine:
        node_a, node_b = (engine.node(n).hypervisor for n in ("node-a", "node-b"))
        spec = dirty_guest_spec("up-fail", dirty_guest, migration_port=0, mib=16)
        instance = engine.add_instance(Instance(spec, node_a))
        await instance.start()
        with pytest.raises(UpgradeError, match="the upgrade command failed on node-a"):
            await engine.upgrade_node("node-a", ["false"])
        assert engine.where("up-fail") == "node-b"  # moved away, not brought back
        assert await node_b.is_running("up-fail")
        assert not await node_a.is_running("up-fail")
        await instance.stop(force=True)
    [record] = await store.history(NODE_LEASE_PREFIX + "node-a")
    assert record.outcome is not None
    assert record.outcome.startswith("failed")
    assert record.phase == "evacuated"


async def test_an_upgrade_that_cannot_drain_runs_no_command(
    entries: list[NodeEntry], tmp_path: Path
) -> None:
    async with Engine(entries, default_policy=FAST) as engine:
        node_a = engine.node("node-a").hypervisor
        big = dirty_guest_spec("up-big", Path("/nonexistent"), migration_port=0, mib=16)
        engine.add_instance(Instance(big, node_a))  # in the engine, not running: cannot move
        marker = tmp_path / "ran"
        with pytest.raises(UpgradeError, match="was not drained"):
            await engine.upgrade_node("node-a", ["touch", str(marker)])
        assert not marker.exists()
