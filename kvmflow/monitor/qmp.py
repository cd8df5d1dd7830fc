"""Async QMP client: one persistent connection per monitor, shared by any number of callers.

A QEMU monitor socket serves one client at a time, so kvmflow keeps one connection per
monitor and multiplexes every caller over it: commands are written back to back and matched
to their replies by id (QEMU answers in order). A reader task, owned by the client's task
group, routes replies to callers and events to bounded subscriptions.

Use it as ``async with QMPClient(path) as qmp:``.
"""

from __future__ import annotations

from collections import deque
from types import TracebackType
from typing import Any, Final

import anyio
import anyio.abc

from kvmflow._fastpath import running_asyncio_loop
from kvmflow._logging import get_logger
from kvmflow._taskgroups import exit_task_group
from kvmflow.errors import (
    CommandError,
    ConnectionLostError,
    DeadlineError,
    MalformedReplyError,
    MisuseError,
)
from kvmflow.fencing import before_change, qmp_changes
from kvmflow.monitor.calls import Call, Deadlines, PendingCalls
from kvmflow.monitor.connection import READ_SIZE, ConnectionState, MonitorConnection
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

#: Events kept from before the negotiation finished (the oldest go first beyond that).
MAX_EARLY_EVENTS: Final = 1000


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
        self._log = get_logger("kvmflow.monitor").bind(monitor=self.name)
        self._connection: MonitorConnection | None = None
        self._pending = PendingCalls(self.name)
        self._deadlines = Deadlines(self.name, self._pending.abandon)
        self._subscriptions: list[EventSubscription] = []
        self._task_group: anyio.abc.TaskGroup | None = None
        self._send_lock: anyio.Lock | None = None
        self._lost_reason = "not connected"
        self._event_class: type[anyio.Event] = anyio.Event
        self._loop = running_asyncio_loop()

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> QMPClient:
        if self._task_group is not None:
            raise MisuseError(f"QMP client for {self.name} is already open")
        self._send_lock = anyio.Lock()
        # The backend's own Event class and clock, looked up once: on a busy controller
        # the per-command backend lookup is measurable.
        self._event_class = type(anyio.Event())
        loop = running_asyncio_loop()
        self._loop = loop
        self._deadlines.clock = loop.time if loop is not None else anyio.current_time
        task_group = anyio.create_task_group()
        await task_group.__aenter__()
        self._task_group = task_group
        task_group.start_soon(self._deadlines.watch, name=f"qmp-deadlines {self.name}")
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
        connection = MonitorConnection(stream, protocol)
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
                data = await stream.receive(READ_SIZE)
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
        if qmp_changes(command):
            await before_change(f"qmp {command} on {self.name}")
        connection = self._connection
        if connection is None:
            raise ConnectionLostError(
                f"cannot run {command!r}: connection is {self.state.value} ({self._lost_reason})",
                monitor=self.name,
            )
        call_id, line = connection.protocol.encode_command(command, arguments)
        call = Call(command, arguments, self._loop, self._event_class)
        self._pending.add(call_id, call)
        if timeout is None:
            timeout = self.command_timeout
        if timeout is not None:
            self._deadlines.add(call_id, call, timeout)
        try:
            await self._send(connection, line)
            await call.wait()
        finally:
            if not call.completed:
                self._pending.abandon(call_id)
        if call.error is not None:
            raise call.error
        return call.value

    async def _send(self, connection: MonitorConnection, line: bytes) -> None:
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

    async def _send_rest(self, connection: MonitorConnection, data: bytes) -> None:
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

    def _write_failed(
        self, connection: MonitorConnection, exc: BaseException
    ) -> ConnectionLostError:
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

    async def _read_loop(self, connection: MonitorConnection) -> None:
        if self._connection is not connection:
            return  # closed before the reader got its first turn
        reason = "the monitor closed the connection"
        try:
            with connection.reader_scope:
                reason = await connection.read(self._dispatch, self._reader_failed)
        except Exception as exc:  # a bug here must not leave callers waiting forever
            reason = f"the reader failed: {exc!r}"
            self._log.exception("qmp reader failed")
        finally:
            connection.stop_reading()
            self._connection_lost(connection, reason)
            with anyio.CancelScope(shield=True):
                await anyio.aclose_forcefully(connection.stream)

    def _reader_failed(self) -> None:
        self._log.exception("qmp reader failed")

    def _dispatch(self, message: Message) -> None:
        if isinstance(message, Event):
            for subscription in self._subscriptions:
                subscription.offer(message)
            return
        if isinstance(message, Greeting):
            self._log.warning("unexpected QMP greeting on an open connection")
            return
        call, message, dropped = self._pending.match(message)
        if dropped is not None:
            self._log.warning(dropped, answer=repr(message))
            return
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

    def _connection_lost(self, connection: MonitorConnection, reason: str) -> None:
        """Fail what was pending on ``connection``; idempotent, ignores stale connections."""
        if self._connection is not connection:
            return
        self._connection = None
        connection.stop_reading()
        connection.reader_scope.cancel()
        if self.state is not ConnectionState.CLOSED:
            self.state = ConnectionState.LOST
        self._lost_reason = reason
        failed = self._pending.fail_all(reason)
        log = self._log.debug if self.state is ConnectionState.CLOSED else self._log.info
        log("qmp connection ended", reason=reason, failed_commands=failed)
