"""Live migration against real QEMU: success, non-live, cancellation, faults, concurrency."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest

from kvmflow.errors import ConnectionLostError
from kvmflow.guest import dirty_guest_spec, wait_for_sweeps
from kvmflow.guest import sweep_count as sweeps
from kvmflow.instance import Instance, InstanceState
from kvmflow.kvm import HvParams, InstanceInfo, InstanceSpec, KvmHypervisor
from kvmflow.kvm.hvparams import UsbMouse
from kvmflow.kvm.runtime import SavedRuntime
from kvmflow.migration import (
    MigrationError,
    MigrationPolicy,
    MigrationProgress,
    MigrationStatus,
    Outcome,
    migrate,
)
from kvmflow.migration.target import listening_port, uri_host
from kvmflow.monitor import QMPClient, RunState, query_status

pytestmark = pytest.mark.anyio

FAST = MigrationPolicy.fixed(bandwidth_mib=1000, downtime_ms=300, poll_interval=0.2)
# The ancestor's fixed limits at which the dirtying guest never converges.
SLOW = MigrationPolicy.fixed(bandwidth_mib=20, downtime_ms=50, poll_interval=0.2)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def idle_spec(name: str, port: int) -> InstanceSpec:
    return InstanceSpec(name, memory_mib=64, hvparams=HvParams(migration_port=port))


def dirty_spec(name: str, port: int, guest: Path, mib: int = 48) -> InstanceSpec:
    return dirty_guest_spec(name, guest, migration_port=port, mib=mib)


async def started(spec: InstanceSpec, hv: KvmHypervisor) -> Instance:
    instance = Instance(spec, hv)
    await instance.start()
    return instance


async def run_state(hv: KvmHypervisor, name: str) -> RunState:
    async with hv.qmp(name) as qmp:
        return (await query_status(qmp)).state


async def test_idle_guest_live_migration(
    nodes: tuple[KvmHypervisor, KvmHypervisor],
) -> None:
    source, target = nodes
    instance = await started(idle_spec("mig-idle", 0), source)
    source_pid = (await source.info("mig-idle")).pid  # type: ignore[union-attr]
    reports: list[MigrationProgress] = []
    result = await migrate(
        instance, target, target_address="127.0.0.1", policy=FAST, on_progress=reports.append
    )
    assert result.final.status is MigrationStatus.COMPLETED
    assert result.source_final_state == "postmigrate"
    # Port 0: the target picked a free port and the source was sent there.
    host, _, picked = result.target_uri.rpartition(":")
    assert host == "tcp:127.0.0.1"
    assert 0 < int(picked) <= 65535
    assert result.total_time_ms is not None
    assert result.downtime_ms is not None
    assert reports
    assert reports[-1].snapshot.status is MigrationStatus.COMPLETED
    assert not await source.is_running("mig-idle")
    assert not psutil.pid_exists(source_pid) or psutil.Process(source_pid).status() == "zombie"
    assert await run_state(target, "mig-idle") is RunState.RUNNING
    assert instance.machine.state is InstanceState.RUNNING
    assert instance.machine.node == "node-b"
    assert instance.hypervisor is target
    assert await target.load_runtime("mig-idle") is not None
    assert await source.load_runtime("mig-idle") is None
    events = [t.event.value for t in instance.machine.history]
    assert events == ["start", "started", "migrate", "migrated"]


async def test_migration_to_an_ipv6_address(nodes: tuple[KvmHypervisor, KvmHypervisor]) -> None:
    source, target = nodes
    instance = await started(idle_spec("mig-v6", 0), source)
    result = await migrate(instance, target, target_address="::1", policy=FAST)
    assert result.target_uri.startswith("tcp:[::1]:")
    assert await run_state(target, "mig-v6") is RunState.RUNNING
    assert instance.machine.node == "node-b"


async def test_non_live_migration_pauses_then_runs_on_target(
    nodes: tuple[KvmHypervisor, KvmHypervisor],
) -> None:
    source, target = nodes
    instance = await started(idle_spec("mig-nonlive", 0), source)
    states: list[str] = []
    async with source.qmp("mig-nonlive") as qmp:
        with qmp.subscribe("STOP") as stops:
            result = await migrate(
                instance,
                target,
                target_address="127.0.0.1",
                policy=FAST,
                live=False,
                source_qmp=qmp,
                on_progress=lambda p: states.append(p.snapshot.status),
            )
            stop = await stops.receive(timeout=1)
    assert stop.name == "STOP"
    assert result.live is False
    assert result.source_final_state == "postmigrate"  # where it settles, never finish-migrate
    # The guest's downtime is the time it was paused, not QEMU's figure for the last copy.
    assert result.paused_ms is not None
    assert result.downtime_ms == result.paused_ms
    assert result.paused_ms >= (result.final.downtime_ms or 0)
    assert await run_state(target, "mig-nonlive") is RunState.RUNNING
    assert instance.machine.state is InstanceState.RUNNING


async def test_non_converging_guest_is_cancelled_by_a_deadline(
    nodes: tuple[KvmHypervisor, KvmHypervisor], dirty_guest: Path
) -> None:
    source, target = nodes
    instance = await started(dirty_spec("mig-dirty", 0, dirty_guest), source)
    await wait_for_sweeps(source, "mig-dirty")
    reports: list[MigrationProgress] = []
    with anyio.move_on_after(4) as scope:
        await migrate(
            instance, target, target_address="127.0.0.1", policy=SLOW, on_progress=reports.append
        )
    assert scope.cancelled_caught
    assert any(r.snapshot.status is MigrationStatus.ACTIVE for r in reports)
    assert await run_state(source, "mig-dirty") is RunState.RUNNING
    before = await sweeps(source, "mig-dirty")
    await anyio.sleep(0.3)
    assert await sweeps(source, "mig-dirty") > before  # the guest still runs on the source
    assert not await target.is_running("mig-dirty")
    assert os.listdir(target.paths.dir("pid")) == []
    assert instance.machine.state is InstanceState.RUNNING
    assert instance.machine.node == "node-a"
    async with source.qmp("mig-dirty") as qmp:
        assert (await qmp.execute("query-migrate"))["status"] == "cancelled"


async def test_cancel_from_another_task_mid_flight(
    nodes: tuple[KvmHypervisor, KvmHypervisor], dirty_guest: Path
) -> None:
    source, target = nodes
    instance = await started(dirty_spec("mig-cancel", 0, dirty_guest), source)
    await wait_for_sweeps(source, "mig-cancel")
    active = anyio.Event()

    def progress(report: MigrationProgress) -> None:
        if report.snapshot.status is MigrationStatus.ACTIVE and report.snapshot.transferred:
            active.set()

    async with anyio.create_task_group() as tg:

        async def migration() -> None:
            await migrate(
                instance, target, target_address="127.0.0.1", policy=SLOW, on_progress=progress
            )

        tg.start_soon(migration)
        with anyio.fail_after(20):
            await active.wait()
        tg.cancel_scope.cancel()
    assert await run_state(source, "mig-cancel") is RunState.RUNNING
    assert not await target.is_running("mig-cancel")
    assert instance.machine.state is InstanceState.RUNNING


async def test_target_killed_mid_flight(
    nodes: tuple[KvmHypervisor, KvmHypervisor], dirty_guest: Path
) -> None:
    source, target = nodes
    instance = await started(dirty_spec("mig-tkill", 0, dirty_guest), source)
    await wait_for_sweeps(source, "mig-tkill")
    killed: list[int] = []

    def progress(report: MigrationProgress) -> None:
        if report.snapshot.status is MigrationStatus.ACTIVE and not killed:
            pid = int(Path(target.paths.pid_file("mig-tkill")).read_text())
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    with pytest.raises(MigrationError) as info:
        await migrate(
            instance, target, target_address="127.0.0.1", policy=SLOW, on_progress=progress
        )
    assert killed
    assert "failed" in info.value.reason
    assert info.value.runs_on == "node-a"
    assert await run_state(source, "mig-tkill") is RunState.RUNNING
    assert instance.machine.state is InstanceState.RUNNING
    assert os.listdir(target.paths.dir("pid")) == []


class TargetWithoutTablet(KvmHypervisor):
    """A target QEMU without the source's USB tablet: it takes the RAM, then fails on the
    tablet's device state, which QEMU sends last, after the source reports completion."""

    async def start(
        self,
        spec: InstanceSpec,
        *,
        runtime: SavedRuntime | None = None,
        incoming: str | None = None,
    ) -> InstanceInfo:
        if runtime is not None:
            argv = list(runtime.argv)
            at = argv.index("usb-tablet")
            runtime = dataclasses.replace(runtime, argv=(*argv[: at - 1], *argv[at + 1 :]))
        return await super().start(spec, runtime=runtime, incoming=incoming)


