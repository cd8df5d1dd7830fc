"""Nodes over real OpenSSH (sshd on 127.0.0.2 and 127.0.0.3): files, processes, monitors,
instances, evacuation and faults."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from kvmflow.engine import Engine, Limits, MigrationCompleted, MigrationStarted, NodeEntry
from kvmflow.errors import SSHConnectError, SSHFailure
from kvmflow.guest import wait_for_sweeps
from kvmflow.instance import Instance, InstanceState
from kvmflow.kvm import (
    HvParams,
    InstanceSpec,
    KvmHypervisor,
    RuntimePaths,
    ScratchQemu,
    default_accelerator,
)
from kvmflow.migration import MigrationError, MigrationPolicy, MigrationProgress, migrate
from kvmflow.monitor import QMPClient, RunState, query_status
from kvmflow.node import SSHNode, SSHTarget
from kvmflow.testing.sshd import SSHFleet

pytestmark = pytest.mark.anyio

FAST = MigrationPolicy.fixed(bandwidth_mib=1000, poll_interval=0.1)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # asyncssh runs on asyncio only


def ssh_node(fleet: SSHFleet, index: int, **changes: object) -> SSHNode:
    host = fleet.hosts[index]
    values: dict[str, Any] = {
        "host": host.host,
        "port": host.port,
        "client_keys": (str(fleet.client_key),),
        "known_hosts": str(fleet.known_hosts),
        "connect_timeout": 5,
    }
    values.update(changes)
    return SSHNode(
        f"node-{'ab'[index]}",
        SSHTarget(**values),
        reconnect_attempts=2,
        backoff=0.05,
    )


async def test_files_commands_and_processes(ssh_hosts: SSHFleet, tmp_path: Path) -> None:
    node = ssh_node(ssh_hosts, 0)
    try:
        result = await node.run(["echo", "a b", "$(id)", ";", "c"])
        assert result.ok
        assert result.stdout == b"a b $(id) ; c\n"  # no remote shell ever expands an argument
        failed = await node.run(["ls", str(tmp_path / "missing")])
        assert not failed.ok
        assert "No such file" in failed.error_text()
        path = str(tmp_path / "f.txt")
        await node.write_file(path, b"hello", 0o640)
        assert Path(path).read_bytes() == b"hello"
        assert Path(path).stat().st_mode & 0o777 == 0o640
        assert await node.read_file(path) == b"hello"
        assert await node.read_file(path + ".nope") is None
        assert await node.create_exclusive(path + ".x", b"1") is True
        assert await node.create_exclusive(path + ".x", b"2") is False
        await node.make_dirs(str(tmp_path / "d" / "e"), 0o700)
        assert await node.list_dir(str(tmp_path / "d")) == ["e"]
        await node.rename(path, path + ".moved")
        assert await node.remove(path + ".moved") is True
        assert await node.remove(path + ".moved") is False
        assert await node.path_kind(str(tmp_path / "d")) == "directory"
        assert await node.path_kind(str(tmp_path / "f.txt.x")) == "file"
        assert await node.path_kind("/dev/null") == "other"
        assert await node.path_kind(str(tmp_path / "nothing $(id)")) is None
        assert await node.user_exists("nobody") is True
        assert await node.user_exists("no-such-user;id") is False
        argv = [sys.executable, "-c", "import time; time.sleep(30)", "marker-arg $(id)"]
        sleeper = subprocess.Popen(argv)
        try:
            assert await node.process_cmdline(sleeper.pid) == argv
            assert await node.find_processes("marker-arg $(id)") == [sleeper.pid]
            assert await node.find_processes("marker-arg") == []  # whole arguments only
            assert await node.signal_process(sleeper.pid, signal.SIGTERM) is True
            sleeper.wait(5)
            assert await node.process_cmdline(sleeper.pid) is None
        finally:
            sleeper.kill()
        info = await node.node_info()
        assert info.memory_total_mib > info.memory_free_mib > 0
        assert info.cpu_count == os.cpu_count()
    finally:
        await node.aclose()


async def test_connection_errors_are_clear(ssh_hosts: SSHFleet, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(SSHConnectError) as info:
        await ssh_node(ssh_hosts, 0, known_hosts=str(empty)).run(["true"])
    assert info.value.kind is SSHFailure.HOST_KEY
    assert "ssh-keyscan" in str(info.value)
    with pytest.raises(SSHConnectError) as info:
        await ssh_node(ssh_hosts, 0, client_keys=(str(ssh_hosts.other_key),)).run(["true"])
    assert info.value.kind is SSHFailure.AUTH
    assert "refused our key" in str(info.value)
    with socket.socket() as closed:
        closed.bind(("127.0.0.2", 0))
        dead_port = closed.getsockname()[1]
    with pytest.raises(SSHConnectError) as info:
        await ssh_node(ssh_hosts, 0, port=dead_port).run(["true"])
    assert info.value.kind is SSHFailure.UNREACHABLE


async def test_qmp_over_ssh_stream_local_forwarding(ssh_hosts: SSHFleet, qemu: ScratchQemu) -> None:
    node = ssh_node(ssh_hosts, 0)
    try:
        async with QMPClient(node.monitor_connector(str(qemu.qmp_path))) as qmp:
            assert (await query_status(qmp)).state is RunState.PRELAUNCH
            async with anyio.create_task_group() as tg:
                for _ in range(50):
                    tg.start_soon(qmp.execute, "query-status")
            assert await qmp.execute("query-name") == {"name": "kvmflow-scratch"}
        with pytest.raises(Exception, match="cannot open monitor socket over SSH"):
            async with QMPClient(node.monitor_connector("/nonexistent.sock")):
                pass
    finally:
        await node.aclose()


def ssh_entries(fleet: SSHFleet, root: Path) -> list[NodeEntry]:
    accel = default_accelerator()
    return [
        NodeEntry(
            KvmHypervisor(
                ssh_node(fleet, i), RuntimePaths(str(root / "ab"[i])), default_accelerator=accel
            ),
            fleet.hosts[i].host,
        )
        for i in (0, 1)
    ]


async def test_evacuate_six_guests_over_ssh(ssh_hosts: SSHFleet, runtime_root: Path) -> None:
    entries = ssh_entries(ssh_hosts, runtime_root)
    try:
        engine = Engine(entries, limits=Limits(2, 2), default_policy=FAST, close_nodes=True)
        async with engine:
            events = engine.events()
            for n in range(6):
                spec = InstanceSpec(f"ssh-{n}", memory_mib=64, hvparams=HvParams(migration_port=0))
                await engine.add_instance(Instance(spec, entries[0].hypervisor)).start()
            assert len(await entries[0].hypervisor.list_instances()) == 6
            summary = await engine.evacuate("node-a", ["node-b"])
            assert summary.ok, summary.failed
            assert sorted(await entries[1].hypervisor.list_instances()) == [
                f"ssh-{n}" for n in range(6)
            ]
            assert await entries[0].hypervisor.list_instances() == []
            for n in range(6):
                assert engine.where(f"ssh-{n}") == "node-b"
        running = peak = 0
        async for event in events:
            if isinstance(event, MigrationStarted):
                running += 1
                peak = max(peak, running)
            elif isinstance(event, MigrationCompleted):
                running -= 1
        assert peak == 2
        # The engine owned its nodes: their SSH connections ended with it.
        nodes = [entry.hypervisor.node for entry in entries]
        assert [node.connected for node in nodes if isinstance(node, SSHNode)] == [False, False]
    finally:
        for entry in entries:
            assert isinstance(entry.hypervisor.node, SSHNode)
            await entry.hypervisor.node.aclose()


async def test_dropped_ssh_session_mid_migration(
    ssh_hosts: SSHFleet, runtime_root: Path, dirty_guest: Path
) -> None:
    entries = ssh_entries(ssh_hosts, runtime_root)
    source, target = entries[0].hypervisor, entries[1].hypervisor
    spec = InstanceSpec(
        "ssh-drop",
        memory_mib=128,
        hvparams=HvParams(
            migration_port=0,
            kernel_path=str(dirty_guest),
            root_path="/dev/null",
            kernel_args="mib=48",
            serial_console=False,
        ),
    )
    instance = Instance(spec, source)
    await instance.start()
    await wait_for_sweeps(source, "ssh-drop")  # the monitor is read over SSH too
    slow = MigrationPolicy.fixed(bandwidth_mib=20, downtime_ms=50, poll_interval=0.2)
    dropped: list[int] = []

    def progress(report: MigrationProgress) -> None:
        if report.snapshot.transferred > 0 and not dropped:
            for pid in ssh_hosts.hosts[0].session_pids():
                os.kill(pid, signal.SIGKILL)
                dropped.append(pid)

    try:
        with pytest.raises(MigrationError) as info:
            await migrate(
                instance, target, target_address="127.0.0.3", policy=slow, on_progress=progress
            )
        assert dropped
        assert info.value.runs_on == "node-a"
        # The source reconnected, cancelled cleanly, and is the one running copy.
        assert await source.is_running("ssh-drop")
        assert not await target.is_running("ssh-drop")
        async with source.qmp("ssh-drop") as qmp:
            assert (await query_status(qmp)).state is RunState.RUNNING
        assert instance.machine.state is InstanceState.RUNNING
    finally:
        for hv in (source, target):
            await hv.stop("ssh-drop", force=True)
            assert isinstance(hv.node, SSHNode)
            await hv.node.aclose()
