"""Async QMP client: one persistent connection per monitor, shared by any number of callers.

A QEMU monitor socket serves one client at a time, so kvmflow keeps one connection per
monitor and multiplexes every caller over it: commands are written back to back and matched
to their replies by id (QEMU answers in order). A reader task, owned by the client's task
group, routes replies to callers and events to bounded subscriptions.

Use it as ``async with QMPClient(path) as qmp:``.
"""

from __future__ import annotations

import asyncio
import enum
import heapq
import math
import socket
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import Any, Final

import anyio
import anyio.abc
import structlog

from kvmflow._taskgroups import exit_task_group
from kvmflow.errors import (
    CommandError,
    ConnectionLostError,
    DeadlineError,
    MalformedReplyError,
    MisuseError,
)
from kvmflow.monitor.events import EventSubscription
from kvmflow.monitor.protocol import (
    DEFAULT_MAX_LINE_BYTES,
    ErrorReply,
    Event,
    Garbage,
    Greeting,
    Message,
    Phase,
    QMPProtocol,
    Reply,
)
from kvmflow.monitor.transport import MonitorAddress, as_connector

_READ_SIZE: Final = 65536
#: Events kept from before the negotiation finished (the oldest go first beyond that).
MAX_EARLY_EVENTS: Final = 1000


class ConnectionState(enum.Enum):
    """Life of one monitor connection (separate from QEMU's run state)."""

    IDLE = "idle"
    CONNECTING = "connecting"
    READY = "ready"
    LOST = "lost"
    CLOSED = "closed"


class _Call:
    """One command in flight: what was sent and, once answered, its outcome.

    On asyncio the caller waits on a bare loop future (the cheapest wake-up there is; a busy
    controller makes thousands of calls a second); elsewhere on the backend's Event.
    """

    __slots__ = ("_event", "_future", "arguments", "command", "completed", "error", "value")

    def __init__(
        self,
        command: str,
        arguments: dict[str, Any] | None,
        loop: asyncio.AbstractEventLoop | None,
        event_class: type[anyio.Event],
    ) -> None:
        self.command = command
        self.arguments = arguments
        self.completed = False
        self.value: Any = None
        self.error: Exception | None = None
        self._future = loop.create_future() if loop is not None else None
        self._event = event_class() if loop is None else None

    def succeed(self, value: Any) -> None:
        self.value = value
        self._complete()

    def fail(self, error: Exception) -> None:
        self.error = error
        self._complete()

    def _complete(self) -> None:
        self.completed = True
        future = self._future
        if future is not None:
            if not future.done():  # a caller that gave up cancelled it
                future.set_result(None)
        else:
            assert self._event is not None
            self._event.set()

    async def wait(self) -> None:
        if self._future is not None:
            await self._future
        else:
            assert self._event is not None
            await self._event.wait()


class _Connection:
    """One open byte stream with its protocol state and the scope of its reader task.

    QEMU answers in about 175 us, so each event-loop pass a round trip spends matters. When
    the stream is a real socket, commands are written straight to it; on asyncio the socket
    stays registered with the loop and every readable wake-up is decoded right in the
    loop's callback (as an asyncio protocol would), so a reply reaches its caller in one
    pass. Elsewhere (trio, SSH channels) a reader task awaits the stream.
    """

    __slots__ = ("loop", "protocol", "reader_scope", "registered_fd", "sock", "stream")

    def __init__(self, stream: anyio.abc.ByteStream, protocol: QMPProtocol) -> None:
        self.stream = stream
        self.protocol = protocol
        self.sock: socket.socket | None = stream.extra(anyio.abc.SocketAttribute.raw_socket, None)
        # Shielded: a caller's cancel scope around ``async with QMPClient`` must not stop
        # the reader, or the shielded cleanup that follows a cancellation (migrate_cancel,
        # cont) would find the connection dead. Only the client itself cancels this scope.
        self.reader_scope = anyio.CancelScope(shield=True)
        self.loop = _running_asyncio_loop() if self.sock is not None else None
        self.registered_fd: int | None = None

    async def receive(self) -> bytes:
        """Next chunk of bytes; ``b""`` at end of stream."""
        sock = self.sock
        if sock is None:
            try:
                return await self.stream.receive(_READ_SIZE)
            except anyio.EndOfStream:
                return b""
        while True:
            try:
                return sock.recv(_READ_SIZE)
            except BlockingIOError:
                await anyio.wait_readable(sock)
            except InterruptedError:
                continue

    def stop_reading(self) -> None:
        """Unregister the socket from the loop now, before it can be closed and reused."""
        fd, self.registered_fd = self.registered_fd, None
        if fd is not None and self.loop is not None:
            self.loop.remove_reader(fd)


