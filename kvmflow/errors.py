"""One exception tree for the whole package, every class in this module.

Every error kvmflow raises derives from :class:`KvmflowError` and is split by fault: our
caller's misuse, the peer's error reply, a malformed answer, a transport failure, a node
that cannot do what was asked, a QEMU that would not start, a deadline, or a migration
that did not happen. Errors carry structured fields so that callers can act on them
without parsing messages. Foreign exceptions are translated at the boundary (``raise X
from exc``); cancellation never is. The README's tree is :func:`error_tree`'s output.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvmflow.instance.states import InstanceEvent, InstanceState
    from kvmflow.migration.outcome import Outcome
    from kvmflow.migration.phases import MigrationPhase, PhaseEvent
    from kvmflow.migration.status import BadAnswer


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


# ------------------------------------------------------------------------ misuse, by layer


class ConfigError(ValidationError):
    """The configuration file is missing or wrong; every problem names its entry."""


class RuntimeFileError(ValidationError):
    """A saved runtime file exists but cannot be used."""


class InstanceBusyError(MisuseError):
    """Another operation already drives this instance; ``holder`` names it when known."""

    def __init__(self, message: str, *, holder: object | None = None) -> None:
        self.holder = holder  # the store's Lease of the operation in the way, if any
        super().__init__(message)


class InstanceRunningError(MisuseError):
    """The instance is running, and the operation needs it stopped."""


class InstanceNotRunningError(MisuseError):
    """The instance is not running, and the operation needs it running."""


class IllegalTransitionError(MisuseError):
    """An event that the instance's transition table does not allow in its state."""

    def __init__(self, instance: str, state: InstanceState, event: InstanceEvent) -> None:
        self.instance = instance
        self.state = state
        self.event = event
        super().__init__(
            f"instance {instance}: event {event.value!r} is not allowed in state {state.value!r}"
        )


class IllegalPhaseTransitionError(MisuseError):
    """A step that the migration phase table does not allow (a kvmflow bug)."""

    def __init__(self, instance: str, phase: MigrationPhase, event: PhaseEvent) -> None:
        self.instance = instance
        self.phase = phase
        self.event = event
        super().__init__(
            f"migration of {instance}: step {event.value!r} is not allowed in phase {phase.value!r}"
        )


class EndOfSubscription(KvmflowError):
    """A feed was closed and everything in it has been read."""


# --------------------------------------------------------------------------- the store


class StoreError(KvmflowError):
    """The store of record cannot be used (missing, unreadable, corrupt, read-only, full)."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        self.path = path
        super().__init__(f"{message} [store {path}]" if path else message)


class StoreSchemaError(StoreError):
    """The store was written by a newer kvmflow (or is not a kvmflow store at all)."""


class LeaseLostError(StoreError):
    """Our lease on an instance expired or was taken over: we must not act on it any more."""


class StoreUnavailableError(StoreError):
    """The store does not answer (etcd without quorum, unreachable): nothing was written,
    and new operations are refused until it answers again."""


class NodeNotHeldError(MisuseError):
    """The node belongs to another controller's shard: only its owner acts on its
    instances (``owner`` names it, ``None`` when no controller holds the node now)."""

    def __init__(self, message: str, *, node: str, owner: str | None) -> None:
        self.node, self.owner = node, owner
        super().__init__(message)


class NothingToAbortError(MisuseError):
    """An abort was asked for an instance that no operation holds."""


class OperationAbortedError(KvmflowError):
    """The operation was cancelled on request (``kvmflow abort`` from another shell) and
    cleaned up as for a cancel; ``requested_by`` says who asked."""

    def __init__(self, message: str, *, requested_by: str) -> None:
        self.requested_by = requested_by
        super().__init__(message)


class RecoveryError(KvmflowError):
    """Recovery found something it must not touch (both copies may have run, an owner
    still alive) or could not finish; ``reports`` says what it found, instance by instance."""

    def __init__(self, message: str, *, reports: object = None) -> None:
        self.reports = reports
        super().__init__(message)


# ---------------------------------------------------------------------- nodes and QEMU


class NodeError(KvmflowError):
    """A node could not do what was asked (command failed to run, file unreadable, ...)."""

    def __init__(self, message: str, *, node: str | None = None) -> None:
        self.node = node
        super().__init__(f"{message} [node {node}]" if node else message)


class SSHFailure(enum.StrEnum):
    """Why an SSH connection could not be made."""

    UNREACHABLE = "unreachable"
    HOST_KEY = "host-key"  # unknown or changed host key
    AUTH = "auth"  # our key was refused


class SSHConnectError(NodeError):
    """The node could not be reached or would not let us in; ``kind`` says why."""

    def __init__(self, message: str, *, node: str, kind: SSHFailure) -> None:
        self.kind = kind
        super().__init__(message, node=node)


class QemuStartError(KvmflowError):
    """QEMU exited instead of starting; the message carries what it printed."""


class StopError(KvmflowError):
    """The instance's process would not go away."""


