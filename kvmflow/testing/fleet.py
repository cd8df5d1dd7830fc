"""A fake fleet: thousands of simulated QEMUs, served from one separate process.

The fleet process (``python -m kvmflow.testing.fleet CONTROL_SOCKET``) hosts fake QEMU
monitors on unix sockets and simulates migrations between them from RAM size, bandwidth
and dirty rate: ``query-migrate`` figures, MIGRATION events, convergence against the
downtime limit, ``migrate_cancel``, a target that resumes or exits. :class:`FakeNode` is a
:class:`~kvmflow.node.base.Node` whose "QEMU" processes live in that fleet, so the real
engine, migration coroutine and QMP client can drive a thousand migrations on one machine
without spending the engine's CPU on the simulation.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc

from kvmflow.errors import NodeError
from kvmflow.fencing import before_change
from kvmflow.monitor.transport import Connector, UnixSocketConnector
from kvmflow.node.base import CommandResult, NodeInfo, NodeLifecycle
from kvmflow.node.local import LocalNode
from kvmflow.testing.fleet_files import FleetFiles, NodeFiles, fleet_files_op
from kvmflow.testing.probe_answers import probe_answer

GREETING = (
    b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, '
    b'"package": "kvmflow-fleet"}, "capabilities": []}}\r\n'
)
FAKE_PID_BASE = 50_000_000
TICK = 0.1  # simulation step; coarser steps keep the fleet process off the engine's core


class FakeCommandError(Exception):
    """A command the simulated QEMU refuses; the client gets a QMP error reply."""


@dataclass
class FakeQemu:
    """One simulated QEMU: its run state and, while it migrates, the migration."""

    pid: int
    name: str
    argv: list[str]
    qmp_path: str
    memory_bytes: int
    dirty_rate: float  # bytes/s the simulated guest dirties
    status: str = "running"
    incoming_port: int | None = None
    events: bool = False
    params: dict[str, int] = field(
        default_factory=lambda: {"max-bandwidth": 128 << 20, "downtime-limit": 300}
    )
    migration: dict[str, Any] = field(default_factory=dict)
    completed_at: float | None = None
    clients: list[anyio.abc.SocketStream] = field(default_factory=list)
    alive: bool = True
    listener: anyio.abc.SocketListener | None = None
    spare_paths: list[str] = field(default_factory=list)
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    sim: dict[str, float] | None = None  # the running migration's numbers


class Fleet:
    """The fleet process's state: every fake QEMU, by pid and by incoming port."""

    def __init__(self, task_group: anyio.abc.TaskGroup) -> None:
        self.task_group = task_group
        self.qemus: dict[int, FakeQemu] = {}
        self.by_port: dict[int, FakeQemu] = {}
        self.pids = itertools.count(FAKE_PID_BASE)
        self.free_ports = itertools.count(40000)
        self.node_files: dict[str, NodeFiles] = {}  # of the nodes whose files live here

    # ------------------------------------------------------------------ control

    async def control(self, request: dict[str, Any]) -> Any:
        op = request["op"]
        if op == "spawn":
            pid = await self.spawn(request["argv"], request.get("dirty_rate", 0.0))
            node = request.get("files_of")  # its pid file, written as QEMU writes its own
            if node is not None:
                argv = request["argv"]
                files = self.node_files.setdefault(node, NodeFiles())
                await files.write(argv[argv.index("-pidfile") + 1], f"{pid}\n".encode())
            return pid
        if op == "cmdline":
            qemu = self.qemus.get(request["pid"])
            return qemu.argv if qemu is not None and qemu.alive else None
        if op == "find":
            argument = request["argument"]
            return [q.pid for q in self.qemus.values() if q.alive and argument in q.argv]
        if op == "kill":
            qemu = self.qemus.get(request["pid"])
            if qemu is None or not qemu.alive:
                return False
            await self.exit(qemu)
            return True
        if op == "files":
            return await fleet_files_op(self.node_files, request)
        if op == "completed_at":
            return {
                q.name + "@" + str(q.pid): q.completed_at
                for q in self.qemus.values()
                if q.completed_at is not None
            }
        raise ValueError(f"unknown op {op}")

    async def spawn(self, argv: list[str], dirty_rate: float) -> int:
        def value(flag: str) -> str:
            return argv[argv.index(flag) + 1]

        sockets = [
            argv[i + 1].removeprefix("unix:").split(",")[0]
            for i, a in enumerate(argv)
            if a == "-qmp"
        ]
        qmp = sockets[0]
        memory = int(value("-m")) << 20
        pid = next(self.pids)
        qemu = FakeQemu(pid, value("-name"), argv, qmp, memory, dirty_rate)
        if "-incoming" in argv:
            qemu.status = "inmigrate"
        await anyio.Path(qmp).unlink(missing_ok=True)
        qemu.listener = await anyio.create_unix_listener(qmp)
        for spare in sockets[1:]:  # the spare monitor: a link to the same (no descriptor)
            await anyio.Path(spare).unlink(missing_ok=True)
            await anyio.Path(spare).symlink_to(qmp)
        qemu.spare_paths = sockets[1:]
        self.qemus[pid] = qemu
        self.task_group.start_soon(self.serve, qemu)
        return pid

    async def exit(self, qemu: FakeQemu) -> None:
        """The simulated QEMU ends: its monitor and its clients go with it."""
        qemu.alive = False
        if qemu.incoming_port is not None:
            self.by_port.pop(qemu.incoming_port, None)
        qemu.scope.cancel()  # stops accepting and ends every client handler

    # ------------------------------------------------------------------ monitors

    async def serve(self, qemu: FakeQemu) -> None:
        listener = qemu.listener
        assert listener is not None
        try:
            with qemu.scope:
                await listener.serve(lambda client: self.client(qemu, client))
        finally:
            with anyio.CancelScope(shield=True):
                for client in list(qemu.clients):
                    await anyio.aclose_forcefully(client)
                await listener.aclose()
            for path in (qemu.qmp_path, *qemu.spare_paths):
                await anyio.Path(path).unlink(missing_ok=True)

    async def client(self, qemu: FakeQemu, stream: anyio.abc.SocketStream) -> None:
        qemu.clients.append(stream)
        try:
            await stream.send(GREETING)
            buffer = b""
            while qemu.alive:
                buffer += await stream.receive()
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if line.strip():
                        request = json.loads(line)
                        try:
                            answer = {
                                "return": await self.command(
                                    qemu, request["execute"], request.get("arguments") or {}
                                )
                            }
                        except FakeCommandError as exc:
                            answer = {"error": {"class": "GenericError", "desc": str(exc)}}
                        answer["id"] = request.get("id")
                        await stream.send(json.dumps(answer).encode() + b"\r\n")
                        if request["execute"] == "quit":
                            await self.exit(qemu)
                            return
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass
        finally:
            if stream in qemu.clients:
                qemu.clients.remove(stream)

    async def event(self, qemu: FakeQemu, name: str, data: dict[str, Any]) -> None:
        if not qemu.events:
            return
        now = time.time()
        line = (
            json.dumps(
                {
                    "event": name,
                    "data": data,
                    "timestamp": {"seconds": int(now), "microseconds": int(now % 1 * 1e6)},
                }
            ).encode()
            + b"\r\n"
        )
        for client in list(qemu.clients):
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                await client.send(line)

    async def command(self, qemu: FakeQemu, command: str, args: dict[str, Any]) -> Any:
        if command == "query-status":
            return {"status": qemu.status, "running": qemu.status == "running"}
        if command == "migrate-set-capabilities":
            for cap in args.get("capabilities", []):
                if cap["capability"] == "events":
                    qemu.events = bool(cap["state"])
            return {}
        if command == "migrate-set-parameters":
            qemu.params.update(args)
            return {}
        if command == "query-migrate-parameters":
            return dict(qemu.params)
        if command == "migrate-incoming":
            port = int(args["uri"].rsplit(":", 1)[1])
            if port in self.by_port:
                raise FakeCommandError("Failed to find an available port: Address already in use")
            qemu.incoming_port = port or next(self.free_ports)  # 0: pick one, as QEMU does
            self.by_port[qemu.incoming_port] = qemu
            return {}
        if command == "query-migrate":
            if qemu.sim is not None:
                return active_answer(qemu, qemu.sim)
            if qemu.incoming_port is not None and not qemu.migration:
                return {
                    "socket-address": [
                        {"type": "inet", "host": "127.0.0.1", "port": str(qemu.incoming_port)}
                    ]
                }
            return dict(qemu.migration)
        if command == "migrate":
            # The target stops listening once the stream is accepted, as QEMU does.
            target = self.by_port.pop(int(args["uri"].rsplit(":", 1)[1]), None)
            qemu.migration = {"status": "setup"}
            self.task_group.start_soon(self.simulate, qemu, target)
            return {}
        if command == "migrate_cancel":
            if qemu.migration.get("status") in ("setup", "active"):
                qemu.migration["status"] = "cancelling"
            return {}
        if command in ("stop", "cont"):
            if qemu.status in ("running", "paused", "postmigrate"):
                qemu.status = "paused" if command == "stop" else "running"
            return {}
        if command in ("quit", "system_powerdown"):
            return {}
        return {}

    async def simulate(self, source: FakeQemu, target: FakeQemu | None) -> None:
        """Move RAM at ``max-bandwidth`` while the guest dirties it; switch over once the
        rest fits in ``downtime-limit``; honour a cancel."""
        started = time.monotonic()
        total = source.memory_bytes
        await self.event(source, "MIGRATION", {"status": "setup"})
        if target is None or not target.alive:
            source.migration = {"status": "failed", "error-desc": "connection refused"}
            await self.event(source, "MIGRATION", {"status": "failed"})
            return
        source.migration = {"status": "active"}
        await self.event(source, "MIGRATION", {"status": "active"})
        sim = source.sim = {
            "started": started,
            "transferred": 0.0,
            "remaining": float(total),
            "passes": 1.0,
            "bandwidth": 0.0,
        }
        while True:
            await anyio.sleep(TICK)
            if source.migration.get("status") == "cancelling" or not target.alive:
                source.sim = None
                source.migration = {"status": "cancelled"}
                await self.event(source, "MIGRATION", {"status": "cancelled"})
                if target.alive:
                    await self.exit(target)  # a target whose stream ends exits
                return
            # Only numbers per tick; query-migrate builds its answer when asked.
            bandwidth = sim["bandwidth"] = source.params.get("max-bandwidth", 128 << 20)
            sent = bandwidth * TICK
            sim["transferred"] += sent
            dirty = source.dirty_rate * TICK if source.status == "running" else 0.0
            sim["remaining"] = min(float(total), max(0.0, sim["remaining"] - sent) + dirty)
            sim["passes"] += 1
            if sim["remaining"] <= bandwidth * source.params.get("downtime-limit", 300) / 1000:
                break
        source.sim = None
        transferred = sim["transferred"]
        elapsed_ms = int((time.monotonic() - started) * 1000)
        was_running = source.status == "running"
        source.status = "postmigrate"
        target.status = "running" if was_running else "paused"
        source.completed_at = time.time()
        source.migration = {
            "status": "completed",
            "total-time": elapsed_ms,
            "downtime": 5,
            "ram": {
                "transferred": int(transferred),
                "remaining": 0,
                "total": total,
                "mbps": bandwidth * 8 / 1e6,
            },
        }
        await self.event(source, "MIGRATION", {"status": "completed"})