def _running_asyncio_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class QMPClient:
    """An async QMP connection to one QEMU monitor.

    ``address`` is a unix socket path or a :class:`~kvmflow.monitor.transport.Connector`.
    ``connect_timeout`` bounds connecting, the greeting and negotiation together (a monitor
    held by another client accepts the connection but never greets). ``command_timeout`` is
    the default deadline of each command (``None``: wait as long as the caller's own cancel
    scopes allow). ``send_timeout`` bounds writing one command when QEMU stops reading.
    """

    def __init__(
        self,
        address: MonitorAddress,
        *,
        connect_timeout: float = 5.0,
        command_timeout: float | None = None,
        send_timeout: float = 10.0,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    ) -> None:
        self._connector = as_connector(address)
        self.name = self._connector.description
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.send_timeout = send_timeout
        self.max_line_bytes = max_line_bytes
        self.state = ConnectionState.IDLE
        self.greeting: Greeting | None = None
        self._log = structlog.get_logger("kvmflow.monitor").bind(monitor=self.name)
        self._connection: _Connection | None = None
        # Commands in flight by id, oldest first; ``None`` marks one whose caller gave up,
        # so that its late reply is recognised and dropped.
        self._pending: dict[int, _Call | None] = {}
        self._quit_ids: set[int] = set()
        self._subscriptions: list[EventSubscription] = []
        self._task_group: anyio.abc.TaskGroup | None = None
        self._send_lock: anyio.Lock | None = None
        self._lost_reason = "not connected"
        self._deadlines: list[tuple[float, int, _Call, float]] = []
        self._deadline_wakeup: anyio.Event | None = None
        self._watcher_target = math.inf  # when the deadline watcher wakes up next
        self._event_class: type[anyio.Event] = anyio.Event
        self._loop: asyncio.AbstractEventLoop | None = None
        self._clock: Callable[[], float] = anyio.current_time

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> QMPClient:
        if self._task_group is not None:
            raise MisuseError(f"QMP client for {self.name} is already open")
        self._send_lock = anyio.Lock()
        # The backend's own Event class and clock, looked up once: on a busy controller
        # the per-command backend lookup is measurable.
        self._event_class = type(anyio.Event())
        loop = _running_asyncio_loop()
        self._loop = loop
        self._clock = loop.time if loop is not None else anyio.current_time
        task_group = anyio.create_task_group()
        await task_group.__aenter__()
        self._task_group = task_group
        task_group.start_soon(self._watch_deadlines, name=f"qmp-deadlines {self.name}")
        try:
            await self._open()
        except BaseException:
            task_group.cancel_scope.cancel()
            await task_group.__aexit__(None, None, None)
            self._task_group = None
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        task_group, self._task_group = self._task_group, None
        assert task_group is not None
        try:
            with anyio.CancelScope(shield=True):  # closing a socket is quick; never skip it
                await self.aclose()  # ends the reader
        finally:
            task_group.cancel_scope.cancel()  # ends the deadline watcher
            result = await exit_task_group(task_group, exc_type, exc, tb)
        return result

    async def aclose(self) -> None:
        """Close the connection; pending commands fail, subscriptions end."""
        connection = self._connection
        self.state = ConnectionState.CLOSED
        if connection is not None:
            self._connection_lost(connection, "the client closed the connection")
            await anyio.aclose_forcefully(connection.stream)
        for subscription in list(self._subscriptions):
            subscription.close()

    async def reconnect(self) -> None:
        """Drop the current connection (failing its pending commands) and open a new one."""
        if self._task_group is None or self.state is ConnectionState.CLOSED:
            raise MisuseError(f"QMP client for {self.name} is not open")
        connection = self._connection
        if connection is not None:
            self._connection_lost(connection, "the client is reconnecting")
            await anyio.aclose_forcefully(connection.stream)
        await self._open()

    async def _open(self) -> None:
        self.state = ConnectionState.CONNECTING
        protocol = QMPProtocol(max_line_bytes=self.max_line_bytes)
        try:
            with anyio.fail_after(self.connect_timeout):
                stream = await self._connector.connect()
                try:
                    early_events = await self._handshake(stream, protocol)
                except BaseException:
                    await anyio.aclose_forcefully(stream)
                    raise
        except TimeoutError as exc:
            self.state = ConnectionState.LOST
            raise DeadlineError(
                "connecting and receiving the QMP greeting"
                " (is another client holding the monitor?)",
                self.connect_timeout,
                where=self.name,
            ) from exc
        except BaseException:
            self.state = ConnectionState.LOST
            raise
        connection = _Connection(stream, protocol)
        self._connection = connection
        self.greeting = protocol.greeting
        self.state = ConnectionState.READY
        assert self._task_group is not None
        self._task_group.start_soon(self._read_loop, connection, name=f"qmp-reader {self.name}")
        for event in early_events:
            self._dispatch(event)
        self._log.debug("qmp connected", qemu=str(self.greeting.version if self.greeting else "?"))

    async def _handshake(self, stream: anyio.abc.ByteStream, protocol: QMPProtocol) -> list[Event]:
        """Read the greeting, negotiate capabilities; return events that came meanwhile
        (at most :data:`MAX_EARLY_EVENTS`, the newest: a monitor flooding events before the
        negotiation must not grow memory)."""
        early_events: deque[Event] = deque(maxlen=MAX_EARLY_EVENTS)
        dropped = 0
        while protocol.phase is not Phase.READY:
            try:
                data = await stream.receive(_READ_SIZE)
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError) as exc:
                stage = "greeting" if protocol.greeting is None else "capabilities negotiation"
                raise ConnectionLostError(
                    f"the monitor closed the connection before the {stage}", monitor=self.name
                ) from exc
            try:
                messages = protocol.feed(data)
            except MalformedReplyError as exc:
                raise MalformedReplyError(exc.reason, exc.raw, monitor=self.name) from None
            except CommandError as exc:
                raise CommandError(
                    exc.command, exc.error_class, exc.description, monitor=self.name
                ) from None
            for message in messages:
                if isinstance(message, Greeting):
                    await stream.send(protocol.start_negotiation())
                elif isinstance(message, Event):
                    dropped += len(early_events) == MAX_EARLY_EVENTS
                    early_events.append(message)
        if dropped:
            self._log.warning("events before the negotiation dropped", dropped=dropped)
        return list(early_events)

    # ------------------------------------------------------------------- commands

    async def execute(
        self,
        command: str,
        arguments: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> Any:
        """Run one QMP command and return its ``return`` value.

        Raises :class:`CommandError` for an error reply, :class:`MalformedReplyError` for an
        answer that is not valid QMP, :class:`ConnectionLostError` when the connection drops
        first, and :class:`DeadlineError` after ``timeout`` (default: ``command_timeout``).
        A cancelled or timed-out command leaves the connection usable: its reply is dropped.
        """
        connection = self._connection
        if connection is None:
            raise ConnectionLostError(
                f"cannot run {command!r}: connection is {self.state.value} ({self._lost_reason})",
                monitor=self.name,
            )
        call_id, line = connection.protocol.encode_command(command, arguments)
        call = _Call(command, arguments, self._loop, self._event_class)
        self._pending[call_id] = call
        if command == "quit":
            self._quit_ids.add(call_id)
        if timeout is None:
            timeout = self.command_timeout
        if timeout is not None:
            self._add_deadline(call_id, call, timeout)
        try:
            await self._send(connection, line)
            await call.wait()
        finally:
            if not call.completed and call_id in self._pending:
                self._pending[call_id] = None
        if call.error is not None:
            raise call.error
        return call.value

    def _add_deadline(self, call_id: int, call: _Call, timeout: float) -> None:
        """Arm a per-command deadline. One watcher task serves all of them from a heap, so
        that a command costs no cancel scope of its own (the common case, an answer well
        before the deadline, then costs one heap push)."""
        deadline = self._clock() + timeout
        heapq.heappush(self._deadlines, (deadline, call_id, call, timeout))
        if deadline < self._watcher_target and self._deadline_wakeup is not None:
            self._watcher_target = deadline
            self._deadline_wakeup.set()

    async def _watch_deadlines(self) -> None:
        heap = self._deadlines
        while True:
            now = anyio.current_time()
            while heap and (heap[0][0] <= now or heap[0][2].completed):
                _, call_id, call, timeout = heapq.heappop(heap)
                if not call.completed:
                    if call_id in self._pending:
                        self._pending[call_id] = None  # its late reply will be dropped
                    call.fail(
                        DeadlineError(f"QMP command {call.command!r}", timeout, where=self.name)
                    )
            self._deadline_wakeup = anyio.Event()
            self._watcher_target = heap[0][0] if heap else math.inf
            with anyio.move_on_after(heap[0][0] - now if heap else None):
                await self._deadline_wakeup.wait()

    async def _send(self, connection: _Connection, line: bytes) -> None:
        lock = self._send_lock
        assert lock is not None
        sock = connection.sock
        if sock is not None and not lock.locked():
            # Fast path: nobody is mid-write, so the whole line usually fits at once.
            try:
                sent = sock.send(line)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                raise self._write_failed(connection, exc) from exc
            if sent == len(line):
                return
            # Part of the line is out: take the lock without a checkpoint, so that nothing
            # can cancel us or write in between, and finish the line below.
            lock.acquire_nowait()
            try:
                await self._send_rest(connection, line[sent:])
            finally:
                lock.release()
            return
        async with lock:
            await self._send_rest(connection, line)

    async def _send_rest(self, connection: _Connection, data: bytes) -> None:
        # A half-written line would corrupt the stream for every caller, so the write is
        # shielded from cancellation and bounded by its own deadline instead.
        with anyio.CancelScope(shield=True) as scope:
            scope.deadline = anyio.current_time() + self.send_timeout
            try:
                await connection.stream.send(data)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                raise self._write_failed(connection, exc) from exc
        if scope.cancelled_caught:
            self._connection_lost(connection, "the monitor stopped reading commands")
            await anyio.aclose_forcefully(connection.stream)
            raise DeadlineError("writing a QMP command", self.send_timeout, where=self.name)

    def _write_failed(self, connection: _Connection, exc: BaseException) -> ConnectionLostError:
        reason = f"cannot write to the monitor: {exc or type(exc).__name__}"
        self._connection_lost(connection, reason)
        return ConnectionLostError(reason, monitor=self.name)

    # --------------------------------------------------------------------- events

    def subscribe(self, *names: str, max_buffered: int = 1000) -> EventSubscription:
        """Receive events named ``names`` (all if none) from now on, at most ``max_buffered``
        held; use as a context manager so that it is removed when done."""
        subscription = EventSubscription(names, max_buffered, self._subscriptions.remove)
        self._subscriptions.append(subscription)
        return subscription

    # --------------------------------------------------------------------- reader

    async def _read_loop(self, connection: _Connection) -> None:
        if self._connection is not connection:
            return  # closed before the reader got its first turn
        reason = "the monitor closed the connection"
        try:
            with connection.reader_scope:
                if connection.loop is not None:
                    reason = await self._read_in_loop_callback(connection)
                else:
                    reason = await self._read_in_task(connection)
        except Exception as exc:  # a bug here must not leave callers waiting forever
            reason = f"the reader failed: {exc!r}"
            self._log.exception("qmp reader failed")
        finally:
            connection.stop_reading()
            self._connection_lost(connection, reason)
            with anyio.CancelScope(shield=True):
                await anyio.aclose_forcefully(connection.stream)

    async def _read_in_task(self, connection: _Connection) -> str:
        protocol = connection.protocol
        while True:
            try:
                data = await connection.receive()
            except anyio.ClosedResourceError:
                return "the client closed the connection"
            except (anyio.BrokenResourceError, OSError) as exc:
                return f"the connection broke: {exc or type(exc).__name__}"
            if not data:
                return _eof_reason(protocol)
            for message in protocol.feed(data):
                self._dispatch(message)

    async def _read_in_loop_callback(self, connection: _Connection) -> str:
        sock, loop, protocol = connection.sock, connection.loop, connection.protocol
        assert sock is not None
        assert loop is not None
        finished = anyio.Event()
        outcome: list[str] = []

        def finish(reason: str) -> None:
            connection.stop_reading()
            outcome.append(reason)
            finished.set()

        def on_readable() -> None:
            try:
                data = sock.recv(_READ_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                finish(f"the connection broke: {exc}")
                return
            if not data:
                finish(_eof_reason(protocol))
                return
            try:
                for message in protocol.feed(data):
                    self._dispatch(message)
            except Exception as exc:  # same guarantee as the task reader
                self._log.exception("qmp reader failed")
                finish(f"the reader failed: {exc!r}")

        connection.registered_fd = sock.fileno()
        loop.add_reader(connection.registered_fd, on_readable)
        await finished.wait()
        return outcome[0]

    def _dispatch(self, message: Message) -> None:
        if isinstance(message, Event):
            for subscription in self._subscriptions:
                subscription.offer(message)
            return
        if isinstance(message, Greeting):
            self._log.warning("unexpected QMP greeting on an open connection")
            return
        pending = self._pending
        message_id = message.id
        if type(message_id) is int and message_id in pending:
            call = pending.pop(message_id)
        elif not pending:
            self._log.warning("monitor answer with no command pending", answer=repr(message))
            return
        elif type(message_id) is int and message_id < next(iter(pending)):
            # Ids only grow and QEMU answers in order: an id below every pending one was
            # answered already. Pinning it on a waiting command would fail that command.
            self._log.warning("late duplicate monitor answer dropped", answer=repr(message))
            return
        else:
            # QEMU answers in order, so an answer that names no known command belongs to
            # the oldest one outstanding.
            oldest = next(iter(pending))
            call = pending.pop(oldest)
            if message_id is not None and call is not None:
                message = Garbage(
                    f"answer carries id {message_id!r}, which no command has",
                    _raw_of(message),
                    message_id,
                )
        if call is None:
            return  # its caller gave up; the late answer is dropped
        if type(message) is Reply:
            call.succeed(message.value)
        elif isinstance(message, ErrorReply):
            call.fail(
                CommandError(
                    call.command,
                    message.error_class,
                    message.description,
                    arguments=call.arguments,
                    monitor=self.name,
                )
            )
        else:
            assert isinstance(message, Garbage)
            call.fail(message.error(self.name))

    def _connection_lost(self, connection: _Connection, reason: str) -> None:
        """Fail what was pending on ``connection``; idempotent, ignores stale connections."""
        if self._connection is not connection:
            return
        self._connection = None
        connection.stop_reading()
        connection.reader_scope.cancel()
        if self.state is not ConnectionState.CLOSED:
            self.state = ConnectionState.LOST
        self._lost_reason = reason
        pending, self._pending = self._pending, {}
        quit_ids, self._quit_ids = self._quit_ids, set()
        for call_id, call in pending.items():
            if call is None:
                continue
            if call_id in quit_ids:
                call.succeed({})  # QEMU may close the socket before answering ``quit``
            else:
                call.fail(
                    ConnectionLostError(
                        f"{call.command!r} got no answer: {reason}", monitor=self.name
                    )
                )
        failed = sum(1 for call in pending.values() if call is not None)
        log = self._log.debug if self.state is ConnectionState.CLOSED else self._log.info
        log("qmp connection ended", reason=reason, failed_commands=failed)


def _eof_reason(protocol: QMPProtocol) -> str:
    leftover = protocol.feed_eof()
    reason = "the monitor closed the connection"
    if leftover:
        reason += f" in the middle of an answer: {leftover[:200]!r}"
    return reason


def _raw_of(message: Message) -> bytes:
    return repr(message).encode()
