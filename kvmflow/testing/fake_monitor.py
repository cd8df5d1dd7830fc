"""A scriptable fake QMP server, for what a real QEMU will not do on cue.

Real QEMU is the reference; this fake exists to misbehave on purpose (answer garbage, hang,
flood events, close mid-answer) so that clients and controllers can be tested against every
bad answer. It listens on a unix socket in the current event loop::

    async with FakeQMPServer(tmp_path / "qmp.sock") as fake:
        fake.script("query-migrate", RawLine(b"garbage"), Return({"status": "active"}))
        async with QMPClient(fake.path) as qmp:
            ...

Scripted answers for a command are used in order; once they run out, ``default`` decides
(by default: ``qmp_capabilities`` and ``query-status`` succeed, anything else is
``CommandNotFound``).
"""

from __future__ import annotations

import json
import os
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio
import anyio.abc

from kvmflow._taskgroups import exit_task_group

DEFAULT_GREETING = (
    b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, '
    b'"package": "kvmflow-fake"}, "capabilities": ["oob"]}}\r\n'
)


@dataclass(frozen=True)
class Return:
    """Answer ``{"return": value}`` with the command's id."""

    value: Any = field(default_factory=dict)


@dataclass(frozen=True)
class Error:
    """Answer with an error reply."""

    error_class: str = "GenericError"
    description: str = "scripted failure"


@dataclass(frozen=True)
class RawLine:
    """Write these bytes instead of an answer (a CRLF is added unless ``newline`` is off)."""

    data: bytes
    newline: bool = True


@dataclass(frozen=True)
class Hang:
    """Never answer this command."""


@dataclass(frozen=True)
class Close:
    """Close the connection instead of answering (after writing ``before``, if any)."""

    before: bytes = b""


@dataclass(frozen=True)
class Emit:
    """Send events first, then the ``then`` answer."""

    events: Sequence[dict[str, Any]]
    then: Answer = field(default_factory=Return)


Answer = Return | Error | RawLine | Hang | Close | Emit


@dataclass(frozen=True)
class ReceivedCommand:
    """A command the fake received."""

    command: str
    arguments: dict[str, Any]
    id: Any


def default_answer(command: ReceivedCommand) -> Answer:
    """What an unscripted command gets."""
    if command.command in (
        "qmp_capabilities",
        "cont",
        "stop",
        "migrate-set-parameters",
        "migrate-set-capabilities",
    ):
        return Return({})
    if command.command == "query-status":
        return Return({"status": "running", "singlestep": False, "running": True})
    if command.command == "quit":
        return Close(b'{"return": {}, "id": ' + json.dumps(command.id).encode() + b"}\r\n")
    return Error("CommandNotFound", f"The command {command.command} has not been found")


def event_line(name: str, data: dict[str, Any] | None = None) -> bytes:
    """One QMP event line as QEMU writes it."""
    body: dict[str, Any] = {
        "timestamp": {"seconds": 1700000000, "microseconds": 0},
        "event": name,
    }
    if data is not None:
        body["data"] = data
    return json.dumps(body).encode() + b"\r\n"


