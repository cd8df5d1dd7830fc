"""KvmHypervisor against real QEMU processes (KVM or TCG): start, inspect, stop, clean up."""

from __future__ import annotations

import os
import pwd
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest
from structlog.testing import capture_logs

from kvmflow.errors import CommandError, ValidationError
from kvmflow.kvm import (
    Disk,
    HvParams,
    InstanceRunningError,
    InstanceSpec,
    KvmHypervisor,
    Nic,
    QemuStartError,
    RuntimePaths,
    UidPool,
    UidPoolExhaustedError,
    default_accelerator,
)
from kvmflow.kvm.hvparams import BootOrder, DiskType, SecurityModel
from kvmflow.monitor import RunState, query_status
from kvmflow.node import LocalNode, SSHNode, SSHTarget
from kvmflow.node.base import CommandResult
from kvmflow.testing.qemu_builds import QemuBuild
from tests.tls import make_x509_dir

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the client is proven on both backends; QEMU work runs once


@pytest.fixture
def hv(runtime_root: Path, qemu_build: QemuBuild) -> KvmHypervisor:
    """This machine as a node, running each QEMU build in turn: process control, security
    models and chroot are spelled differently in QEMU 7.2 and 10."""
    paths = RuntimePaths(str(runtime_root))
    return KvmHypervisor(
        LocalNode("local"),
        paths,
        default_accelerator=default_accelerator(),
        qemu_binary=qemu_build.binary,
        uid_pool=UidPool.from_text("5000-5001", paths),
    )


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(["sleep", "60"])
    try:
        yield process
    finally:
        process.kill()
        process.wait()


def small(name: str, **hv: object) -> InstanceSpec:
    return InstanceSpec(name, memory_mib=32, hvparams=HvParams(**hv))  # type: ignore[arg-type]


def leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_socket())


async def test_start_info_list_and_forced_stop(hv: KvmHypervisor, runtime_root: Path) -> None:
    spec = InstanceSpec("vm-a", memory_mib=48, vcpus=2)
    info = await hv.start(spec)
    assert (info.name, info.memory_mib, info.vcpus) == ("vm-a", 48, 2)
    assert psutil.pid_exists(info.pid)
    assert await hv.info("vm-a") == info
    assert await hv.list_instances() == ["vm-a"]
    runtime = await hv.load_runtime("vm-a")
    assert runtime is not None
    assert runtime.spec == spec
    assert runtime.argv[:3] == (hv.qemu_binary, "-name", "vm-a")
    pinned = f"type={(await hv.qemu()).resolve_machine(None)}"  # pc, pinned to its version
    assert runtime.argv[runtime.argv.index("-machine") + 1] == pinned
    for directory in ("pid", "conf", "ctrl"):
        assert (runtime_root / directory).stat().st_mode & 0o777 == 0o700
    async with hv.qmp("vm-a") as qmp:
        assert (await query_status(qmp)).state is RunState.RUNNING
    await hv.stop("vm-a", force=True)
    assert not psutil.pid_exists(info.pid) or psutil.Process(info.pid).status() == "zombie"
    assert await hv.info("vm-a") is None
    assert await hv.list_instances() == []
    assert leftovers(runtime_root) == []


async def test_acpi_stop_sends_powerdown_then_kills_after_timeout(hv: KvmHypervisor) -> None:
    info = await hv.start(small("vm-acpi"))
    async with hv.qmp("vm-acpi") as qmp:
        with qmp.subscribe("POWERDOWN") as events:
            started = time.monotonic()
            # SeaBIOS without an OS ignores the ACPI button: the bounded wait must end.
            await hv.stop("vm-acpi", timeout=1.0, qmp=qmp)
            assert (await events.receive(timeout=1)).name == "POWERDOWN"
    assert 1.0 <= time.monotonic() - started < 10
    assert await hv.info("vm-acpi") is None
    assert not psutil.pid_exists(info.pid) or psutil.Process(info.pid).status() == "zombie"