class UidPoolExhaustedError(KvmflowError):
    """Every uid of the pool is taken."""


class GuestBuildError(KvmflowError):
    """The test guest could not be compiled (gcc or ld missing or failing)."""


# ------------------------------------------------------------------------- migrations


class MigrationError(KvmflowError):
    """A migration did not happen, or did not finish: ``.runs_on``, ``.outcome``.

    ``runs_on`` names the node the instance runs on now (``None`` if it runs nowhere
    kvmflow can vouch for, for example because the source QEMU died); ``outcome`` says how
    it ended (``None`` when nothing was started); ``target_said`` is what the target's QEMU
    wrote to its log (why it refused the stream), when it wrote anything."""

    def __init__(
        self,
        instance: str,
        reason: str,
        *,
        runs_on: str | None,
        bad_answers: list[BadAnswer] | None = None,
        outcome: Outcome | None = None,
        target_said: str = "",
    ) -> None:
        self.instance = instance
        self.reason = reason
        self.runs_on = runs_on
        self.bad_answers = bad_answers or []
        self.outcome = outcome
        self.target_said = target_said
        where = f"it runs on {runs_on}" if runs_on else "it runs nowhere now"
        said = f"; the target QEMU said: {target_said}" if target_said else ""
        super().__init__(f"migration of {instance} failed: {reason}{said}; {where}")


class IncompatibleTargetError(MigrationError):
    """The target's QEMU cannot take the instance (machine type, CPU, devices,
    capabilities): ``.problems`` lists every reason with its fix. Nothing was touched."""

    def __init__(self, instance: str, runs_on: str, problems: Sequence[object]) -> None:
        self.problems = list(problems)
        super().__init__(
            instance,
            "the target cannot take it: " + "; ".join(str(p) for p in self.problems),
            runs_on=runs_on,
        )


class UpgradeError(KvmflowError):
    """A node's rolling upgrade stopped at a stage (not drained, command failed, QEMU does
    not run after it); every guest still runs somewhere, once."""


class TooManyBadAnswersError(KvmflowError):
    """``query-migrate`` gave unusable answers too many times in a row."""

    def __init__(self, answers: list[BadAnswer]) -> None:
        self.answers = answers
        details = "; ".join(f"{a.reason}: {a.raw[:120]}" for a in answers)
        super().__init__(f"too many bad answers ({len(answers)} in a row): {details}")


class MigrationFailedError(KvmflowError):
    """QEMU reported the migration failed or cancelled."""

    def __init__(self, status: str, error: str | None) -> None:
        self.status = status
        self.error = error
        super().__init__(f"QEMU reports migration {status}" + (f": {error}" if error else ""))


class PolicyAbortError(KvmflowError):
    """The policy chose to abort the migration (stall, deadline or prediction)."""

    def __init__(self, trigger: str, evidence: str) -> None:
        self.trigger = trigger
        self.evidence = evidence
        super().__init__(f"aborted by the policy ({trigger}): {evidence}")


class PostcopyRecoveryError(KvmflowError):
    """A broken post-copy migration could not be resumed in time."""

    def __init__(self, seconds: float, last_error: str) -> None:
        self.seconds = seconds
        self.last_error = last_error
        super().__init__(
            f"post-copy recovery did not succeed within {seconds:g} s (last error: {last_error})"
        )


class ContUnanswered(KvmflowError):
    """``cont`` reached a migration target but its answer was lost: the guest may run."""


def error_tree() -> str:
    """The exception tree as text, each class with the first line of its docstring."""
    lines = ["KvmflowError"]

    def walk(cls: type[BaseException], prefix: str) -> None:
        children = sorted(
            (c for c in cls.__subclasses__() if c.__module__ == __name__),
            key=lambda c: c.__name__,
        )
        for index, child in enumerate(children):
            last = index == len(children) - 1
            summary = (child.__doc__ or "").strip().splitlines()[0]
            label = f"{prefix}{'└── ' if last else '├── '}{child.__name__}"
            lines.append(f"{label:<36} {summary}")
            walk(child, prefix + ("    " if last else "│   "))

    walk(KvmflowError, "")
    return "\n".join(line.rstrip() for line in lines)
