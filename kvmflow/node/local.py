"""This machine as a node: subprocesses, files and psutil, without blocking the event loop."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import stat
import tempfile

import anyio
import psutil

from kvmflow.errors import NodeError
from kvmflow.fencing import before_change
from kvmflow.monitor.transport import Connector, UnixSocketConnector
from kvmflow.node.base import CommandResult, NodeInfo, NodeLifecycle, node_errors


class LocalNode(NodeLifecycle):
    """The machine kvmflow runs on."""

    def __init__(self, name: str | None = None) -> None:
        self._name = name or socket.gethostname()

    @property
    def name(self) -> str:
        return self._name

    def __repr__(self) -> str:
        return f"LocalNode({self._name!r})"

    async def aclose(self) -> None:
        """Nothing to close: this machine is reached without a connection."""

    async def run(
        self, argv: list[str], *, stdin: bytes | None = None, timeout: float | None = None
    ) -> CommandResult:
        try:
            with anyio.fail_after(timeout):
                completed = await anyio.run_process(argv, input=stdin, check=False)
        except OSError as exc:
            raise NodeError(f"cannot run {argv[0]}: {exc.strerror or exc}", node=self.name) from exc
        except TimeoutError as exc:
            raise NodeError(f"{argv[0]} did not finish within {timeout} s", node=self.name) from exc
        return CommandResult(tuple(argv), completed.returncode, completed.stdout, completed.stderr)

    async def read_file(self, path: str) -> bytes | None:
        with node_errors(self.name, f"read {path}"):
            try:
                return await anyio.Path(path).read_bytes()
            except FileNotFoundError:
                return None

    async def write_file(self, path: str, data: bytes, mode: int = 0o600) -> None:
        await anyio.to_thread.run_sync(self._write_atomically, path, data, mode)

    def _write_atomically(self, path: str, data: bytes, mode: int) -> None:
        with node_errors(self.name, f"write {path}"):
            fd, temp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.chmod(temp, mode)
                os.replace(temp, path)
            except OSError:
                with contextlib.suppress(OSError):
                    os.unlink(temp)
                raise

    async def create_exclusive(self, path: str, data: bytes, mode: int = 0o600) -> bool:
        def create() -> bool:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            return True

        with node_errors(self.name, f"create {path}"):
            return await anyio.to_thread.run_sync(create)

    async def remove(self, path: str) -> bool:
        await before_change(f"remove {path} on {self.name}")
        with node_errors(self.name, f"remove {path}"):
            try:
                await anyio.Path(path).unlink()
            except FileNotFoundError:
                return False
        return True

    async def make_dirs(self, path: str, mode: int = 0o700) -> None:
        def make() -> None:
            os.makedirs(path, mode=mode, exist_ok=True)
            os.chmod(path, mode)

        with node_errors(self.name, f"create {path}"):
            await anyio.to_thread.run_sync(make)

    async def path_kind(self, path: str) -> str | None:
        with node_errors(self.name, f"inspect {path}"):
            try:
                mode = (await anyio.to_thread.run_sync(os.stat, path)).st_mode
            except FileNotFoundError:
                return None
        return "file" if stat.S_ISREG(mode) else "directory" if stat.S_ISDIR(mode) else "other"

    async def user_exists(self, name: str) -> bool:
        try:
            pwd.getpwnam(name)
        except KeyError:
            return False
        return True

    async def list_dir(self, path: str) -> list[str]:
        with node_errors(self.name, f"list {path}"):
            try:
                return sorted(await anyio.to_thread.run_sync(os.listdir, path))
            except FileNotFoundError:
                return []

    async def rename(self, source: str, target: str) -> None:
        with node_errors(self.name, f"rename {source} to {target}"):
            await anyio.to_thread.run_sync(os.rename, source, target)

    async def remove_tree(self, path: str) -> None:
        await before_change(f"remove {path} on {self.name}")

        def remove() -> None:
            if os.path.lexists(path):
                shutil.rmtree(path)

        with node_errors(self.name, f"remove {path}"):
            await anyio.to_thread.run_sync(remove)

    async def process_cmdline(self, pid: int) -> list[str] | None:
        try:
            process = psutil.Process(pid)
            if process.status() == psutil.STATUS_ZOMBIE:
                return None
            return process.cmdline()
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            return None
        except psutil.AccessDenied as exc:
            raise NodeError(f"not allowed to inspect process {pid}", node=self.name) from exc

    async def find_processes(self, argument: str) -> list[int]:
        def scan() -> list[int]:
            found = []
            for process in psutil.process_iter(["cmdline", "status"]):
                info = process.info
                if info["status"] != psutil.STATUS_ZOMBIE and argument in (info["cmdline"] or ()):
                    found.append(process.pid)
            return found

        return await anyio.to_thread.run_sync(scan)

    async def signal_process(self, pid: int, sig: signal.Signals) -> bool:
        await before_change(f"signal {sig.name} to pid {pid} on {self.name}")
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return False
        except PermissionError as exc:
            raise NodeError(f"not allowed to signal process {pid}", node=self.name) from exc
        return True

    async def node_info(self) -> NodeInfo:
        return await anyio.to_thread.run_sync(local_node_info)

    def monitor_connector(self, path: str) -> Connector:
        return UnixSocketConnector(path)


def local_node_info() -> NodeInfo:
    """Memory (MiB) and CPU figures of this machine from psutil and sysfs."""
    memory = psutil.virtual_memory()
    mib = 1024 * 1024
    qemu_rss = 0
    for process in psutil.process_iter(["name", "memory_info"]):
        name = process.info.get("name") or ""
        info = process.info.get("memory_info")
        if name.startswith("qemu-system") and info is not None:
            qemu_rss += info.rss
    used_by_node = max(0, memory.total - memory.available - qemu_rss)
    return NodeInfo(
        memory_total_mib=memory.total // mib,
        memory_free_mib=memory.available // mib,
        memory_used_by_node_mib=used_by_node // mib,
        cpu_count=psutil.cpu_count(logical=True) or 1,
        cpu_sockets=_count_sockets(),
        numa_nodes=_count_numa_nodes(),
    )


def _count_sockets() -> int:
    packages = set()
    base = "/sys/devices/system/cpu"
    with contextlib.suppress(OSError):
        for entry in os.listdir(base):
            path = os.path.join(base, entry, "topology", "physical_package_id")
            if entry.startswith("cpu") and os.path.exists(path):
                with open(path) as handle:
                    packages.add(handle.read().strip())
    return max(1, len(packages))


def _count_numa_nodes() -> int:
    with contextlib.suppress(OSError):
        nodes = [
            n
            for n in os.listdir("/sys/devices/system/node")
            if n.startswith("node") and n[4:].isdigit()
        ]
        return max(1, len(nodes))
    return 1
