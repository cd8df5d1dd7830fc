"""QMP protocol without I/O: bytes in, messages out; commands in, bytes out.

The :class:`QMPProtocol` object knows the framing (one JSON object per CRLF-terminated line),
the greeting and ``qmp_capabilities`` negotiation, command encoding with numeric ids, and how
to classify what QEMU sends (greeting, reply, error reply, event). It never touches a socket,
so it is tested with bytes alone and reused by every transport.

Lines that are not valid QMP do not raise: they come out as :class:`Garbage` messages carrying
the raw bytes, because QEMU answers commands in order and the client can pin a bad line on the
command it answers. Only a broken greeting is fatal, since nothing after it can be trusted.
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass, field
from typing import Any

from kvmflow.errors import CommandError, MalformedReplyError, MisuseError

#: Longest line accepted from a monitor. ``query-qmp-schema`` (the largest answer QEMU 7.2
#: gives) is about 200 KiB; anything past a few MiB is a broken or hostile peer.
DEFAULT_MAX_LINE_BYTES = 8 * 1024 * 1024

_PLAIN_NAME = re.compile(r"[A-Za-z0-9_-]+")


class Phase(enum.Enum):
    """Where a QMP session is in its life."""

    AWAITING_GREETING = "awaiting-greeting"
    NEGOTIATING = "negotiating"
    READY = "ready"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class QemuVersion:
    """QEMU's version triple and package string from the greeting."""

    major: int
    minor: int
    micro: int
    package: str = ""

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.micro}"


@dataclass(frozen=True, slots=True)
class Greeting:
    """The ``{"QMP": ...}`` banner QEMU sends on connect."""

    version: QemuVersion
    capabilities: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Reply:
    """A successful answer; ``id`` is whatever the command carried (``None`` if absent)."""

    id: Any
    value: Any


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """An error answer with QEMU's error class and description."""

    id: Any
    error_class: str
    description: str


@dataclass(frozen=True, slots=True)
class Event:
    """An asynchronous event; ``timestamp`` is seconds since the epoch as QEMU stamped it."""

    name: str
    data: dict[str, Any] = field(default_factory=dict)
    timestamp: float = 0.0


@dataclass(frozen=True, slots=True)
class Garbage:
    """A line that is not a valid QMP message. ``id`` is set when one could be read."""

    reason: str
    raw: bytes
    id: Any = None

    def error(self, monitor: str | None = None) -> MalformedReplyError:
        """The typed error this line stands for."""
        return MalformedReplyError(self.reason, self.raw, monitor=monitor)


Message = Greeting | Reply | ErrorReply | Event | Garbage