async def test_source_takes_the_guest_back_when_the_target_never_takes_over(
    nodes: tuple[KvmHypervisor, KvmHypervisor],
) -> None:
    source, plain_target = nodes
    target = TargetWithoutTablet(plain_target.node, plain_target.paths)
    spec = InstanceSpec(
        "mig-back", memory_mib=64, hvparams=HvParams(migration_port=0, usb_mouse=UsbMouse.TABLET)
    )
    instance = await started(spec, source)
    reports: list[MigrationProgress] = []
    with pytest.raises(MigrationError) as info:
        await migrate(
            instance, target, target_address="127.0.0.1", policy=FAST, on_progress=reports.append
        )
    # The target dies loading the last device state. QEMU's source reports either
    # `completed` (it sent it all; the source takes the guest back) or `failed` (it noticed
    # first; the migration aborts): either way exactly one copy runs, on the source.
    last = reports[-1].snapshot.status
    assert last in (MigrationStatus.COMPLETED, MigrationStatus.FAILED)
    if last is MigrationStatus.COMPLETED:
        assert info.value.outcome is Outcome.TAKEN_BACK
        assert "never took over after the copy" in info.value.reason
    else:
        assert info.value.outcome is Outcome.ABORTED
    assert info.value.runs_on == "node-a"
    assert await run_state(source, "mig-back") is RunState.RUNNING
    assert instance.machine.state is InstanceState.RUNNING
    assert instance.machine.node == "node-a"
    assert not await target.is_running("mig-back")
    assert os.listdir(target.paths.dir("pid")) == []
    assert await source.load_runtime("mig-back") is not None
    # The guest can still move: a sound target takes it.
    result = await migrate(instance, plain_target, target_address="127.0.0.1", policy=FAST)
    assert result.final.status is MigrationStatus.COMPLETED
    assert await run_state(plain_target, "mig-back") is RunState.RUNNING