class FakeQMPServer:
    """A misbehaving-on-demand QMP server on a unix socket.

    ``greeting``: bytes sent on connect (``None``: stay silent); ``close_on_connect``: close
    right after accepting (EOF before greeting).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        greeting: bytes | None = DEFAULT_GREETING,
        close_on_connect: bool = False,
        default: Callable[[ReceivedCommand], Answer] = default_answer,
    ) -> None:
        self.path = Path(path)
        self.greeting = greeting
        self.close_on_connect = close_on_connect
        self.default = default
        self.received: list[ReceivedCommand] = []
        self.connections = 0
        self._scripts: dict[str, deque[Answer]] = {}
        # Each client's writes are serialised: answers and pushed events may overlap.
        self._clients: dict[anyio.abc.SocketStream, anyio.Lock] = {}
        self._task_group: anyio.abc.TaskGroup | None = None
        self._listener: anyio.abc.SocketListener | None = None

    def script(self, command: str, *answers: Answer) -> None:
        """Queue answers for the next calls of ``command``."""
        self._scripts.setdefault(command, deque()).extend(answers)

    def commands(self, name: str) -> list[ReceivedCommand]:
        """The received calls of one command."""
        return [c for c in self.received if c.command == name]

    async def send(self, data: bytes) -> None:
        """Write raw bytes (for example events) to every connected client."""
        for client in list(self._clients):
            try:
                await self._write(client, data)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self._clients.pop(client, None)

    async def _write(self, client: anyio.abc.SocketStream, data: bytes) -> None:
        lock = self._clients.get(client)
        if lock is None:
            raise anyio.ClosedResourceError
        async with lock:
            await client.send(data)

    async def send_event(self, name: str, data: dict[str, Any] | None = None) -> None:
        """Send one event to every connected client."""
        await self.send(event_line(name, data))

    async def flood(self, count: int, name: str = "FLOOD", chunk: int = 1000) -> None:
        """Send ``count`` events as fast as the socket takes them."""
        line = event_line(name, {"n": 0})
        for start in range(0, count, chunk):
            await self.send(line * min(chunk, count - start))

    async def disconnect_all(self) -> None:
        """Close every client connection (a monitor that went away)."""
        for client in list(self._clients):
            await anyio.aclose_forcefully(client)
        self._clients.clear()

    async def __aenter__(self) -> FakeQMPServer:
        self.path.unlink(missing_ok=True)
        self._listener = await anyio.create_unix_listener(self.path)
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        self._task_group.start_soon(self._listener.serve, self._serve_client)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._task_group is not None
        assert self._listener is not None
        self._task_group.cancel_scope.cancel()
        try:
            with anyio.CancelScope(shield=True):
                await self.disconnect_all()
        finally:
            try:
                result = await exit_task_group(self._task_group, exc_type, exc, tb)
            finally:
                # Only now: closing a listener that a task still accepts on is an error.
                with anyio.CancelScope(shield=True):
                    await self._listener.aclose()
                self.path.unlink(missing_ok=True)
        return result

    async def _serve_client(self, client: anyio.abc.SocketStream) -> None:
        self.connections += 1
        async with client:
            if self.close_on_connect:
                return
            self._clients[client] = anyio.Lock()
            try:
                greeting = self.greeting
                if greeting is None:
                    await anyio.sleep_forever()
                    return
                await self._write(client, greeting)
                buffer = b""
                while True:
                    buffer += await client.receive()
                    *lines, buffer = buffer.split(b"\n")
                    for line in lines:
                        if line.strip() and not await self._answer(client, line):
                            return
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                return
            finally:
                self._clients.pop(client, None)

    async def _answer(self, client: anyio.abc.SocketStream, line: bytes) -> bool:
        """Answer one command line; return False once the connection should close."""
        try:
            request = json.loads(line)
            command = ReceivedCommand(
                request["execute"], request.get("arguments", {}), request.get("id")
            )
        except (ValueError, KeyError, TypeError):
            await self._write(
                client, b'{"error": {"class": "GenericError", "desc": "JSON parse error"}}\r\n'
            )
            return True
        self.received.append(command)
        queue = self._scripts.get(command.command)
        answer = queue.popleft() if queue else self.default(command)
        return await self._perform(client, command, answer)

    async def _perform(
        self, client: anyio.abc.SocketStream, command: ReceivedCommand, answer: Answer
    ) -> bool:
        if isinstance(answer, Emit):
            for event in answer.events:
                await self._write(client, event_line(event["event"], event.get("data")))
            return await self._perform(client, command, answer.then)
        if isinstance(answer, Return):
            await self._write(client, _reply({"return": answer.value, "id": command.id}))
        elif isinstance(answer, Error):
            body = {"class": answer.error_class, "desc": answer.description}
            await self._write(client, _reply({"error": body, "id": command.id}))
        elif isinstance(answer, RawLine):
            await self._write(client, answer.data + (b"\r\n" if answer.newline else b""))
        elif isinstance(answer, Close):
            if answer.before:
                await self._write(client, answer.before)
            return False
        return True


def _reply(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode() + b"\r\n"