class QMPProtocol:
    """Sans-IO QMP session: feed it received bytes, ask it for bytes to send."""

    def __init__(self, *, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> None:
        if max_line_bytes < 64:
            raise MisuseError(f"max_line_bytes must be at least 64, got {max_line_bytes}")
        self.max_line_bytes = max_line_bytes
        self.phase = Phase.AWAITING_GREETING
        self.greeting: Greeting | None = None
        self._buffer = b""
        self._discarding = 0  # bytes dropped of an over-long line still being received
        self._next_id = 1
        self._capabilities_id: int | None = None

    # ----------------------------------------------------------------- sending

    def encode_command(
        self, command: str, arguments: dict[str, Any] | None = None
    ) -> tuple[int, bytes]:
        """Encode one command with a fresh id; returns the id and the line to send."""
        if self.phase is not Phase.READY and command != "qmp_capabilities":
            raise MisuseError(f"cannot send {command!r} while the session is {self.phase.value}")
        return self._encode(command, arguments)

    def start_negotiation(self) -> bytes:
        """The ``qmp_capabilities`` line to send once the greeting has arrived."""
        if self.phase is not Phase.NEGOTIATING:
            raise MisuseError(f"cannot negotiate while the session is {self.phase.value}")
        self._capabilities_id, line = self._encode("qmp_capabilities", None)
        return line

    def _encode(self, command: str, arguments: dict[str, Any] | None) -> tuple[int, bytes]:
        if not isinstance(command, str) or not command:
            raise MisuseError(f"a QMP command name must be a non-empty string, got {command!r}")
        if arguments is None and _PLAIN_NAME.fullmatch(command):
            # The common case (queries without arguments) needs no JSON encoder.
            command_id = self._next_id
            self._next_id += 1
            return command_id, b'{"execute":"%s","id":%d}\n' % (command.encode(), command_id)
        message: dict[str, Any] = {"execute": command, "id": self._next_id}
        if arguments is not None:
            if not isinstance(arguments, dict):
                raise MisuseError(f"arguments of {command!r} must be a dict, got {arguments!r}")
            message["arguments"] = arguments
        try:
            line = json.dumps(message, separators=(",", ":"), allow_nan=False).encode() + b"\n"
        except (TypeError, ValueError) as exc:
            raise MisuseError(f"arguments of {command!r} are not JSON-serialisable: {exc}") from exc
        command_id = self._next_id
        self._next_id += 1
        return command_id, line

    # --------------------------------------------------------------- receiving

    def feed(self, data: bytes) -> list[Message]:
        """Take received bytes; return the complete messages they finish, in order."""
        if self.phase is Phase.CLOSED:
            raise MisuseError("the QMP session is closed")
        messages: list[Message] = []
        if self._discarding:
            end = data.find(b"\n")
            if end < 0:
                self._discarding += len(data)
                return messages
            self._discarding += end
            messages.append(self._too_long(self._discarding))
            self._discarding = 0
            data = data[end + 1 :]
        if self._buffer:
            data = self._buffer + data
        lines = data.split(b"\n")
        self._buffer = lines.pop()
        if len(self._buffer) > self.max_line_bytes:
            self._discarding = len(self._buffer)
            self._buffer = b""
        for line in lines:
            if len(line) > self.max_line_bytes:
                messages.append(self._too_long(len(line)))
            elif line.strip():
                messages.append(self._decode_line(line))
        return messages

    def feed_eof(self) -> bytes:
        """The peer closed; returns the unfinished partial line (empty if none)."""
        leftover = self._buffer
        self._buffer = b""
        self.phase = Phase.CLOSED
        return leftover

    def _too_long(self, size: int) -> Garbage:
        return Garbage(f"line of {size} bytes exceeds the {self.max_line_bytes}-byte limit", b"")

    def _decode_line(self, line: bytes) -> Message:
        if line.endswith(b"\r"):
            line = line[:-1]
        message = decode_message(line)
        if self.phase is Phase.AWAITING_GREETING:
            if not isinstance(message, Greeting):
                raise MalformedReplyError("expected the QMP greeting", line)
            self.greeting = message
            self.phase = Phase.NEGOTIATING
        elif (
            self.phase is Phase.NEGOTIATING
            and self._capabilities_id is not None
            and isinstance(message, (Reply, ErrorReply, Garbage))
            and message.id == self._capabilities_id
        ):
            if isinstance(message, ErrorReply):
                raise CommandError("qmp_capabilities", message.error_class, message.description)
            if isinstance(message, Garbage):
                raise message.error()
            self.phase = Phase.READY
        return message


def decode_message(line: bytes) -> Message:
    """Classify one line as a QMP message; anything invalid becomes :class:`Garbage`."""
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return Garbage("not JSON", line)
    if not isinstance(obj, dict):
        return Garbage(f"a JSON {type(obj).__name__}, not an object", line)
    if "QMP" in obj:
        return _decode_greeting(obj["QMP"], line)
    if "event" in obj:
        return _decode_event(obj, line)
    msg_id = obj.get("id")
    if "return" in obj:
        return Reply(msg_id, obj["return"])
    if "error" in obj:
        error = obj["error"]
        if (
            isinstance(error, dict)
            and isinstance(error.get("class"), str)
            and isinstance(error.get("desc"), str)
        ):
            return ErrorReply(msg_id, error["class"], error["desc"])
        return Garbage("error reply without a class and description", line, msg_id)
    return Garbage("neither return, error, event nor greeting", line, msg_id)


def _decode_greeting(body: Any, line: bytes) -> Message:
    try:
        version = body["version"]["qemu"]
        parsed = QemuVersion(
            int(version["major"]),
            int(version["minor"]),
            int(version["micro"]),
            str(body["version"].get("package", "")),
        )
        capabilities = tuple(str(c) for c in body.get("capabilities", ()))
    except (TypeError, KeyError, ValueError, AttributeError):
        return Garbage("greeting without a QEMU version", line)
    return Greeting(parsed, capabilities)


def _decode_event(obj: dict[str, Any], line: bytes) -> Message:
    name = obj["event"]
    data = obj.get("data", {})
    if not isinstance(name, str) or not isinstance(data, dict):
        return Garbage("event without a name or with non-object data", line)
    stamp = obj.get("timestamp")
    timestamp = 0.0
    if isinstance(stamp, dict):
        seconds, micros = stamp.get("seconds"), stamp.get("microseconds")
        if isinstance(seconds, int) and isinstance(micros, int):
            timestamp = seconds + micros / 1e6
    return Event(name, data, timestamp)