class LosesContAnswer(QMPClient):
    """A monitor whose answer to ``cont`` is lost on the way back (QEMU did run it)."""

    async def execute(
        self, command: str, arguments: dict[str, Any] | None = None, *, timeout: float | None = None
    ) -> Any:
        answer = await super().execute(command, arguments, timeout=timeout)
        if command == "cont":
            raise ConnectionLostError("the answer to 'cont' was lost")
        return answer


class TargetLosingContAnswers(KvmHypervisor):
    qmp_client_type = LosesContAnswer


async def test_a_target_that_may_have_run_the_guest_is_never_undone(
    nodes: tuple[KvmHypervisor, KvmHypervisor],
) -> None:
    # Non-live: the target loads the guest paused and needs a `cont`, whose answer is lost.
    # The guest may run there now, so resuming the source could fork it: kvmflow does not.
    source, plain_target = nodes
    target = TargetLosingContAnswers(plain_target.node, plain_target.paths)
    instance = await started(idle_spec("mig-maybe", 0), source)
    with pytest.raises(MigrationError) as info:
        await migrate(instance, target, target_address="127.0.0.1", policy=FAST, live=False)
    assert "may have run the guest" in info.value.reason
    assert info.value.runs_on is None
    assert instance.machine.state is InstanceState.FAILED
    assert await run_state(plain_target, "mig-maybe") is RunState.RUNNING  # left as it is
    assert await run_state(source, "mig-maybe") is RunState.POSTMIGRATE  # never resumed


async def test_source_killed_mid_flight(
    nodes: tuple[KvmHypervisor, KvmHypervisor], dirty_guest: Path
) -> None:
    source, target = nodes
    instance = await started(dirty_spec("mig-skill", 0, dirty_guest), source)
    await wait_for_sweeps(source, "mig-skill")
    source_pid = (await source.info("mig-skill")).pid  # type: ignore[union-attr]

    def progress(report: MigrationProgress) -> None:
        if report.snapshot.status is MigrationStatus.ACTIVE:
            os.kill(source_pid, signal.SIGKILL)

    with pytest.raises(MigrationError) as info:
        await migrate(
            instance, target, target_address="127.0.0.1", policy=SLOW, on_progress=progress
        )
    assert info.value.runs_on is None
    assert "runs nowhere" in str(info.value)
    assert not await target.is_running("mig-skill")
    assert os.listdir(target.paths.dir("pid")) == []
    assert instance.machine.state is InstanceState.FAILED


