"""Migration streams beyond one plain TCP connection, against real QEMU: TLS with a
throwaway CA (accepted, refused, with post-copy and its recovery) and multifd channels."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from kvmflow.errors import IncompatibleTargetError, MigrationError
from kvmflow.guest import dirty_guest_spec, wait_for_sweeps
from kvmflow.guest import sweep_count as sweeps
from kvmflow.instance import Instance, InstanceState
from kvmflow.kvm import KvmHypervisor
from kvmflow.kvm.tls import MigrationTLS
from kvmflow.migration import MigrationPolicy, MigrationProgress, migrate
from kvmflow.migration.policy import Capabilities
from tests.conftest import qemus_under
from tests.guests import assert_runs_on, started_dirty
from tests.test_policies import migrate_and_break_postcopy
from tests.tls import give_credentials, make_migration_credentials

pytestmark = pytest.mark.anyio
FAST = MigrationPolicy.fixed(bandwidth_mib=1024, downtime_ms=300, poll_interval=0.1)
TLS = FAST.with_changes(tls=True)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def tls_nodes(
    nodes: tuple[KvmHypervisor, KvmHypervisor], tmp_path: Path
) -> tuple[KvmHypervisor, KvmHypervisor]:
    """node-a and node-b with credentials of one CA (the target verifies the source)."""
    give_credentials(nodes, tmp_path / "tls")
    return nodes


async def test_tls_migration_completes(
    tls_nodes: tuple[KvmHypervisor, KvmHypervisor], dirty_guest: Path
) -> None:
    source, target = tls_nodes
    instance = await started_dirty(source, "tls-ok", dirty_guest)
    result = await migrate(instance, target, target_address="127.0.0.1", policy=TLS)
    assert result.bad_answers == []
    assert not await source.is_running("tls-ok")
    await assert_runs_on(instance, target)
    async with target.qmp("tls-ok") as qmp:  # the target took the stream with its server end
        assert (await qmp.execute("query-migrate-parameters"))[
            "tls-creds"
        ] == "kvmflow-migration-tls"
    # Its credentials stay on that QEMU; a plain migration onwards must not use them.
    await migrate(instance, source, target_address="127.0.0.1", policy=FAST)
    await assert_runs_on(instance, source)
    async with source.qmp("tls-ok") as qmp:
        assert (await qmp.execute("query-migrate-parameters"))["tls-creds"] == ""
    await instance.stop(force=True)


async def test_a_source_of_another_ca_is_refused_and_keeps_running(
    tls_nodes: tuple[KvmHypervisor, KvmHypervisor],
    dirty_guest: Path,
    tmp_path: Path,
    runtime_root: Path,
) -> None:
    source, target = tls_nodes
    stranger = tmp_path / "stranger"
    make_migration_credentials({source.node.name: stranger}, ca_name="another CA")
    source.migration_tls = MigrationTLS(str(stranger))
    instance = await started_dirty(source, "tls-bad", dirty_guest)
    before = await sweeps(source, "tls-bad")
    with pytest.raises(MigrationError) as failed:
        await migrate(instance, target, target_address="127.0.0.1", policy=TLS)
    assert failed.value.runs_on == "node-a"
    said = f"{failed.value} {failed.value.target_said}".lower()
    assert "certificate" in said or "tls" in said, said
    assert instance.machine.state is InstanceState.RUNNING
    await wait_for_sweeps(source, "tls-bad", minimum=before + 1)  # the guest goes on there
    assert not await target.is_running("tls-bad")
    assert [q for q in qemus_under(runtime_root) if "node-b" in " ".join(q)] == []
    assert sorted(p.name for p in (runtime_root / "node-b").rglob("*") if p.is_file()) == []
    async with source.qmp("tls-bad") as qmp:  # the source's TLS was dropped with the abort
        assert (await qmp.execute("query-migrate-parameters"))["tls-creds"] == ""
        assert await qmp.execute("qom-list", {"path": "/objects"}) is not None
        objects = {o["name"] for o in await qmp.execute("qom-list", {"path": "/objects"})}
    assert "kvmflow-migration-tls" not in objects
    await instance.stop(force=True)


async def test_missing_credentials_are_refused_before_the_source_is_touched(
    tls_nodes: tuple[KvmHypervisor, KvmHypervisor], dirty_guest: Path
) -> None:
    source, target = tls_nodes
    target.migration_tls = None
    instance = await started_dirty(source, "tls-none", dirty_guest)
    with pytest.raises(IncompatibleTargetError, match="node node-b has no migration TLS"):
        await migrate(instance, target, target_address="127.0.0.1", policy=TLS)
    assert not await target.is_running("tls-none")
    await instance.stop(force=True)


async def test_postcopy_and_its_recovery_with_tls(
    tls_nodes: tuple[KvmHypervisor, KvmHypervisor], dirty_guest: Path
) -> None:
    """A post-copy migration over TLS whose stream QEMU pauses (``migrate-pause``) is
    recovered over TLS again."""
    source, target = tls_nodes
    instance = Instance(dirty_guest_spec("tls-post", dirty_guest, migration_port=0, mib=48), source)
    await instance.start()
    await wait_for_sweeps(source, "tls-post")
    async with source.qmp("tls-post") as qmp:

        async def pause() -> None:
            await qmp.execute("migrate-pause")

        result, statuses = await migrate_and_break_postcopy(
            instance, target, qmp, pause, postcopy_mib=16, tls=True
        )
    assert result.postcopy
    assert result.postcopy_recoveries >= 1
    assert "postcopy-paused" in statuses
    assert result.bad_answers == []
    await assert_runs_on(instance, target)
    await instance.stop(force=True)


async def test_multifd_channels_and_compression_on_both_sides(
    nodes: tuple[KvmHypervisor, KvmHypervisor], dirty_guest: Path
) -> None:
    source, target = nodes
    instance = await started_dirty(source, "mfd", dirty_guest)
    caps = Capabilities(multifd=True, multifd_channels=4, multifd_compression="zstd")
    policy = FAST.with_changes(capabilities=caps, bandwidth_mib=64)
    streams: list[int] = []

    def progress(report: MigrationProgress) -> None:
        pid_file = Path(target.paths.pid_file("mfd"))
        if pid_file.exists():
            connections = psutil.Process(int(pid_file.read_text())).net_connections("tcp")
            streams.append(sum(c.status == psutil.CONN_ESTABLISHED for c in connections))

    result = await migrate(
        instance, target, target_address="127.0.0.1", policy=policy, on_progress=progress
    )
    assert result.bad_answers == []
    assert max(streams) == 1 + 4  # the main stream and four channels
    async with target.qmp("mfd") as qmp:
        parameters = await qmp.execute("query-migrate-parameters")
    assert (parameters["multifd-channels"], parameters["multifd-compression"]) == (4, "zstd")
    await assert_runs_on(instance, target)
    # That QEMU still has multifd on: a single-stream migration onwards turns it off.
    await migrate(instance, source, target_address="127.0.0.1", policy=FAST)
    await assert_runs_on(instance, source)
    await instance.stop(force=True)
