"""Local disks copied with the guest (NBD on the target, drive-mirror on the source), against
real QEMU: a guest that writes its disk while it moves, checked sector by sector; the
pre-check; a cancel mid-copy; a target whose storage fills up mid-copy.

Both nodes are on this machine, so each local disk's path names its node
(``.../{node}/disk.img``): node-a's copy and node-b's are different files.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from kvmflow.engine import Engine, Limits
from kvmflow.errors import IncompatibleTargetError, MigrationError
from kvmflow.guest import dirty_guest_spec, expected_sector, sweep_count, wait_for_sweeps
from kvmflow.instance import Instance, InstanceState
from kvmflow.kvm import Disk, HvParams, InstanceSpec, KvmHypervisor
from kvmflow.migration import MigrationPolicy, PhaseChange, migrate
from kvmflow.migration.phases import MigrationPhase
from kvmflow.migration.policy import MIB
from kvmflow.testing import local_nodes
from tests.guests import assert_runs_on

pytestmark = pytest.mark.anyio
SECTORS = 64
FAST = MigrationPolicy.fixed(bandwidth_mib=512, downtime_ms=300, poll_interval=0.1)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def storage(tmp_path: Path) -> Path:
    """Each node's local storage: ``storage/node-a`` and ``storage/node-b``."""
    for node in ("node-a", "node-b"):
        (tmp_path / "storage" / node).mkdir(parents=True)
    return tmp_path / "storage"


@pytest.fixture
def small_storage(storage: Path) -> Iterator[Path]:
    """node-b's storage is a 40 MiB tmpfs (unmounted in teardown, also on failure)."""
    target = storage / "node-b"
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(target)], check=True)
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)


def image(storage: Path, node: str, size: int, data: int = 0) -> Path:
    """A raw image on ``node``'s storage: ``size`` bytes, the first ``data`` of them random."""
    path = storage / node / "disk.img"
    with path.open("wb") as file:
        file.write(os.urandom(data))
        file.truncate(size)
    return path


async def writing_guest(
    hv: KvmHypervisor, storage: Path, guest: Path, name: str, *, keep_source: bool = False
) -> Instance:
    """The dirtying guest with a local disk (at ``storage/{node}/disk.img``), one of whose
    first ``SECTORS`` sectors it writes per sweep; started once it wrote each."""
    disk = Disk(str(storage / "{node}" / "disk.img"), local=True, keep_source=keep_source)
    spec = dirty_guest_spec(
        name,
        guest,
        migration_port=0,
        mib=8,
        disks=(disk,),
        disk_sectors=SECTORS,
    )
    instance = Instance(spec, hv)
    await instance.start()
    await wait_for_sweeps(hv, name, minimum=SECTORS + 5)  # every sector written once
    return instance


async def assert_disk_is_what_the_guest_wrote(hv: KvmHypervisor, name: str, path: Path) -> None:
    """Stop the guest and compare every sector with what its counted sweeps wrote."""
    async with hv.qmp(name) as qmp:
        await qmp.execute("stop")
        sweeps = await sweep_count(hv, name)
        data = path.read_bytes()
        wrong = [
            s
            for s in range(SECTORS)
            if data[s * 512 : (s + 1) * 512] not in expected_sector(s, SECTORS, sweeps)
        ]
        assert wrong == [], f"sectors not as the guest wrote them (sweep {sweeps}): {wrong}"
        await qmp.execute("cont")


@pytest.mark.parametrize("keep_source", [False, True], ids=["source-removed", "source-kept"])
async def test_a_guest_writing_its_local_disk_moves_with_it(
    nodes: tuple[KvmHypervisor, KvmHypervisor], storage: Path, keep_source: bool, dirty_guest: Path
) -> None:
    source, target = nodes
    image(storage, "node-a", 32 << 20, data=8 << 20)
    instance = await writing_guest(source, storage, dirty_guest, "ld-move", keep_source=keep_source)
    before = await sweep_count(source, "ld-move")
    result = await migrate(instance, target, target_address="127.0.0.1", policy=FAST)
    assert result.bad_answers == []
    await assert_runs_on(instance, target)
    await wait_for_sweeps(target, "ld-move", minimum=before + SECTORS)  # it goes on writing
    copy = storage / "node-b" / "disk.img"
    await assert_disk_is_what_the_guest_wrote(target, "ld-move", copy)
    # 8 of its 32 MiB hold data: the rest went as zero writes, and the copy stays sparse.
    assert copy.stat().st_size == 32 << 20
    assert copy.stat().st_blocks * 512 < 16 << 20
    assert (storage / "node-a" / "disk.img").exists() is keep_source
    async with target.qmp("ld-move") as qmp:
        assert await qmp.execute("query-block-jobs") == []
        files = [b["inserted"]["file"] for b in await qmp.execute("query-block") if "inserted" in b]
    assert files == [str(storage / "node-b" / "disk.img")]  # its own copy, nothing else
    await instance.stop(force=True)