async def test_target_port_taken_fails_before_the_source_is_touched(
    nodes: tuple[KvmHypervisor, KvmHypervisor], free_port: int
) -> None:
    source, target = nodes
    instance = await started(idle_spec("mig-port", free_port), source)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", free_port))
        squatter.listen()
        with pytest.raises(MigrationError, match=r"cannot listen on 127\.0\.0\.1") as info:
            await migrate(instance, target, target_address="127.0.0.1", policy=FAST)
    assert info.value.runs_on == "node-a"
    async with source.qmp("mig-port") as qmp:
        assert await qmp.execute("query-migrate") == {}  # no migration was ever started
        assert (await query_status(qmp)).state is RunState.RUNNING
        parameters = await qmp.execute("query-migrate-parameters")
        assert parameters["downtime-limit"] == 300  # untouched QEMU default
    assert not await target.is_running("mig-port")
    assert instance.machine.state is InstanceState.RUNNING


async def test_preconditions_are_checked_before_anything(
    nodes: tuple[KvmHypervisor, KvmHypervisor],
) -> None:
    source, target = nodes
    instance = Instance(idle_spec("mig-pre", 0), source)
    from kvmflow.errors import MisuseError

    with pytest.raises(MisuseError, match="only a running or paused instance"):
        await migrate(instance, target, target_address="127.0.0.1")
    with pytest.raises(MisuseError, match="70000 is not a TCP port: use 1 to 65535, or 0"):
        await migrate(instance, target, target_address="127.0.0.1", port=70000)
    await instance.start()
    with pytest.raises(MisuseError, match="the node it runs on"):
        await migrate(instance, source, target_address="127.0.0.1")
    await target.start(instance.spec)  # a copy already runs on the target
    with pytest.raises(MigrationError, match="already runs on node-b"):
        await migrate(instance, target, target_address="127.0.0.1")
    assert instance.machine.state is InstanceState.RUNNING
    assert await source.is_running("mig-pre")


async def test_eight_paused_guests_migrate_at_once(
    nodes: tuple[KvmHypervisor, KvmHypervisor],
) -> None:
    source, target = nodes
    instances = []
    for n in range(8):
        # Port 0: each target picks a free port, so eight listeners cannot collide.
        instance = await started(idle_spec(f"mig-p{n}", 0), source)
        async with source.qmp(instance.name) as qmp:
            await qmp.execute("stop")
        instances.append(instance)
    results = {}

    async def move(instance: Instance) -> None:
        results[instance.name] = await migrate(
            instance, target, target_address="127.0.0.1", policy=FAST
        )

    async with anyio.create_task_group() as tg:
        for instance in instances:
            tg.start_soon(move, instance)
    assert len(results) == 8
    # QEMU's figures are asked for until it has filled them in: never a 0 it did not mean.
    assert all(r.total_time_ms for r in results.values())
    assert all(r.downtime_ms is not None for r in results.values())
    assert sorted(await target.list_instances()) == sorted(i.name for i in instances)
    assert await source.list_instances() == []
    for instance in instances:
        assert instance.machine.node == "node-b"
        # A guest that was paused by its owner stays paused after the move.
        assert await run_state(target, instance.name) is RunState.PAUSED


async def test_shared_monitor_is_usable_by_others_during_migration(
    nodes: tuple[KvmHypervisor, KvmHypervisor],
) -> None:
    source, target = nodes
    instance = await started(idle_spec("mig-shared", 0), source)
    seen: list[str] = []
    async with source.qmp("mig-shared") as qmp, anyio.create_task_group() as tg:

        async def other_caller() -> None:
            while instance.machine.state is not InstanceState.RUNNING or not seen:
                try:
                    seen.append((await query_status(qmp)).state.value)
                except Exception:
                    return
                await anyio.sleep(0.01)

        tg.start_soon(other_caller)
        await migrate(instance, target, target_address="127.0.0.1", policy=FAST, source_qmp=qmp)
    assert seen
    assert isinstance(qmp, QMPClient)


