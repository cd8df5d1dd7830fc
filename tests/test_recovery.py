"""The controller killed with SIGKILL at each point of a migration, then recovery in a new
process: each trial must end with exactly one running copy whose guest keeps working, the
journal entry closed, the lease released, and nothing of the other copy left.

The controller (``tests/controller.py``) and recovery are real processes sharing a real
SQLite store and real QEMUs; the kill point is a hook on a phase, a progress report or a
policy action, never a sleep.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from kvmflow.engine import Engine, NodeEntry, Recovery, Verdict
from kvmflow.engine.reality import CopyState, survey
from kvmflow.engine.resolve import keep_only
from kvmflow.errors import RecoveryError
from kvmflow.guest import dirty_guest_spec, sweep_count, wait_for_sweeps
from kvmflow.instance import Instance
from kvmflow.instance.guard import OperationGuard
from kvmflow.kvm import Disk, HvParams, InstanceSpec, KvmHypervisor
from kvmflow.migration import MigrationPolicy
from kvmflow.store import Owner, SQLiteStore
from tests.conftest import qemus_under

pytestmark = pytest.mark.anyio

CONTROLLER = str(Path(__file__).with_name("controller.py"))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def start_guest(
    store: SQLiteStore,
    hv: KvmHypervisor,
    name: str,
    guest: Path,
    *,
    mib: int,
    disks: tuple[Disk, ...] = (),
) -> None:
    guard = OperationGuard(store, Owner.this_process("test-setup"))
    spec = dirty_guest_spec(
        name, guest, migration_port=0, mib=mib, pause=20 if mib < 16 else 0, disks=disks
    )
    await Instance(spec, hv, guard=guard).start()
    await wait_for_sweeps(hv, name)


async def controller(*args: str) -> tuple[int, str]:
    done = await anyio.run_process([sys.executable, CONTROLLER, *args], check=False)
    return done.returncode, done.stdout.decode() + done.stderr.decode()


async def killed_mid_migration(
    store: SQLiteStore,
    hv: KvmHypervisor,
    root: Path,
    guest: Path,
    name: str,
    policy: str,
    kill_at: str,
    *,
    mib: int = 8,
    disks: tuple[Disk, ...] = (),
) -> None:
    """A booted guest on ``hv``, and a controller that died (SIGKILL) migrating it when
    ``kill_at`` came."""
    await start_guest(store, hv, name, guest, mib=mib, disks=disks)
    code, output = await controller("migrate", store.path, str(root), name, policy, kill_at)
    assert code == -signal.SIGKILL, output


async def recover(store: SQLiteStore, root: Path, *extra: str) -> list[dict[str, Any]]:
    code, output = await controller("recover", store.path, str(root), *extra)
    assert code == 0, output
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


async def assert_one_copy_on(
    store: SQLiteStore, nodes: tuple[KvmHypervisor, KvmHypervisor], name: str, node: str
) -> None:
    """Exactly one copy, running on ``node`` with its guest working; nothing elsewhere;
    the store closed and agreeing."""
    by_name = {hv.node.name: hv for hv in nodes}
    copies = (await survey(by_name, [name])).get(name, [])
    assert [(c.node, c.state) for c in copies] == [(node, CopyState.RUNNING)]
    home = by_name[node]
    first = await sweep_count(home, name)
    await anyio.sleep(0.3)
    assert await sweep_count(home, name) > first  # the guest keeps working
    other = next(hv for hv in nodes if hv.node.name != node)
    assert qemus_under(Path(other.paths.root)) == []
    assert [p for p in other.paths.instance_files(name) if Path(p).exists()] == []
    assert await store.unfinished() == []
    assert await store.holder(name) is None
    placement = await store.placement(name)
    assert placement is not None
    assert placement.node == node


#: (kill point, policy, where the guest runs after recovery, recovery's verdict)
KILL_POINTS = [
    ("target-starting", "converging", "node-a", "aborted"),
    ("target-listening", "converging", "node-a", "aborted"),
    ("active", "converging", "node-b", "adopted"),
    ("policy-action", "stepping", "node-b", "adopted"),
    ("post-copy", "postcopy", "node-b", "adopted"),
    ("completed-on-source", "converging", "node-b", "adopted"),
    ("switched-over", "converging", "node-b", "finished"),
    ("aborting", "aborting", "node-a", "aborted"),
    ("done", "converging", "node-b", "finished"),
]


@pytest.mark.parametrize(("kill_at", "policy", "runs_on", "verdict"), KILL_POINTS)
async def test_controller_killed_then_recovered(
    kill_at: str,
    policy: str,
    runs_on: str,
    verdict: str,
    nodes: tuple[KvmHypervisor, KvmHypervisor],
    runtime_root: Path,
    dirty_guest: Path,
    store: SQLiteStore,
) -> None:
    name = "kill-" + kill_at.replace("-", "")[:10]
    mib = 48 if policy in ("postcopy", "aborting") else 8
    await killed_mid_migration(
        store, nodes[0], runtime_root, dirty_guest, name, policy, kill_at, mib=mib
    )
    (entry,) = await store.unfinished()  # the dead controller's migration, left open
    assert entry.operation == "migrate"

    reports = await recover(store, runtime_root)
    mine = [r for r in reports if r["instance"] == name]
    assert [r["verdict"] for r in mine] == [verdict], reports
    await assert_one_copy_on(store, nodes, name, runs_on)
    history = await store.history(name)
    assert history[-1].outcome is not None
    assert history[-1].outcome.startswith("recovered")


async def test_a_controller_killed_mid_disk_copy_leaves_nothing_after_recovery(
    nodes: tuple[KvmHypervisor, KvmHypervisor],
    runtime_root: Path,
    dirty_guest: Path,
    store: SQLiteStore,
    tmp_path: Path,
) -> None:
    """Killed while the source mirrors its local disk into the target: recovery cancels the
    mirror job, removes the target and its partial image; the guest goes on on its disk."""
    for node in ("node-a", "node-b"):
        (tmp_path / node).mkdir()
    with (tmp_path / "node-a" / "disk.img").open("wb") as file:
        file.write(os.urandom(48 << 20))
    disk = Disk(str(tmp_path / "{node}" / "disk.img"), local=True)
    await killed_mid_migration(
        store,
        nodes[0],
        runtime_root,
        dirty_guest,
        "kill-disk",
        "slow-disks",
        "disk-copying",
        disks=(disk,),
    )
    assert (tmp_path / "node-b" / "disk.img").exists()  # the dead controller's partial copy
    [entry] = await store.unfinished()
    assert [d["target_path"] for d in entry.details["local_disks"]] == [
        str(tmp_path / "node-b" / "disk.img")
    ]
    reports = await recover(store, runtime_root)
    assert [r["verdict"] for r in reports if r["instance"] == "kill-disk"] == ["aborted"]
    await assert_one_copy_on(store, nodes, "kill-disk", "node-a")
    assert not (tmp_path / "node-b" / "disk.img").exists()
    assert (tmp_path / "node-a" / "disk.img").exists()
    async with nodes[0].qmp("kill-disk") as qmp:
        assert await qmp.execute("query-block-jobs") == []


async def test_recovery_killed_during_recovery_is_finished_by_the_next(
    nodes: tuple[KvmHypervisor, KvmHypervisor],
    runtime_root: Path,
    dirty_guest: Path,
    store: SQLiteStore,
) -> None:
    name = "kill-twice"
    await killed_mid_migration(
        store, nodes[0], runtime_root, dirty_guest, name, "converging", "active"
    )
    # The first recovery adopts the stream and dies as the source completes.
    code, output = await controller("recover", store.path, str(runtime_root), "completed-on-source")
    assert code == -signal.SIGKILL, output
    (entry,) = await store.unfinished()
    assert entry.phase == "completed-on-source"
    reports = await recover(store, runtime_root)
    assert [r["verdict"] for r in reports if r["instance"] == name] == ["adopted"], reports
    await assert_one_copy_on(store, nodes, name, "node-b")


@pytest.mark.parametrize(
    ("policy", "flags"),
    [("endless", ("--abort",)), ("aborting", ())],
    ids=["asked-to-abort", "past-its-deadline"],
)
async def test_an_adopted_stream_is_aborted_when_asked_or_past_its_deadline(
    policy: str,
    flags: tuple[str, ...],
    nodes: tuple[KvmHypervisor, KvmHypervisor],
    runtime_root: Path,
    dirty_guest: Path,
    store: SQLiteStore,
) -> None:
    name = f"kill-{policy}"
    await killed_mid_migration(
        store, nodes[0], runtime_root, dirty_guest, name, policy, "active", mib=48
    )
    reports = await recover(store, runtime_root, *flags)
    assert [r["verdict"] for r in reports if r["instance"] == name] == ["aborted"], reports
    await assert_one_copy_on(store, nodes, name, "node-a")
    (entry,) = (await store.history(name))[-1:]
    assert entry.details["recovery"] == "adopt the migration"


async def recovery_of(
    store: SQLiteStore, nodes: tuple[KvmHypervisor, KvmHypervisor], *, clean_orphans: bool = False
) -> Recovery:
    guard = OperationGuard(store, Owner.this_process("test-recovery"))
    return Recovery({hv.node.name: hv for hv in nodes}, guard, clean_orphans=clean_orphans)


async def test_a_leftover_target_is_reported_and_removed_only_when_asked(
    nodes: tuple[KvmHypervisor, KvmHypervisor], store: SQLiteStore
) -> None:
    source, target = nodes
    spec = InstanceSpec("orphaned", memory_mib=64, hvparams=HvParams(migration_port=0))
    await Instance(spec, source, guard=OperationGuard(store, Owner.this_process("t"))).start()
    runtime = await source.load_runtime("orphaned")
    assert runtime is not None
    await target.start(spec, runtime=runtime, incoming="defer")  # no entry explains it

    (report,) = await (await recovery_of(store, nodes)).run()
    assert (report.verdict, report.instance) == (Verdict.ORPHAN, "orphaned")
    assert "inmigrate copy on node-b" in report.detail
    assert await target.is_running("orphaned")  # reported, not touched

    (report,) = await (await recovery_of(store, nodes, clean_orphans=True)).run()
    assert report.verdict is Verdict.ORPHAN_REMOVED
    assert not await target.is_running("orphaned")
    assert await source.is_running("orphaned")
    assert await (await recovery_of(store, nodes)).run() == []  # nothing left to say


async def test_two_copies_holding_the_guest_are_never_touched(
    nodes: tuple[KvmHypervisor, KvmHypervisor], store: SQLiteStore
) -> None:
    source, target = nodes
    spec = InstanceSpec("twice", memory_mib=64, hvparams=HvParams(migration_port=0))
    await Instance(spec, source, guard=OperationGuard(store, Owner.this_process("t"))).start()
    await target.start(spec)  # started behind kvmflow's back: a second running copy

    (report,) = await (await recovery_of(store, nodes, clean_orphans=True)).run()
    assert report.verdict is Verdict.AMBIGUOUS
    assert not report.ok
    assert "two copies hold the guest" in report.detail
    assert await source.is_running("twice")
    assert await target.is_running("twice")


async def test_a_running_copy_the_store_does_not_know_is_recorded(
    nodes: tuple[KvmHypervisor, KvmHypervisor], store: SQLiteStore
) -> None:
    _, target = nodes
    spec = InstanceSpec("unknown", memory_mib=64, hvparams=HvParams(migration_port=0))
    await target.start(spec)  # no store involved
    (report,) = await (await recovery_of(store, nodes)).run()
    assert (report.verdict, report.runs_on) == (Verdict.RECORDED, "node-b")
    placement = await store.placement("unknown")
    assert placement is not None
    assert placement.node == "node-b"
    assert await store.holder("unknown") is None


async def test_entering_an_engine_recovers_what_a_dead_controller_left(
    nodes: tuple[KvmHypervisor, KvmHypervisor],
    runtime_root: Path,
    dirty_guest: Path,
    store: SQLiteStore,
) -> None:
    name = "kill-engine"
    await killed_mid_migration(
        store, nodes[0], runtime_root, dirty_guest, name, "converging", "switched-over"
    )
    guard = OperationGuard(store, Owner.this_process("engine"))
    entries = [NodeEntry(hv, "127.0.0.1") for hv in nodes]
    async with Engine(entries, guard=guard) as engine:
        assert [(r.instance, r.verdict) for r in engine.recovered] == [(name, Verdict.FINISHED)]
    await assert_one_copy_on(store, nodes, name, "node-b")


async def test_the_operator_resolves_what_recovery_leaves_alone(
    nodes: tuple[KvmHypervisor, KvmHypervisor], store: SQLiteStore
) -> None:
    source, target = nodes
    spec = InstanceSpec("stuck", memory_mib=64, hvparams=HvParams(migration_port=0))
    await Instance(spec, source, guard=OperationGuard(store, Owner.this_process("t"))).start()
    await target.start(spec)  # a second running copy: both may have run
    # ...and a stranded migration entry of a controller that is gone.
    gone = Owner("dead-controller", Owner.this_process().host, 2**22 + 7, 0.0)
    lease = await store.acquire("stuck", gone, "migrate", 30)
    details = {
        "source": "node-a",
        "target": "node-b",
        "address": "127.0.0.1",
        "port": 4444,
        "policy": MigrationPolicy().as_record(),
    }
    await store.begin(lease, "stranded", details)
    guard = OperationGuard(store, Owner.this_process("test-recovery"))
    hypervisors = {hv.node.name: hv for hv in nodes}

    (report,) = await Recovery(hypervisors, guard).run()
    assert report.verdict is Verdict.AMBIGUOUS
    assert "--resolve stuck=NODE" in report.detail
    assert await source.is_running("stuck")
    assert await target.is_running("stuck")  # touched nothing

    with pytest.raises(RecoveryError, match="no node 'nowhere'"):
        await keep_only("stuck", "nowhere", hypervisors)
    (report,) = await Recovery(hypervisors, guard, resolve={"stuck": "node-b"}).run()
    assert (report.verdict, report.runs_on) == (Verdict.RESOLVED, "node-b")
    assert "removed the running copy on node-a" in report.detail
    assert not await source.is_running("stuck")
    assert await target.is_running("stuck")
    assert await store.unfinished() == []
    assert await store.holder("stuck") is None
    placement = await store.placement("stuck")
    assert placement is not None
    assert placement.node == "node-b"


async def test_two_running_copies_without_an_entry_are_resolved_on_the_operators_word(
    nodes: tuple[KvmHypervisor, KvmHypervisor], store: SQLiteStore
) -> None:
    source, target = nodes
    spec = InstanceSpec("twice2", memory_mib=64, hvparams=HvParams(migration_port=0))
    await Instance(spec, source, guard=OperationGuard(store, Owner.this_process("t"))).start()
    await target.start(spec)
    guard = OperationGuard(store, Owner.this_process("test-recovery"))
    hypervisors = {hv.node.name: hv for hv in nodes}
    (report,) = await Recovery(hypervisors, guard, resolve={"twice2": "node-a"}).run()
    assert report.verdict is Verdict.RESOLVED
    assert await source.is_running("twice2")
    assert not await target.is_running("twice2")
