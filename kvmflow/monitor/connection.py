"""One open monitor connection: its byte stream, protocol state and reader.

Each event-loop pass a round trip spends matters (figures in the README). When the stream
is a real socket, commands are written straight to it; on asyncio the socket stays
registered with the loop and every readable wake-up is decoded right in the loop's callback
(as an asyncio protocol would), so a reply reaches its caller in one pass. Elsewhere (trio,
SSH channels) a reader task awaits the stream.
"""

from __future__ import annotations

import enum
import socket
from collections.abc import Callable
from typing import Final

import anyio
import anyio.abc

from kvmflow._fastpath import running_asyncio_loop
from kvmflow.monitor.protocol import Message, QMPProtocol

READ_SIZE: Final = 65536

Dispatch = Callable[[Message], None]


class ConnectionState(enum.Enum):
    """Life of one monitor connection (separate from QEMU's run state)."""

    IDLE = "idle"
    CONNECTING = "connecting"
    READY = "ready"
    LOST = "lost"
    CLOSED = "closed"


class MonitorConnection:
    """One open byte stream with its protocol state and the scope of its reader."""

    __slots__ = ("loop", "protocol", "reader_scope", "registered_fd", "sock", "stream")

    def __init__(self, stream: anyio.abc.ByteStream, protocol: QMPProtocol) -> None:
        self.stream = stream
        self.protocol = protocol
        self.sock: socket.socket | None = stream.extra(anyio.abc.SocketAttribute.raw_socket, None)
        # Shielded: a caller's cancel scope around ``async with QMPClient`` must not stop
        # the reader, or the shielded cleanup that follows a cancellation (migrate_cancel,
        # cont) would find the connection dead. Only the client itself cancels this scope.
        self.reader_scope = anyio.CancelScope(shield=True)
        self.loop = running_asyncio_loop() if self.sock is not None else None
        self.registered_fd: int | None = None

    async def receive(self) -> bytes:
        """Next chunk of bytes; ``b""`` at end of stream."""
        sock = self.sock
        if sock is None:
            try:
                return await self.stream.receive(READ_SIZE)
            except anyio.EndOfStream:
                return b""
        while True:
            try:
                return sock.recv(READ_SIZE)
            except BlockingIOError:
                await anyio.wait_readable(sock)
            except InterruptedError:
                continue

    def stop_reading(self) -> None:
        """Unregister the socket from the loop now, before it can be closed and reused."""
        fd, self.registered_fd = self.registered_fd, None
        if fd is not None and self.loop is not None:
            self.loop.remove_reader(fd)

    async def read(self, dispatch: Dispatch, on_bug: Callable[[], None]) -> str:
        """Hand every message to ``dispatch`` until the connection ends; return why it
        ended. ``on_bug`` logs a failure of ``dispatch`` (which then ends the reading)."""
        if self.loop is not None:
            return await self._read_in_loop_callback(dispatch, on_bug)
        return await self._read_in_task(dispatch)

    async def _read_in_task(self, dispatch: Dispatch) -> str:
        protocol = self.protocol
        while True:
            try:
                data = await self.receive()
            except anyio.ClosedResourceError:
                return "the client closed the connection"
            except (anyio.BrokenResourceError, OSError) as exc:
                return f"the connection broke: {exc or type(exc).__name__}"
            if not data:
                return eof_reason(protocol)
            for message in protocol.feed(data):
                dispatch(message)

    async def _read_in_loop_callback(self, dispatch: Dispatch, on_bug: Callable[[], None]) -> str:
        sock, loop, protocol = self.sock, self.loop, self.protocol
        assert sock is not None
        assert loop is not None
        finished = anyio.Event()
        outcome: list[str] = []

        def finish(reason: str) -> None:
            self.stop_reading()
            outcome.append(reason)
            finished.set()

        def on_readable() -> None:
            try:
                data = sock.recv(READ_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                finish(f"the connection broke: {exc}")
                return
            if not data:
                finish(eof_reason(protocol))
                return
            try:
                for message in protocol.feed(data):
                    dispatch(message)
            except Exception as exc:  # same guarantee as the task reader
                on_bug()
                finish(f"the reader failed: {exc!r}")

        self.registered_fd = sock.fileno()
        loop.add_reader(self.registered_fd, on_readable)
        await finished.wait()
        return outcome[0]


def eof_reason(protocol: QMPProtocol) -> str:
    """Why a connection that reached end of stream ended (with a partial answer, if any)."""
    leftover = protocol.feed_eof()
    reason = "the monitor closed the connection"
    if leftover:
        reason += f" in the middle of an answer: {leftover[:200]!r}"
    return reason