def active_answer(qemu: FakeQemu, sim: dict[str, float]) -> dict[str, Any]:
    """A ``query-migrate`` answer for a migration in progress."""
    bandwidth = sim["bandwidth"] or qemu.params.get("max-bandwidth", 128 << 20)
    remaining = sim["remaining"]
    return {
        "status": "active",
        "total-time": int((time.monotonic() - sim["started"]) * 1000),
        "expected-downtime": int(remaining / max(bandwidth, 1) * 1000),
        "ram": {
            "transferred": int(sim["transferred"]),
            "remaining": int(remaining),
            "total": qemu.memory_bytes,
            "mbps": bandwidth * 8 / 1e6,
            "dirty-pages-rate": int(qemu.dirty_rate / 4096),
            "page-size": 4096,
            "dirty-sync-count": int(sim["passes"]) // 20 + 1,
        },
    }


async def serve_fleet(control_path: str) -> None:
    """Run the fleet process: a control socket for :class:`FakeNode` clients."""
    async with anyio.create_task_group() as tg:
        fleet = Fleet(tg)

        async def handle(stream: anyio.abc.SocketStream) -> None:
            buffer = b""
            async with stream:
                try:
                    while True:
                        buffer += await stream.receive()
                        *lines, buffer = buffer.split(b"\n")
                        for line in lines:
                            request = json.loads(line)
                            try:
                                reply = {"ok": await fleet.control(request)}
                            except Exception as exc:  # reported to the caller, not fatal
                                reply = {"error": repr(exc)}
                            await stream.send(json.dumps(reply).encode() + b"\n")
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    return

        await anyio.Path(control_path).unlink(missing_ok=True)
        listener = await anyio.create_unix_listener(control_path)
        await listener.serve(handle)