async def test_second_start_is_refused_and_changes_nothing(hv: KvmHypervisor) -> None:
    first = await hv.start(small("vm-b"))
    with pytest.raises(InstanceRunningError, match="already running"):
        await hv.start(small("vm-b"))
    assert await hv.info("vm-b") == first
    await hv.stop("vm-b", force=True)


async def test_pid_file_of_an_unrelated_process_is_not_the_instance(
    hv: KvmHypervisor, runtime_root: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    await hv.paths.ensure(hv.node)
    Path(hv.paths.pid_file("vm-c")).write_text(f"{sleeper.pid}\n")
    assert await hv.find_pid("vm-c") is None
    assert await hv.info("vm-c") is None
    assert await hv.list_instances() == []
    info = await hv.start(small("vm-c"))  # the stale pid file does not block a start
    assert info.pid != sleeper.pid
    assert sleeper.poll() is None  # and the unrelated process was left alone
    await hv.stop("vm-c", force=True)
    assert sleeper.poll() is None


async def test_start_failure_carries_qemus_message_and_leaves_nothing(
    hv: KvmHypervisor, runtime_root: Path, tmp_path: Path
) -> None:
    image = tmp_path / "flash.img"
    image.write_bytes(b"\0" * (16 * 1024 * 1024))
    spec = InstanceSpec(
        "vm-d",
        memory_mib=32,
        disks=(Disk(str(image)),),
        hvparams=HvParams(disk_type=DiskType.PFLASH, security_model=SecurityModel.POOL),
    )
    with pytest.raises(QemuStartError, match="firmware exceeds"):
        await hv.start(spec)
    assert leftovers(runtime_root) == []
    assert await hv.list_instances() == []


async def test_invalid_spec_is_refused_before_anything_is_written(
    hv: KvmHypervisor, runtime_root: Path
) -> None:
    with pytest.raises(ValidationError) as info:
        await hv.start(small("vm-e", kernel_path="/nope", boot_order=BootOrder.CDROM))
    assert {p.field for p in info.value.problems} == {"kernel_path", "root_path", "boot_order"}
    assert list(runtime_root.iterdir()) == []


async def test_reboot_starts_again_from_the_saved_runtime(hv: KvmHypervisor) -> None:
    first = await hv.start(small("vm-f"))
    before = await hv.load_runtime("vm-f")
    second = await hv.reboot(small("vm-f"), force=True)
    assert second.pid != first.pid
    after = await hv.load_runtime("vm-f")
    assert before is not None
    assert after is not None
    assert after.argv == before.argv
    await hv.stop("vm-f", force=True)


async def test_cleanup_refuses_a_live_instance(hv: KvmHypervisor, runtime_root: Path) -> None:
    info = await hv.start(small("vm-g"))
    with pytest.raises(InstanceRunningError, match="stop it before cleanup"):
        await hv.cleanup("vm-g")
    assert await hv.info("vm-g") == info
    os.kill(info.pid, 9)
    with anyio.fail_after(5):
        while await hv.is_running("vm-g"):
            await anyio.sleep(0.05)
    await hv.cleanup("vm-g")
    assert leftovers(runtime_root) == []


async def test_non_empty_chroot_goes_to_quarantine(hv: KvmHypervisor, runtime_root: Path) -> None:
    info = await hv.start(small("vm-h", use_chroot=True))
    chroot = Path(hv.paths.chroot_dir("vm-h"))
    assert chroot.is_dir()
    assert os.readlink(f"/proc/{info.pid}/root") == str(chroot)  # QEMU really chrooted
    (chroot / "dropped-by-guest").write_text("suspicious")
    with capture_logs() as logs:
        await hv.stop("vm-h", force=True)
    assert not chroot.exists()
    [quarantined] = list((runtime_root / "chroot-quarantine").iterdir())
    assert quarantined.name.startswith("vm-h-")
    assert (quarantined / "dropped-by-guest").read_text() == "suspicious"
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert any("quarantine" in e["event"] for e in warnings)
    # An empty chroot is simply removed.
    await hv.start(small("vm-h", use_chroot=True))
    await hv.stop("vm-h", force=True)
    assert not chroot.exists()
    assert len(list((runtime_root / "chroot-quarantine").iterdir())) == 1


async def test_security_model_user_runs_as_that_user(hv: KvmHypervisor) -> None:
    info = await hv.start(
        small("vm-i", security_model=SecurityModel.USER, security_domain="nobody")
    )
    assert psutil.Process(info.pid).uids().real == pwd.getpwnam("nobody").pw_uid
    await hv.stop("vm-i", force=True)


async def test_uid_pool_gives_each_instance_its_own_uid(
    hv: KvmHypervisor, runtime_root: Path
) -> None:
    a = await hv.start(small("vm-p1", security_model=SecurityModel.POOL))
    b = await hv.start(small("vm-p2", security_model=SecurityModel.POOL))
    a_uid, b_uid = psutil.Process(a.pid).uids().real, psutil.Process(b.pid).uids().real
    assert {a_uid, b_uid} == {5000, 5001}
    with pytest.raises(UidPoolExhaustedError, match="5000-5001"):
        await hv.start(small("vm-p3", security_model=SecurityModel.POOL))
    assert not Path(hv.paths.pid_file("vm-p3")).exists()
    assert not Path(hv.paths.uid_file("vm-p3")).exists()
    await hv.stop("vm-p1", force=True)
    assert sorted(os.listdir(runtime_root / "uid-pool")) == [str(b_uid)]
    c = await hv.start(
        small("vm-p3", security_model=SecurityModel.POOL)
    )  # the released uid is reused
    assert psutil.Process(c.pid).uids().real == a_uid
    await hv.stop("vm-p2", force=True)
    await hv.stop("vm-p3", force=True)
    assert os.listdir(runtime_root / "uid-pool") == []


def free_vnc_port() -> int:
    for port in range(5990, 6100):
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) != 0:
                return port
    raise AssertionError("no free port")


