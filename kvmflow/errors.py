"""One exception tree for the whole package.

Every error kvmflow raises derives from :class:`KvmflowError` and is split by fault: our
caller's misuse, the peer's error reply, a malformed answer, a transport failure, or a
deadline. Errors carry structured fields so that callers can act on them without parsing
messages. Foreign exceptions are translated at the boundary (``raise X from exc``);
cancellation never is.
"""

from __future__ import annotations

from typing import Any


class KvmflowError(Exception):
    """Root of every exception kvmflow raises."""


class MisuseError(KvmflowError):
    """The caller asked for something that cannot be done (wrong state, bad argument)."""


class ValidationError(MisuseError):
    """One or more values are invalid; ``problems`` lists each field, value and rule."""

    def __init__(self, problems: list[FieldProblem]) -> None:
        self.problems = problems
        lines = "; ".join(str(p) for p in problems)
        super().__init__(f"{len(problems)} invalid value(s): {lines}")


class FieldProblem:
    """One invalid field: its name, the value given and what is allowed."""

    __slots__ = ("allowed", "field", "value")

    def __init__(self, field: str, value: object, allowed: str) -> None:
        self.field = field
        self.value = value
        self.allowed = allowed

    def __str__(self) -> str:
        return f"{self.field}={self.value!r}: {self.allowed}"

    def __repr__(self) -> str:
        return f"FieldProblem({self.field!r}, {self.value!r}, {self.allowed!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FieldProblem):
            return NotImplemented
        return (self.field, self.value, self.allowed) == (other.field, other.value, other.allowed)

    def __hash__(self) -> int:
        return hash((self.field, repr(self.value), self.allowed))


class MonitorError(KvmflowError):
    """Base of errors raised while talking to a QEMU monitor."""

    def __init__(self, message: str, *, monitor: str | None = None) -> None:
        self.monitor = monitor
        where = f" [{monitor}]" if monitor else ""
        super().__init__(f"{message}{where}")


class CommandError(MonitorError):
    """QEMU answered a command with an error reply."""

    def __init__(
        self,
        command: str,
        error_class: str,
        description: str,
        *,
        arguments: dict[str, Any] | None = None,
        monitor: str | None = None,
    ) -> None:
        self.command = command
        self.arguments = arguments
        self.error_class = error_class
        self.description = description
        super().__init__(f"{command} failed: {error_class}: {description}", monitor=monitor)


class MalformedReplyError(MonitorError):
    """The monitor sent something that is not a valid QMP message; ``raw`` holds the bytes."""

    def __init__(self, reason: str, raw: bytes, *, monitor: str | None = None) -> None:
        self.reason = reason
        self.raw = raw
        shown = raw if len(raw) <= 200 else raw[:200] + b"..."
        super().__init__(f"malformed monitor answer: {reason}: {shown!r}", monitor=monitor)


class TransportError(MonitorError):
    """The byte stream to the monitor failed (refused, reset, closed)."""


class ConnectionLostError(TransportError):
    """The monitor connection closed while commands were pending or before it was ready."""


class DeadlineError(KvmflowError, TimeoutError):
    """An operation did not finish within its deadline; ``operation`` says which."""

    def __init__(self, operation: str, seconds: float, *, where: str | None = None) -> None:
        self.operation = operation
        self.seconds = seconds
        self.where = where
        at = f" [{where}]" if where else ""
        super().__init__(f"{operation} did not finish within {seconds:g} s{at}")
