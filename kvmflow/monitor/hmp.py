"""HMP, the human monitor: for people, for old QEMUs, and for the few things only it does.

On a unix socket QEMU 7.2 runs its readline editor: it prints a banner and a ``(qemu) ``
prompt, and echoes each keystroke of a command wrapped in ANSI cursor sequences before the
output. :class:`HMPClient` sends one line at a time, reads up to the next prompt, and returns
the output alone. :func:`hmp_via_qmp` runs the same lines through QMP's
``human-monitor-command`` when only QMP is open.
"""

from __future__ import annotations

import re
from types import TracebackType
from typing import TYPE_CHECKING, Final

import anyio
import anyio.abc

from kvmflow._logging import get_logger
from kvmflow.errors import (
    CommandError,
    ConnectionLostError,
    DeadlineError,
    MalformedReplyError,
    MisuseError,
)
from kvmflow.fencing import before_change, hmp_changes
from kvmflow.monitor.connection import ConnectionState
from kvmflow.monitor.transport import MonitorAddress, as_connector

if TYPE_CHECKING:
    from kvmflow.monitor.qmp import QMPClient

PROMPT: Final = b"(qemu) "
_ANSI_ESCAPE = re.compile(rb"\x1b(?:\[[0-9;?]*[ -/]*[@-~]|[@-Z\\-_])")
_ERROR_PREFIXES: Final = ("unknown command:", "Error:", "error:")
_READ_SIZE: Final = 65536


def clean_output(raw: bytes) -> str:
    """Turn what QEMU wrote after a command (echo, output, prompt) into the output text."""
    if raw.endswith(PROMPT):
        raw = raw[: -len(PROMPT)]
    # The echo of the typed line ends with the CRLF QEMU prints for Enter.
    _, sep, output = raw.partition(b"\r\n")
    if not sep:
        output = raw
    text = _ANSI_ESCAPE.sub(b"", output).decode("utf-8", errors="replace")
    return text.replace("\r\n", "\n").rstrip("\n")


def check_output(command_line: str, output: str, monitor: str | None = None) -> str:
    """Raise :class:`CommandError` when HMP printed an error instead of a result."""
    stripped = output.lstrip()
    for prefix in _ERROR_PREFIXES:
        if stripped.startswith(prefix):
            raise CommandError(command_line, "HMPError", stripped, monitor=monitor)
    return output


def _check_line(command_line: str) -> None:
    if not command_line.strip() or "\n" in command_line or "\r" in command_line:
        raise MisuseError(f"an HMP command is one non-empty line, got {command_line!r}")


class HMPClient:
    """An async HMP connection: one command at a time, each answered up to the prompt.

    A command that is cancelled or times out leaves QEMU's answer unread, so the connection
    is closed rather than reused out of step; :meth:`reconnect` opens a fresh one.
    """

    def __init__(
        self,
        address: MonitorAddress,
        *,
        connect_timeout: float = 5.0,
        command_timeout: float | None = 30.0,
        max_answer_bytes: int = 8 * 1024 * 1024,
    ) -> None:
        self._connector = as_connector(address)
        self.name = self._connector.description
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.max_answer_bytes = max_answer_bytes
        self.state = ConnectionState.IDLE
        self.banner = ""
        self._stream: anyio.abc.ByteStream | None = None
        self._lock = anyio.Lock()
        self._log = get_logger("kvmflow.monitor").bind(monitor=self.name)

    async def __aenter__(self) -> HMPClient:
        await self._open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection."""
        stream, self._stream = self._stream, None
        self.state = ConnectionState.CLOSED
        if stream is not None:
            await anyio.aclose_forcefully(stream)

    async def reconnect(self) -> None:
        """Close the current connection, if any, and open a new one."""
        stream, self._stream = self._stream, None
        if stream is not None:
            await anyio.aclose_forcefully(stream)
        await self._open()

    async def _open(self) -> None:
        self.state = ConnectionState.CONNECTING
        try:
            with anyio.fail_after(self.connect_timeout):
                stream = await self._connector.connect()
                try:
                    banner = await self._read_to_prompt(stream)
                except BaseException:
                    await anyio.aclose_forcefully(stream)
                    raise
        except TimeoutError as exc:
            self.state = ConnectionState.LOST
            raise DeadlineError(
                "connecting and receiving the HMP prompt (is another client holding the monitor?)",
                self.connect_timeout,
                where=self.name,
            ) from exc
        except BaseException:
            self.state = ConnectionState.LOST
            raise
        self.banner = clean_output(b"\r\n" + banner)
        self._stream = stream
        self.state = ConnectionState.READY

    async def _read_to_prompt(self, stream: anyio.abc.ByteStream) -> bytes:
        buffer = bytearray()
        while not buffer.endswith(PROMPT):
            try:
                data = await stream.receive(_READ_SIZE)
            except (
                anyio.EndOfStream,
                anyio.BrokenResourceError,
                anyio.ClosedResourceError,
                OSError,
            ) as exc:
                raise ConnectionLostError(
                    f"the HMP monitor closed the connection (after {bytes(buffer[-200:])!r})",
                    monitor=self.name,
                ) from exc
            buffer += data
            if len(buffer) > self.max_answer_bytes:
                raise MalformedReplyError(
                    f"no prompt within {self.max_answer_bytes} bytes",
                    bytes(buffer[:200]),
                    monitor=self.name,
                )
        return bytes(buffer)

    async def run(
        self, command_line: str, *, timeout: float | None = None, check: bool = True
    ) -> str:
        """Run one HMP command line and return its output without echo, escapes or prompt.

        With ``check`` (the default), output that starts with ``unknown command:`` or
        ``Error:`` raises :class:`CommandError`.
        """
        _check_line(command_line)
        if hmp_changes(command_line):
            await before_change(f"hmp {command_line.split()[0]}")
        if timeout is None:
            timeout = self.command_timeout
        async with self._lock:
            stream = self._stream
            if stream is None or self.state is not ConnectionState.READY:
                raise ConnectionLostError(
                    f"cannot run {command_line!r}: HMP connection is {self.state.value}",
                    monitor=self.name,
                )
            completed = False
            try:
                with anyio.fail_after(timeout):
                    await stream.send(command_line.encode() + b"\n")
                    raw = await self._read_to_prompt(stream)
                completed = True
            except TimeoutError as exc:
                raise DeadlineError(
                    f"HMP command {command_line!r}", timeout or 0, where=self.name
                ) from exc
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                raise ConnectionLostError(
                    f"cannot write to the HMP monitor: {exc}", monitor=self.name
                ) from exc
            finally:
                if not completed:
                    # QEMU's answer may still come; the stream is out of step for good.
                    self._stream = None
                    self.state = ConnectionState.LOST
                    await anyio.aclose_forcefully(stream)
        output = clean_output(raw)
        return check_output(command_line, output, self.name) if check else output


async def hmp_via_qmp(
    qmp: QMPClient, command_line: str, *, timeout: float | None = None, check: bool = True
) -> str:
    """Run an HMP command line through QMP's ``human-monitor-command``."""
    _check_line(command_line)
    result = await qmp.execute(
        "human-monitor-command", {"command-line": command_line}, timeout=timeout
    )
    if not isinstance(result, str):
        raise MalformedReplyError(
            "human-monitor-command returned no text", repr(result).encode(), monitor=qmp.name
        )
    output = result.replace("\r\n", "\n").rstrip("\n")
    return check_output(command_line, output, qmp.name) if check else output