class FakeNode(NodeLifecycle):
    """A node whose QEMUs are simulated by a fleet process (see the module docstring)."""

    def __init__(
        self, name: str, control_path: str, *, dirty_rate: float = 0.0, shared_files: bool = False
    ) -> None:
        self._name = name
        self.control_path = control_path
        self.dirty_rate = dirty_rate
        #: Its files: in this object, or (``shared_files``) in the fleet process, where
        #: every controller process sees them.
        self.files: NodeFiles | FleetFiles = (
            FleetFiles(name, self._call) if shared_files else NodeFiles()
        )
        self._idle: list[anyio.abc.SocketStream] = []  # control connections not in use

    @property
    def name(self) -> str:
        return self._name

    async def _call(self, **request: Any) -> Any:
        # A connection per concurrent call (kept for reuse), as an SSH node opens a channel
        # per command: the calls of many migrations on one node do not queue behind one
        # socket.
        stream = self._idle.pop() if self._idle else await anyio.connect_unix(self.control_path)
        try:
            await stream.send(json.dumps(request).encode() + b"\n")
            buffer = b""
            while not buffer.endswith(b"\n"):
                buffer += await stream.receive()
        except BaseException:
            await anyio.aclose_forcefully(stream)
            raise
        self._idle.append(stream)
        reply = json.loads(buffer)
        if "error" in reply:
            raise NodeError(f"fleet: {reply['error']}", node=self._name)
        return reply["ok"]

    async def aclose(self) -> None:
        """Close the control connections."""
        while self._idle:
            await self._idle.pop().aclose()

    async def run(
        self, argv: list[str], *, stdin: bytes | None = None, timeout: float | None = None
    ) -> CommandResult:
        if not argv[0].startswith("qemu-system"):
            return CommandResult(tuple(argv), 0, b"", b"")
        probed = probe_answer(argv)
        if probed is not None:
            return probed
        if isinstance(self.files, FleetFiles):  # the fleet writes the pid file with the QEMU
            await self._call(op="spawn", argv=argv, dirty_rate=self.dirty_rate, files_of=self.name)
        else:
            pid = await self._call(op="spawn", argv=argv, dirty_rate=self.dirty_rate)
            await self.files.write(argv[argv.index("-pidfile") + 1], f"{pid}\n".encode())
        return CommandResult(tuple(argv), 0, b"", b"")

    async def read_file(self, path: str) -> bytes | None:
        return await self.files.read(path)

    async def write_file(self, path: str, data: bytes, mode: int = 0o600) -> None:
        await self.files.write(path, data)

    async def create_exclusive(self, path: str, data: bytes, mode: int = 0o600) -> bool:
        return await self.files.create(path, data)

    async def remove(self, path: str) -> bool:
        await before_change(f"remove {path} on {self.name}")
        return await self.files.remove(path)

    async def make_dirs(self, path: str, mode: int = 0o700) -> None:
        os.makedirs(path, exist_ok=True)  # sockets of the fleet live here

    async def path_kind(self, path: str) -> str | None:
        """The fake's files are in memory; paths outside them are this machine's."""
        return await self.files.kind(path) or await LocalNode(self.name).path_kind(path)

    async def user_exists(self, name: str) -> bool:
        return await LocalNode(self.name).user_exists(name)

    async def list_dir(self, path: str) -> list[str]:
        return await self.files.list(path)

    async def rename(self, source: str, target: str) -> None:
        await self.files.rename(source, target)

    async def remove_tree(self, path: str) -> None:
        await before_change(f"remove {path} on {self.name}")
        await self.files.remove_tree(path)

    async def process_cmdline(self, pid: int) -> list[str] | None:
        result = await self._call(op="cmdline", pid=pid)
        return list(result) if result is not None else None

    async def find_processes(self, argument: str) -> list[int]:
        return [int(pid) for pid in await self._call(op="find", argument=argument)]

    async def signal_process(self, pid: int, sig: signal.Signals) -> bool:
        await before_change(f"signal {sig.name} to pid {pid} on {self.name}")
        return bool(await self._call(op="kill", pid=pid))

    async def node_info(self) -> NodeInfo:
        return NodeInfo(1 << 20, 1 << 19, 1024, 64, 2, 2)

    def monitor_connector(self, path: str) -> Connector:
        return UnixSocketConnector(path)


@contextlib.contextmanager
def fleet_process(control_path: str, *, timeout: float = 10.0) -> Iterator[subprocess.Popen[bytes]]:
    """Run a fleet process serving ``control_path``; killed on exit. Ready once it accepts
    a connection: the socket file appears at bind(), before listen(), and a connect in
    between is refused (seen on a loaded machine)."""
    process = subprocess.Popen([sys.executable, "-m", "kvmflow.testing.fleet", control_path])
    try:
        deadline = time.monotonic() + timeout
        while not _accepts(control_path):
            if process.poll() is not None:
                raise RuntimeError(f"the fleet process exited with {process.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the fleet process did not listen within {timeout:g} s")
            time.sleep(0.02)
        yield process
    finally:
        process.kill()
        process.wait()


def _accepts(path: str) -> bool:
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description="serve a fake QEMU fleet")
    parser.add_argument("control", help="unix socket path for FakeNode clients")
    args = parser.parse_args()
    anyio.run(serve_fleet, args.control)


if __name__ == "__main__":
    main()