async def test_the_pre_check_refuses_a_target_that_already_holds_the_image(
    nodes: tuple[KvmHypervisor, KvmHypervisor], storage: Path, dirty_guest: Path
) -> None:
    source, target = nodes
    image(storage, "node-a", 16 << 20)
    squatter = image(storage, "node-b", 4096, data=4096)
    content = squatter.read_bytes()
    instance = await writing_guest(source, storage, dirty_guest, "ld-there")
    with pytest.raises(IncompatibleTargetError, match=r"node-b already has .*disk\.img"):
        await migrate(instance, target, target_address="127.0.0.1", policy=FAST)
    assert squatter.read_bytes() == content  # left as it was
    assert instance.machine.state is InstanceState.RUNNING
    assert not await target.is_running("ld-there")
    await instance.stop(force=True)


async def test_with_tls_the_disk_copy_is_encrypted_too(
    nodes: tuple[KvmHypervisor, KvmHypervisor], storage: Path, dirty_guest: Path, tmp_path: Path
) -> None:
    """With ``tls``, the NBD export and the source's NBD client use the nodes' credentials,
    as the RAM stream does; the copy still holds what the guest wrote."""
    from kvmflow.kvm.tls import MigrationTLS
    from tests.tls import give_credentials, make_migration_credentials

    source, target = nodes
    give_credentials(nodes, tmp_path / "tls")
    image(storage, "node-a", 16 << 20, data=4 << 20)
    instance = await writing_guest(source, storage, dirty_guest, "ld-tls")
    tls = FAST.with_changes(tls=True)
    await migrate(instance, target, target_address="127.0.0.1", policy=tls)
    await assert_runs_on(instance, target)
    await assert_disk_is_what_the_guest_wrote(target, "ld-tls", storage / "node-b" / "disk.img")
    # Back, from a node whose client certificate the target's CA never signed: the disk
    # copy, which comes before the RAM stream, is refused by the target's TLS.
    stranger = tmp_path / "stranger"
    make_migration_credentials({"node-b": stranger}, ca_name="another CA")
    target.migration_tls = MigrationTLS(str(stranger))
    phases: list[str] = []
    with pytest.raises(MigrationError) as refused:
        await migrate(
            instance,
            source,
            target_address="127.0.0.1",
            policy=tls,
            on_phase=lambda change: phases.append(change.after.value),
        )
    assert "certificate" in str(refused.value).lower(), refused.value
    assert "streaming" not in phases  # refused at the disk copy, before any RAM went
    assert instance.machine.node == "node-b"
    assert (storage / "node-a" / "disk.img").exists() is False  # no partial image left
    await instance.stop(force=True)


async def test_the_pre_check_refuses_a_target_without_the_space(
    nodes: tuple[KvmHypervisor, KvmHypervisor],
    storage: Path,
    small_storage: Path,
    dirty_guest: Path,
) -> None:
    source, target = nodes
    image(storage, "node-a", 64 << 20)
    instance = await writing_guest(source, storage, dirty_guest, "ld-space")
    with pytest.raises(IncompatibleTargetError, match=r"node-b has 40 MiB free .* need 64 MiB"):
        await migrate(instance, target, target_address="127.0.0.1", policy=FAST)
    assert list(small_storage.iterdir()) == []
    await instance.stop(force=True)


async def test_a_cancel_mid_copy_leaves_the_source_on_its_own_disk(
    nodes: tuple[KvmHypervisor, KvmHypervisor], storage: Path, dirty_guest: Path
) -> None:
    source, target = nodes
    image(storage, "node-a", 64 << 20, data=48 << 20)
    instance = await writing_guest(source, storage, dirty_guest, "ld-cancel")
    slow = FAST.with_changes(bandwidth_mib=4)  # 48 MiB of data: about 12 s to copy
    async with source.qmp("ld-cancel") as qmp, anyio.create_task_group() as tg:

        async def cancel_once_copying() -> None:
            while not any(j["offset"] > 0 for j in await qmp.execute("query-block-jobs")):
                await anyio.sleep(0.05)
            tg.cancel_scope.cancel()

        tg.start_soon(cancel_once_copying)
        await migrate(instance, target, target_address="127.0.0.1", policy=slow, source_qmp=qmp)
        raise AssertionError("the migration was not cancelled mid-copy")
    async with source.qmp("ld-cancel") as qmp:
        assert await qmp.execute("query-block-jobs") == []
    assert instance.machine.node == "node-a"
    assert not await target.is_running("ld-cancel")
    assert not (storage / "node-b" / "disk.img").exists()  # the partial image is gone
    await assert_disk_is_what_the_guest_wrote(source, "ld-cancel", storage / "node-a" / "disk.img")
    await instance.stop(force=True)