async def test_progress_as_an_async_iterator(
    nodes: tuple[KvmHypervisor, KvmHypervisor],
) -> None:
    from kvmflow.migration import ProgressFeed

    source, target = nodes
    instance = await started(idle_spec("mig-feed", 0), source)
    feed = ProgressFeed()
    reports: list[MigrationProgress] = []

    async def consume() -> None:
        async for report in feed:
            reports.append(report)

    async with anyio.create_task_group() as tg:
        tg.start_soon(consume)
        await migrate(instance, target, target_address="127.0.0.1", policy=FAST, on_progress=feed)
    assert reports
    assert reports[-1].snapshot.status is MigrationStatus.COMPLETED
    assert reports[-1].elapsed >= reports[0].elapsed
    assert {r.target for r in reports} == {"node-b"}


async def test_hmp_fallback_migrates_without_qmp(
    nodes: tuple[KvmHypervisor, KvmHypervisor],
) -> None:
    source, target = nodes
    instance = await started(idle_spec("mig-hmp", 0), source)
    policy = MigrationPolicy.fixed(bandwidth_mib=500, downtime_ms=200, poll_interval=0.1)
    reports: list[MigrationProgress] = []
    result = await migrate(
        instance,
        target,
        target_address="127.0.0.1",
        policy=policy,
        source_monitor="hmp",
        on_progress=reports.append,
    )
    assert result.source_final_state == "postmigrate"
    assert result.final.status is MigrationStatus.COMPLETED
    assert result.total_time_ms is not None
    assert reports[-1].snapshot.transferred > 0
    assert await run_state(target, "mig-hmp") is RunState.RUNNING
    assert not await source.is_running("mig-hmp")


def test_info_migrate_parsing() -> None:
    from kvmflow.migration.hmp_monitor import parse_info_migrate, parse_info_status
    from kvmflow.migration.status import parse_query_migrate

    text = (
        "globals:\nstore-global-state: on\nMigration status: active\ntotal time: 1234 ms\n"
        "expected downtime: 300 ms\nsetup: 3 ms\ntransferred ram: 2048 kbytes\n"
        "throughput: 268.44 mbps\nremaining ram: 1024 kbytes\ntotal ram: 131080 kbytes\n"
        "dirty sync count: 3\npage size: 4 kbytes\ndirty pages rate: 1500 pages\n"
    )
    snapshot = parse_query_migrate(parse_info_migrate(text))
    assert snapshot == parse_query_migrate(
        {
            "status": "active",
            "total-time": 1234,
            "expected-downtime": 300,
            "ram": {
                "transferred": 2048 * 1024,
                "remaining": 1024 * 1024,
                "total": 131080 * 1024,
                "mbps": 268.44,
                "dirty-sync-count": 3,
                "page-size": 4096,
                "dirty-pages-rate": 1500,
            },
        }
    )
    assert parse_info_migrate("globals:\nstore-global-state: on\n") == {}
    assert parse_info_status("VM status: paused (postmigrate)") == {
        "status": "postmigrate",
        "running": False,
    }
    assert parse_info_status("VM status: running") == {"status": "running", "running": True}


@pytest.mark.parametrize(
    ("answer", "wanted", "port"),
    [
        ({"socket-address": [{"type": "inet", "host": "::1", "port": "4444"}]}, 0, 4444),
        ({"socket-address": [{"type": "inet", "host": "::1", "port": "4444"}]}, 4444, 4444),
        ({"socket-address": [{"type": "inet", "host": "::1", "port": "4444"}]}, 5555, None),
        ({"socket-address": [{"type": "inet", "port": "0"}]}, 0, None),
        ({"socket-address": [{"type": "inet", "port": "x"}, "junk"]}, 0, None),
        ({"socket-address": "junk"}, 0, None),
        ({}, 0, None),
        ([], 0, None),
    ],
)
def test_listening_port_reads_only_sane_answers(
    answer: object, wanted: int, port: int | None
) -> None:
    assert listening_port(answer, wanted) == port


def test_ipv6_target_addresses_are_bracketed_in_uris() -> None:
    assert uri_host("::1") == "[::1]"
    assert uri_host("[::1]") == "[::1]"
    assert uri_host("192.0.2.1") == "192.0.2.1"
