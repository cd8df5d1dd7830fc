"""Shared fixtures: real QEMU processes, short socket directories, both anyio backends."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from kvmflow.kvm import KvmHypervisor, ScratchQemu, start_scratch_qemu
from kvmflow.store import SQLiteStore
from kvmflow.testing import local_hypervisors
from kvmflow.testing.etcd import EtcdCluster, etcd_cluster
from kvmflow.testing.qemu_builds import QemuBuild, debian_qemu, system_qemu


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Run every ``@pytest.mark.anyio`` test on asyncio and on trio."""
    return str(request.param)


@pytest.fixture(autouse=True)
def own_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test's ``kvmflow`` commands share a store of the test's own (never the host's
    /var/lib/kvmflow one, so that no test sees another's leases or placements)."""
    path = tmp_path / "cli-store.sqlite"
    monkeypatch.setenv("KVMFLOW_STORE", str(path))
    return path


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    """A store of record of the test's own, open (for tests that use the library's)."""
    async with await SQLiteStore.open(tmp_path / "store.sqlite") as opened:
        yield opened


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short temporary directory: unix socket paths must stay under 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="kvf-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def qemu(sockdir: Path) -> Iterator[ScratchQemu]:
    """A real, paused ``qemu-system-x86_64`` (KVM when /dev/kvm opens, else TCG), always
    stopped in teardown, also when the test fails."""
    instance = start_scratch_qemu(sockdir)
    try:
        yield instance
    finally:
        instance.stop()


def qemus_under(root: Path) -> list[list[str]]:
    """The command lines of live QEMUs whose command line mentions ``root``."""
    import psutil

    found = []
    for process in psutil.process_iter(["name", "cmdline", "status"]):
        cmdline = process.info.get("cmdline") or []
        if (
            cmdline
            and "qemu-system" in cmdline[0]
            and process.info.get("status") != psutil.STATUS_ZOMBIE
            and any(str(root) in a for a in cmdline)
        ):
            found.append(cmdline)
    return found


def kill_qemus_under(root: Path) -> list[int]:
    """Kill every QEMU whose command line mentions ``root`` (daemonized ones included)."""
    import psutil

    killed = []
    for process in psutil.process_iter(["name", "cmdline"]):
        cmdline = process.info.get("cmdline") or []
        if cmdline and "qemu-system" in cmdline[0] and any(str(root) in a for a in cmdline):
            with contextlib.suppress(psutil.Error):
                process.kill()
            killed.append(process.pid)
    # A daemonized QEMU's parent is init, which reaps it when it gets to it: a zombie is gone.
    deadline = time.monotonic() + 10
    for pid in killed:
        while time.monotonic() < deadline:
            try:
                if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.NoSuchProcess:
                break
            time.sleep(0.02)
    return killed


@pytest.fixture
def runtime_root() -> Iterator[Path]:
    """A short runtime root; any QEMU started under it is killed in teardown."""
    root = Path(tempfile.mkdtemp(prefix="kvfr-"))
    try:
        yield root
    finally:
        kill_qemus_under(root)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now, below Linux's ephemeral range (32768 and up)
    so that no outgoing connection takes it before the test binds it."""
    import random
    import socket

    for port in random.sample(range(20000, 32768), 200):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free TCP port between 20000 and 32767 on 127.0.0.1")


@pytest.fixture(scope="session")
def dirty_guest() -> Path:
    """The dirtying guest ELF, compiled once per session with the machine's gcc."""
    from kvmflow.guest import build_dirty_guest

    return build_dirty_guest(Path(tempfile.gettempdir()) / "kvmflow-test-guest")


@pytest.fixture(scope="module")
def ssh_hosts() -> Iterator[object]:
    """Two real sshd servers, on 127.0.0.2 and 127.0.0.3, each standing for one host."""
    from kvmflow.testing.sshd import ssh_fleet

    with ssh_fleet(["127.0.0.2", "127.0.0.3"]) as fleet:
        yield fleet


@pytest.fixture(scope="session")
def qemu_builds() -> dict[str, QemuBuild]:
    """The QEMU builds this machine can test: the system's, and on Debian 12 (QEMU 7.2) the
    QEMU 10.0 of bookworm-backports beside it (fetched once; a fetch that fails fails the
    tests that need it, loudly). A host whose system QEMU is already 10.x has one build."""
    system = system_qemu()
    builds = {"system": system}
    if int(system.version.split(".")[0]) < 10 and _debian_codename() == "bookworm":
        builds["second"] = debian_qemu()
    return builds


def _debian_codename() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("VERSION_CODENAME="):
                return line.split("=", 1)[1].strip('"')
    return ""


@pytest.fixture(params=["system", "second"])
def qemu_build(request: pytest.FixtureRequest, qemu_builds: dict[str, QemuBuild]) -> QemuBuild:
    """Each QEMU build in turn (the version matrix, for the tests where versions differ)."""
    label = str(request.param)
    if label not in qemu_builds:
        system = qemu_builds["system"].version
        pytest.skip(f"no second QEMU build on this host (system QEMU {system})")
    return qemu_builds[label]


@pytest.fixture
def nodes(runtime_root: Path) -> tuple[KvmHypervisor, KvmHypervisor]:
    """Two local "nodes" (each its own runtime root under ``runtime_root``): node-a, node-b."""
    source, target = local_hypervisors(runtime_root, "node-a", "node-b")
    return source, target


@pytest.fixture
def build_nodes(runtime_root: Path, qemu_build: QemuBuild) -> tuple[KvmHypervisor, KvmHypervisor]:
    """:func:`nodes`, both running ``qemu_build``."""
    binaries = {"node-a": qemu_build.binary, "node-b": qemu_build.binary}
    source, target = local_hypervisors(runtime_root, "node-a", "node-b", qemu_binaries=binaries)
    return source, target


@pytest.fixture(scope="session", autouse=True)
def no_lab_left_behind() -> Iterator[None]:
    """After the whole suite: no network namespace of a test lab is left (each lab removes
    what it made, also when its test fails)."""
    from kvmflow.testing.netns import leftovers

    yield
    assert leftovers() == [], f"network namespaces left behind: {leftovers()}"


@pytest.fixture(scope="session")
def shared_etcd() -> Iterator[EtcdCluster]:
    """One real 3-member etcd cluster for the tests that only read and write (each under a
    prefix of its own); stopped after the suite."""
    with etcd_cluster(3) as cluster:
        yield cluster


@pytest.fixture
def etcd() -> Iterator[EtcdCluster]:
    """A real 3-member etcd cluster of the test's own (members may be killed)."""
    with etcd_cluster(3) as cluster:
        yield cluster


@pytest.fixture(scope="session", autouse=True)
def no_etcd_left_behind() -> Iterator[None]:
    """After the whole suite: no etcd member of a test cluster still runs."""
    yield
    left = subprocess.run(
        ["pgrep", "-f", "kvmflow-etcd-"], capture_output=True, text=True, check=False
    ).stdout.split()
    assert left == [], f"etcd members left behind: {left}"