async def test_a_target_whose_storage_fills_up_mid_copy(
    nodes: tuple[KvmHypervisor, KvmHypervisor],
    storage: Path,
    small_storage: Path,
    dirty_guest: Path,
) -> None:
    """The pre-check saw room (32 of 40 MiB); then something else takes it while the copy
    runs: the copy fails, the migration aborts, the source keeps running on its disk."""
    source, target = nodes
    image(storage, "node-a", 32 << 20, data=32 << 20)
    instance = await writing_guest(source, storage, dirty_guest, "ld-full")
    filler = small_storage / "filler"

    def fill_at_listen(change: PhaseChange) -> None:
        if change.after is MigrationPhase.TARGET_LISTENING:
            with filler.open("wb") as file:  # what else needs the space, right then
                file.write(b"\xff" * (30 << 20))

    slow = FAST.with_changes(bandwidth_mib=16)
    with pytest.raises(MigrationError) as failed:
        await migrate(
            instance, target, target_address="127.0.0.1", policy=slow, on_phase=fill_at_listen
        )
    assert failed.value.runs_on == "node-a"
    assert "disk.img" in str(failed.value)
    assert instance.machine.state is InstanceState.RUNNING
    assert not await target.is_running("ld-full")
    assert sorted(p.name for p in small_storage.iterdir()) == ["filler"]  # no partial image
    await assert_disk_is_what_the_guest_wrote(source, "ld-full", storage / "node-a" / "disk.img")
    await instance.stop(force=True)


async def test_one_link_budget_holds_disk_copies_and_ram_alike(
    runtime_root: Path, storage: Path, dirty_guest: Path
) -> None:
    """node-a's 16 MiB/s link budget: a lone migration copies its disk at 16 MiB/s; when a
    second migration starts, the engine's rebalance halves the disk copy's speed too."""
    entries = local_nodes(runtime_root, "node-a", "node-b", link_budgets_mib={"node-a": 16})
    policy = FAST.with_changes(bandwidth_mib=None)
    async with Engine(entries, limits=Limits(2, 2), default_policy=policy) as engine:
        node_a = engine.node("node-a").hypervisor
        image(storage, "node-a", 64 << 20, data=48 << 20)
        copying = engine.add_instance(
            await writing_guest(node_a, storage, dirty_guest, "ld-budget")
        )
        plain = engine.add_instance(
            Instance(
                InstanceSpec("ld-plain", memory_mib=64, hvparams=HvParams(migration_port=0)), node_a
            )
        )
        await plain.start()
        first = engine.submit_migration("ld-budget", "node-b")

        async def copy_speed() -> int | None:
            if first.qmp is None:
                return None
            jobs = await first.qmp.execute("query-block-jobs")
            return int(jobs[0]["speed"]) if jobs else None

        with anyio.fail_after(30):
            while await copy_speed() != 16 * MIB:
                await anyio.sleep(0.05)
        second = engine.submit_migration("ld-plain", "node-b")
        with anyio.fail_after(30):
            while await copy_speed() != 8 * MIB:
                await anyio.sleep(0.05)
        for ticket in (first, second):
            ticket.cancel()
            with pytest.raises(MigrationError):
                await ticket.wait()
        assert engine.where("ld-budget") == "node-a"
        assert not (storage / "node-b" / "disk.img").exists()
        for instance in (copying, plain):
            await instance.stop(force=True)


def test_jobs_says_how_far_the_disks_are() -> None:
    from kvmflow.cli.records import _job_row
    from kvmflow.store import JournalEntry, Owner

    entry = JournalEntry(
        1,
        "ld-jobs",
        "migrate",
        Owner.this_process(),
        1,
        0.0,
        "target-listening",
        progress={"status": "copying-disks", "disk_copied": 24 << 20, "disk_total": 96 << 20},
    )
    assert _job_row(entry, None)["progress_text"] == "copying disks 25% of 96 MiB"


def test_local_disk_fields_are_checked() -> None:
    from kvmflow.errors import ValidationError
    from kvmflow.kvm.validation import spec_problems

    with pytest.raises(ValidationError, match="local must be true or false"):
        InstanceSpec.from_dict({"name": "x", "disks": [{"path": "/d.img", "local": "yes"}]})
    spec = InstanceSpec(
        "x", disks=(Disk("/srv/{node}/a.img"), Disk("/srv/b.img", keep_source=True))
    )
    problems, _ = spec_problems(spec)
    assert {(p.field, p.allowed) for p in problems} == {
        ("disks[0].path", "only a local disk's path may name its {node}"),
        ("disks[1].keep_source", "only a local disk has a source copy"),
    }
    local = Disk("/srv/{node}/a.img", local=True, keep_source=True)
    assert local.path_on("beta") == "/srv/beta/a.img"
    assert InstanceSpec.from_dict(InstanceSpec("x", disks=(local,)).to_dict()).disks == (local,)