def vnc_spec(name: str, tmp_path: Path, password: str = "s3cr3t-pw\n", **hv: Any) -> InstanceSpec:
    """An instance with VNC on 127.0.0.1 (a free display) and a password file."""
    password_file = tmp_path / "vnc.pw"
    password_file.write_text(password)
    return InstanceSpec(
        name,
        memory_mib=32,
        network_port=free_vnc_port(),
        hvparams=HvParams(vnc_bind_address="127.0.0.1", vnc_password_file=str(password_file), **hv),
    )


async def test_vnc_password_is_set_through_the_monitor_only(
    hv: KvmHypervisor, tmp_path: Path
) -> None:
    spec = vnc_spec("vm-v", tmp_path)
    with capture_logs() as logs:
        info = await hv.start(spec)
    assert "s3cr3t-pw" not in " ".join(psutil.Process(info.pid).cmdline())
    assert "s3cr3t-pw" not in repr(logs)
    runtime = await hv.load_runtime("vm-v")
    assert runtime is not None
    assert "s3cr3t-pw" not in " ".join(runtime.argv)
    async with hv.qmp("vm-v") as qmp:
        vnc = await qmp.execute("query-vnc")
        assert vnc["enabled"] is True
        assert vnc["auth"] == "vnc"
        assert vnc["service"] == str(spec.network_port)
    await hv.stop("vm-v", force=True)


VENCRYPT = 19  # RFB security type
X509_NONE, X509_VNC = 260, 261  # VeNCrypt subtypes: x509 TLS, then no or VNC password auth


def recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError(f"VNC server closed after {data!r}")
        data += chunk
    return data


