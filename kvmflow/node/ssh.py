"""Another machine as a node, reached over SSH (asyncssh).

One SSH connection per node is shared by every operation: commands run as exec channels
(argv joined with shell quoting, since SSH carries a command string), files move over SFTP,
and monitor sockets are reached by direct stream-local forwarding to the remote unix socket
(no socat, no TCP port opened for the monitor). Host keys are checked against a known-hosts
file; turning that off must be asked for (``known_hosts=None``) and is logged. A dropped
connection is reopened on next use with exponential backoff.

asyncssh runs on asyncio only, so SSH nodes need the asyncio backend.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import shlex
import signal
import uuid
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.abc
import asyncssh

from kvmflow._logging import get_logger
from kvmflow.errors import NodeError, SSHConnectError, SSHFailure, TransportError
from kvmflow.fencing import before_change
from kvmflow.monitor.transport import Connector, StreamFactoryConnector
from kvmflow.node.base import CommandResult, NodeInfo, NodeLifecycle, node_errors

_log = get_logger("kvmflow.node")


@dataclass(frozen=True)
class SSHTarget:
    """Where and as whom to connect."""

    host: str
    port: int = 22
    username: str = "root"
    client_keys: tuple[str, ...] = ()
    known_hosts: str | None = "~/.ssh/known_hosts"
    connect_timeout: float = 10.0


class SSHByteStream(anyio.abc.ByteStream):
    """An anyio byte stream over an asyncssh channel (a forwarded unix socket)."""

    def __init__(
        self, reader: asyncssh.SSHReader[bytes], writer: asyncssh.SSHWriter[bytes]
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._closed = False

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if self._closed:
            raise anyio.ClosedResourceError
        try:
            data = await self._reader.read(max_bytes)
        except (asyncssh.Error, OSError) as exc:
            raise anyio.BrokenResourceError from exc
        if not data:
            raise anyio.EndOfStream
        return data

    async def send(self, item: bytes) -> None:
        if self._closed:
            raise anyio.ClosedResourceError
        try:
            self._writer.write(item)
            await self._writer.drain()
        except (asyncssh.Error, OSError, BrokenPipeError) as exc:
            raise anyio.BrokenResourceError from exc

    async def send_eof(self) -> None:
        self._writer.write_eof()

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()


class SSHNode(NodeLifecycle):
    """A remote machine reached over one shared SSH connection."""

    def __init__(
        self, name: str, target: SSHTarget, *, reconnect_attempts: int = 5, backoff: float = 0.2
    ) -> None:
        self._name = name
        self.target = target
        self.reconnect_attempts = reconnect_attempts
        self.backoff = backoff
        self._connection: asyncssh.SSHClientConnection | None = None
        self._sftp: asyncssh.SFTPClient | None = None
        self._lock: anyio.Lock | None = None
        self._log = _log.bind(node=name, host=target.host, port=target.port)
        self._known_hosts = (
            os.path.expanduser(target.known_hosts) if target.known_hosts is not None else None
        )
        self._client_keys = [os.path.expanduser(key) for key in target.client_keys]
        if target.known_hosts is None:
            self._log.warning(
                "host key verification is OFF for this node; anyone on the path can impersonate it"
            )

    @property
    def name(self) -> str:
        return self._name

    def __repr__(self) -> str:
        return (
            f"SSHNode({self._name!r}, {self.target.username}@{self.target.host}:{self.target.port})"
        )

    # ---------------------------------------------------------------- connection

    async def connection(self) -> asyncssh.SSHClientConnection:
        """The shared connection, opened (or reopened, with backoff) on demand."""
        if self._lock is None:
            self._lock = anyio.Lock()
        async with self._lock:
            if self._connection is not None and not self._connection.is_closed():
                return self._connection
            self._connection, self._sftp = None, None
            delay = self.backoff
            for attempt in range(1, self.reconnect_attempts + 1):
                try:
                    self._connection = await self._connect()
                except SSHConnectError as exc:
                    if exc.kind is not SSHFailure.UNREACHABLE or attempt == self.reconnect_attempts:
                        raise
                    self._log.info(
                        "ssh connect failed; retrying", attempt=attempt, delay=delay, error=str(exc)
                    )
                    await anyio.sleep(delay)
                    delay *= 2
                else:
                    return self._connection
            raise AssertionError("unreachable")  # pragma: no cover

    async def _connect(self) -> asyncssh.SSHClientConnection:
        target = self.target
        options: dict[str, Any] = {
            "known_hosts": self._known_hosts,
            "username": target.username,
            "connect_timeout": target.connect_timeout,
        }
        if self._client_keys:
            options["client_keys"] = self._client_keys
        where = f"{target.username}@{target.host}:{target.port}"
        try:
            connection = await asyncssh.connect(target.host, target.port, **options)
        except asyncssh.HostKeyNotVerifiable as exc:
            raise SSHConnectError(
                f"host key of {where} is not in {target.known_hosts} (or changed): {exc}; add "
                "it with ssh-keyscan after checking it out of band",
                node=self._name,
                kind=SSHFailure.HOST_KEY,
            ) from exc
        except asyncssh.PermissionDenied as exc:
            raise SSHConnectError(
                f"{where} refused our key: {exc}", node=self._name, kind=SSHFailure.AUTH
            ) from exc
        except (OSError, asyncssh.Error, TimeoutError) as exc:
            raise SSHConnectError(
                f"cannot reach {where}: {exc}", node=self._name, kind=SSHFailure.UNREACHABLE
            ) from exc
        self._log.info("ssh connected")
        return connection

    async def sftp(self) -> asyncssh.SFTPClient:
        connection = await self.connection()
        if self._sftp is None:
            try:
                self._sftp = await connection.start_sftp_client()
            except asyncssh.Error as exc:
                raise NodeError(f"cannot start SFTP: {exc}", node=self._name) from exc
        return self._sftp

    @property
    def connected(self) -> bool:
        """Whether the shared connection is open now."""
        return self._connection is not None and not self._connection.is_closed()

    async def aclose(self) -> None:
        """Close the shared connection (it reopens on next use, also in another event loop:
        the lock is made again there)."""
        connection, self._connection, self._sftp = self._connection, None, None
        self._lock = None
        if connection is not None:
            connection.close()
            with contextlib.suppress(Exception):
                await connection.wait_closed()

    # ------------------------------------------------------------------ commands

    async def run(
        self, argv: list[str], *, stdin: bytes | None = None, timeout: float | None = None
    ) -> CommandResult:
        connection = await self.connection()
        command = shlex.join(argv)
        try:
            with anyio.fail_after(timeout):
                result = await connection.run(command, input=stdin, check=False, encoding=None)
        except TimeoutError as exc:
            raise NodeError(
                f"{argv[0]} did not finish within {timeout} s", node=self._name
            ) from exc
        except (asyncssh.Error, OSError) as exc:
            raise NodeError(f"cannot run {argv[0]}: {exc}", node=self._name) from exc
        stdout = result.stdout if isinstance(result.stdout, bytes) else b""
        stderr = result.stderr if isinstance(result.stderr, bytes) else b""
        code = result.exit_status if result.exit_status is not None else 255
        return CommandResult(tuple(argv), code, stdout, stderr)

    # --------------------------------------------------------------------- files

    def _errors(self, doing: str) -> contextlib.AbstractContextManager[None]:
        """SFTP and socket failures inside become NodeError ``cannot <doing>``."""
        return node_errors(self._name, doing, asyncssh.SFTPError, OSError)

    async def read_file(self, path: str) -> bytes | None:
        sftp = await self.sftp()
        with self._errors(f"read {path}"):
            try:
                async with sftp.open(path, "rb") as handle:
                    data = await handle.read()
            except asyncssh.SFTPNoSuchFile:
                return None
        return data if isinstance(data, bytes) else data.encode()

    async def write_file(self, path: str, data: bytes, mode: int = 0o600) -> None:
        sftp = await self.sftp()
        temp = posixpath.join(posixpath.dirname(path), f".tmp-{uuid.uuid4().hex}")
        with self._errors(f"write {path}"):
            try:
                async with sftp.open(temp, "wb", asyncssh.SFTPAttrs(permissions=mode)) as handle:
                    await handle.write(data)
                await sftp.chmod(temp, mode)
                await sftp.posix_rename(temp, path)
            except (asyncssh.SFTPError, OSError):
                with contextlib.suppress(asyncssh.SFTPError, OSError):
                    await sftp.remove(temp)
                raise

    async def create_exclusive(self, path: str, data: bytes, mode: int = 0o600) -> bool:
        sftp = await self.sftp()
        try:
            async with sftp.open(path, "xb", asyncssh.SFTPAttrs(permissions=mode)) as handle:
                await handle.write(data)
        except asyncssh.SFTPFailure:
            if await sftp.exists(path):
                return False
            raise NodeError(f"cannot create {path}", node=self._name) from None
        except (asyncssh.SFTPError, OSError) as exc:
            if isinstance(exc, asyncssh.SFTPFileAlreadyExists):
                return False
            raise NodeError(f"cannot create {path}: {exc}", node=self._name) from exc
        return True

    async def remove(self, path: str) -> bool:
        await before_change(f"remove {path} on {self.name}")
        sftp = await self.sftp()
        with self._errors(f"remove {path}"):
            try:
                await sftp.remove(path)
            except asyncssh.SFTPNoSuchFile:
                return False
        return True

    async def make_dirs(self, path: str, mode: int = 0o700) -> None:
        sftp = await self.sftp()
        with self._errors(f"create {path}"):
            await sftp.makedirs(path, asyncssh.SFTPAttrs(permissions=mode), exist_ok=True)
            await sftp.chmod(path, mode)

    async def path_kind(self, path: str) -> str | None:
        result = await self.run(["stat", "-L", "-c", "%F", "--", path])
        if not result.ok:
            if b"No such file" in result.stderr or b"cannot statx" in result.stderr:
                return None
            raise NodeError(f"cannot inspect {path}: {result.error_text()}", node=self._name)
        kind = result.stdout.decode(errors="replace").strip()
        return (
            "file"
            if kind.startswith("regular")
            else "directory"
            if kind == "directory"
            else "other"
        )

    async def user_exists(self, name: str) -> bool:
        result = await self.run(["getent", "passwd", "--", name])
        if result.returncode == 2:  # getent: the key was not found
            return False
        if not result.ok:
            raise NodeError(f"cannot look up user {name}: {result.error_text()}", node=self._name)
        return True

    async def list_dir(self, path: str) -> list[str]:
        sftp = await self.sftp()
        with self._errors(f"list {path}"):
            try:
                names = await sftp.listdir(path)
            except asyncssh.SFTPNoSuchFile:
                return []
        return sorted(str(n) for n in names if n not in (".", ".."))

    async def rename(self, source: str, target: str) -> None:
        sftp = await self.sftp()
        with self._errors(f"rename {source} to {target}"):
            await sftp.posix_rename(source, target)

    async def remove_tree(self, path: str) -> None:
        await before_change(f"remove {path} on {self.name}")
        result = await self.run(["rm", "-rf", "--", path])
        if not result.ok:
            raise NodeError(f"cannot remove {path}: {result.error_text()}", node=self._name)

    # ----------------------------------------------------------------- processes

    async def _read_proc(self, *paths: str) -> bytes | None:
        """/proc files report size 0, which SFTP reads as empty: ``cat`` them instead."""
        result = await self.run(["cat", *paths])
        return result.stdout if result.ok else None

    async def process_cmdline(self, pid: int) -> list[str] | None:
        base = f"/proc/{int(pid)}"
        data = await self._read_proc(f"{base}/stat", f"{base}/cmdline")
        if data is None:
            return None
        stat, _, raw = data.partition(b"\n")
        if stat.rsplit(b")", 1)[-1].split()[:1] == [b"Z"] or not raw:
            return None
        return [part.decode(errors="replace") for part in raw.rstrip(b"\0").split(b"\0")]

    async def find_processes(self, argument: str) -> list[int]:
        # grep finds the candidates (the argument is passed as a positional parameter, never
        # parsed by the shell); each is then checked argument by argument.
        script = 'grep -lsF -e "$1" /proc/[0-9]*/cmdline || true'
        result = await self.run(["sh", "-c", script, "sh", argument])
        if not result.ok:
            raise NodeError(f"cannot list processes: {result.error_text()}", node=self._name)
        found = []
        for line in result.stdout.decode(errors="replace").split():
            pid_text = line.removeprefix("/proc/").removesuffix("/cmdline")
            if pid_text.isdigit():
                cmdline = await self.process_cmdline(int(pid_text))
                if cmdline is not None and argument in cmdline:
                    found.append(int(pid_text))
        return found

    async def signal_process(self, pid: int, sig: signal.Signals) -> bool:
        await before_change(f"signal {sig.name} to pid {pid} on {self.name}")
        result = await self.run(["kill", f"-{sig.name.removeprefix('SIG')}", str(int(pid))])
        if result.ok:
            return True
        if b"No such process" in result.stderr:
            return False
        raise NodeError(f"cannot signal process {pid}: {result.error_text()}", node=self._name)

    async def node_info(self) -> NodeInfo:
        meminfo = (await self._read_proc("/proc/meminfo") or b"").decode()
        values = {}
        for line in meminfo.splitlines():
            key, _, rest = line.partition(":")
            if rest.strip():
                values[key] = int(rest.split()[0]) // 1024
        cpuinfo = (await self._read_proc("/proc/cpuinfo") or b"").decode()
        cpus = sum(1 for line in cpuinfo.splitlines() if line.startswith("processor"))
        sockets = {
            line.split(":")[1].strip()
            for line in cpuinfo.splitlines()
            if line.startswith("physical id")
        }
        numa = [
            n
            for n in await self.list_dir("/sys/devices/system/node")
            if n.startswith("node") and n[4:].isdigit()
        ]
        total = values.get("MemTotal", 0)
        free = values.get("MemAvailable", values.get("MemFree", 0))
        return NodeInfo(
            total, free, max(0, total - free), max(cpus, 1), max(len(sockets), 1), max(len(numa), 1)
        )

    # ------------------------------------------------------------------ monitors

    def monitor_connector(self, path: str) -> Connector:
        async def open_stream() -> anyio.abc.ByteStream:
            connection = await self.connection()
            try:
                reader, writer = await connection.open_unix_connection(path)
            except asyncssh.ChannelOpenError as exc:
                raise TransportError(
                    f"cannot open monitor socket over SSH: {exc.reason}",
                    monitor=f"{self._name}:{path}",
                ) from exc
            except (asyncssh.Error, OSError) as exc:
                raise TransportError(
                    f"SSH connection failed: {exc}", monitor=f"{self._name}:{path}"
                ) from exc
            return SSHByteStream(reader, writer)

        return StreamFactoryConnector(f"{self._name}:{path}", open_stream)


__all__ = ["SSHByteStream", "SSHConnectError", "SSHNode", "SSHTarget"]