def vnc_x509_handshake(port: int, context: ssl.SSLContext) -> tuple[list[int], bytes]:
    """Speak RFB 3.8 up to VeNCrypt, complete the TLS handshake with ``context`` and read
    the first bytes sent inside TLS (the VNC auth challenge). Returns the offered subtypes
    and those bytes."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        assert recv_exact(raw, 12) == b"RFB 003.008\n"
        raw.sendall(b"RFB 003.008\n")
        offered = list(recv_exact(raw, recv_exact(raw, 1)[0]))
        assert offered == [VENCRYPT]
        raw.sendall(bytes([VENCRYPT]))
        assert recv_exact(raw, 2) == bytes([0, 2])  # VeNCrypt 0.2
        raw.sendall(bytes([0, 2]))
        assert recv_exact(raw, 1) == b"\x00"
        count = recv_exact(raw, 1)[0]
        subtypes = list(struct.unpack(f">{count}I", recv_exact(raw, 4 * count)))
        raw.sendall(struct.pack(">I", subtypes[0]))
        assert recv_exact(raw, 1) == b"\x01"  # subtype accepted: TLS starts
        try:
            with context.wrap_socket(raw, server_hostname="kvmflow-vnc") as tls:
                return subtypes, recv_exact(tls, 16)
        except (ssl.SSLError, ConnectionError) as exc:
            raise PermissionError(f"the VNC server ended the TLS session: {exc!r}") from exc


async def test_vnc_tls_with_x509_verification_really_handshakes(
    hv: KvmHypervisor, tmp_path: Path
) -> None:
    creds = make_x509_dir(tmp_path / "x509", tmp_path / "viewer", "kvmflow-vnc")
    spec = vnc_spec(
        "vm-tls",
        tmp_path,
        vnc_tls=True,
        vnc_x509_path=str(tmp_path / "x509"),
        vnc_x509_verify=True,
    )
    await hv.start(spec)
    async with hv.qmp("vm-tls") as qmp:
        servers = await qmp.execute("query-vnc-servers")
    assert [(v["auth"], v["vencrypt"]) for v in servers] == [("vencrypt", "x509-vnc")]
    viewer = ssl.create_default_context(cafile=creds.ca_cert)
    viewer.load_cert_chain(creds.cert, creds.key)
    assert spec.network_port is not None
    subtypes, challenge = await anyio.to_thread.run_sync(
        vnc_x509_handshake, spec.network_port, viewer
    )
    assert subtypes == [X509_VNC]
    assert len(challenge) == 16  # the VNC password challenge, sent inside TLS
    # verify-peer is on: a viewer without a certificate of the CA gets nothing.
    stranger = ssl.create_default_context(cafile=creds.ca_cert)
    with pytest.raises(PermissionError, match="ended the TLS session"):
        await anyio.to_thread.run_sync(vnc_x509_handshake, spec.network_port, stranger)
    await hv.stop("vm-tls", force=True)


async def test_empty_vnc_password_file_undoes_the_start(
    hv: KvmHypervisor, tmp_path: Path, runtime_root: Path
) -> None:
    spec = vnc_spec("vm-w", tmp_path, password="")
    with pytest.raises(Exception, match="is empty"):
        await hv.start(spec)
    assert await hv.list_instances() == []
    assert leftovers(runtime_root) == []


async def test_nic_up_script_runs_with_the_site_script_and_is_removed(
    runtime_root: Path, tmp_path: Path
) -> None:
    dump = tmp_path / "nic.env"
    site = tmp_path / "site.sh"
    site.write_text(f'#!/bin/sh\nenv > {dump}\nip link set dev "$INTERFACE" up\n')
    site.chmod(0o755)
    paths = RuntimePaths(str(runtime_root))
    hv = KvmHypervisor(
        LocalNode(), paths, default_accelerator=default_accelerator(), site_script=str(site)
    )
    spec = InstanceSpec(
        "vm-n",
        memory_mib=32,
        tags=("web",),
        nics=(Nic("52:54:00:ab:cd:01", "192.0.2.9", link="br-test"),),
    )
    await hv.start(spec)
    env = dict(line.split("=", 1) for line in dump.read_text().splitlines() if "=" in line)
    assert env["INSTANCE"] == "vm-n"
    assert env["MAC"] == "52:54:00:ab:cd:01"
    assert env["IP"] == "192.0.2.9"
    assert env["BRIDGE"] == "br-test"
    assert env["TAGS"] == "web"
    assert env["INTERFACE"].startswith("tap")
    assert os.listdir(runtime_root / "nic") == []  # scripts are removed after start
    async with hv.qmp("vm-n") as qmp:
        with pytest.raises(CommandError):
            await qmp.execute("no-such")
        nics = await qmp.execute("human-monitor-command", {"command-line": "info network"})
        assert "52:54:00:ab:cd:01" in nics
    await hv.stop("vm-n", force=True)


async def test_node_info_and_console(hv: KvmHypervisor) -> None:
    node = await hv.node_info()
    assert node.memory_total_mib > node.memory_free_mib > 0
    assert node.cpu_count >= 1
    assert node.cpu_sockets >= 1
    assert node.numa_nodes >= 1
    command = hv.console(small("vm-x"))
    lock = hv.paths.serial_socket("vm-x") + ".lock"
    assert isinstance(command, list)
    assert command[:5] == ["flock", "-n", "-E", "75", lock]  # one console at a time
    assert command[5] == "socat"
    assert command[-1] == f"UNIX-CONNECT:{hv.paths.serial_socket('vm-x')}"
    assert "escape=0x1d" in command[6]
    assert hv.console(small("vm-x"), terminal=False)[6] == "STDIO"  # no raw mode on a pipe
    assert lock in hv.paths.instance_files("vm-x")  # cleanup removes it
    assert "no serial console" in str(hv.console(small("vm-x", serial_console=False)))
    remote = KvmHypervisor(
        SSHNode("far", SSHTarget("198.51.100.7", 2222, "ops", ("/k/id",), "/k/known")),
        hv.paths,
    ).console(small("vm-x"))
    assert isinstance(remote, list)
    assert remote[:4] == ["ssh", "-t", "-p", "2222"]
    assert remote[6:8] == ["-i", "/k/id"]
    assert "UserKnownHostsFile=/k/known" in remote
    assert remote[-2] == "ops@198.51.100.7"
    assert remote[-1].startswith(f"flock -n -E 75 {lock} socat")


async def test_a_qemu_whose_pid_file_vanished_is_still_found_and_stopped(
    hv: KvmHypervisor, runtime_root: Path
) -> None:
    info = await hv.start(small("vm-orphan"))
    os.remove(hv.paths.pid_file("vm-orphan"))  # the runtime directory lost under it
    assert await hv.find_pid("vm-orphan") is None
    assert await hv.find_pids("vm-orphan") == [info.pid]  # found by its command line
    assert await hv.is_running("vm-orphan")
    with pytest.raises(InstanceRunningError, match="already running"):
        await hv.start(small("vm-orphan"))  # never a second copy
    await hv.stop("vm-orphan", force=True)
    assert not psutil.pid_exists(info.pid) or psutil.Process(info.pid).status() == "zombie"
    assert not await hv.is_running("vm-orphan")


class DiesAfterSavingItsRuntime(KvmHypervisor):
    """QEMU dies between the saved runtime and the final check of the start."""

    async def info(self, name: str) -> Any:
        pid = await self.find_pid(name)
        if pid is not None and await self.load_runtime(name) is not None:
            os.kill(pid, 9)
            while await self.node.process_cmdline(pid) is not None:
                await anyio.sleep(0.02)
        return await super().info(name)


async def test_a_qemu_that_dies_right_after_starting_leaves_no_files(
    runtime_root: Path,
) -> None:
    hv = DiesAfterSavingItsRuntime(LocalNode("local"), RuntimePaths(str(runtime_root)))
    with pytest.raises(QemuStartError, match="died right after starting"):
        await hv.start(small("vm-dies"))
    assert leftovers(runtime_root) == []


class KilledWhileStarting(LocalNode):
    """A node on which QEMU is killed (SIGKILL) before it daemonizes: no word from it."""

    async def run(self, argv: list[str], **kwargs: Any) -> Any:
        if "-daemonize" in argv:
            return CommandResult(tuple(argv), -9, b"", b"")
        return await super().run(argv, **kwargs)


async def test_a_qemu_killed_during_its_start_is_not_called_a_refusal(
    runtime_root: Path,
) -> None:
    hv = KvmHypervisor(KilledWhileStarting("local"), RuntimePaths(str(runtime_root)))
    with pytest.raises(QemuStartError) as info:
        await hv.start(small("vm-killed"))
    assert "refused" not in str(info.value)
    assert "ended during its start on local (exit status -9) without a word" in str(info.value)
    assert leftovers(runtime_root) == []
