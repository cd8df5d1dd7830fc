"""Typed answers to the QMP queries every layer above needs.

These helpers turn QEMU's JSON into small frozen objects and reject answers that do not have
the expected shape with :class:`MalformedReplyError`, so that callers never index raw dicts.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Protocol

from kvmflow.errors import MalformedReplyError
from kvmflow.monitor.protocol import QemuVersion


class CommandRunner(Protocol):
    """Anything that runs QMP commands by name: a QMP client, or the HMP fallback."""

    name: str

    async def execute(
        self,
        command: str,
        arguments: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> Any: ...


class RunState(enum.Enum):
    """QEMU's own run state as ``query-status`` reports it (QAPI ``RunState``)."""

    DEBUG = "debug"
    INMIGRATE = "inmigrate"
    INTERNAL_ERROR = "internal-error"
    IO_ERROR = "io-error"
    PAUSED = "paused"
    POSTMIGRATE = "postmigrate"
    PRELAUNCH = "prelaunch"
    FINISH_MIGRATE = "finish-migrate"
    RESTORE_VM = "restore-vm"
    RUNNING = "running"
    SAVE_VM = "save-vm"
    SHUTDOWN = "shutdown"
    SUSPENDED = "suspended"
    WATCHDOG = "watchdog"
    GUEST_PANICKED = "guest-panicked"
    COLO = "colo"


@dataclass(frozen=True, slots=True)
class Status:
    """Answer of ``query-status``."""

    state: RunState
    running: bool


@dataclass(frozen=True, slots=True)
class Accelerator:
    """Whether KVM is present and in use (``query-kvm``)."""

    kvm_present: bool
    kvm_enabled: bool

    @property
    def name(self) -> str:
        return "kvm" if self.kvm_enabled else "tcg"


def _malformed(command: str, answer: Any, monitor: str) -> MalformedReplyError:
    return MalformedReplyError(
        f"unexpected answer to {command}", repr(answer).encode(), monitor=monitor
    )


async def query_status(qmp: CommandRunner, *, timeout: float | None = None) -> Status:
    """QEMU's run state."""
    answer = await qmp.execute("query-status", timeout=timeout)
    try:
        return Status(RunState(answer["status"]), bool(answer["running"]))
    except (TypeError, KeyError, ValueError) as exc:
        raise _malformed("query-status", answer, qmp.name) from exc


async def query_kvm(qmp: CommandRunner, *, timeout: float | None = None) -> Accelerator:
    """Whether this QEMU runs under KVM."""
    answer = await qmp.execute("query-kvm", timeout=timeout)
    try:
        return Accelerator(bool(answer["present"]), bool(answer["enabled"]))
    except (TypeError, KeyError) as exc:
        raise _malformed("query-kvm", answer, qmp.name) from exc


async def query_version(qmp: CommandRunner, *, timeout: float | None = None) -> QemuVersion:
    """QEMU's version as ``query-version`` reports it."""
    answer = await qmp.execute("query-version", timeout=timeout)
    try:
        qemu = answer["qemu"]
        return QemuVersion(
            int(qemu["major"]),
            int(qemu["minor"]),
            int(qemu["micro"]),
            str(answer.get("package", "")),
        )
    except (TypeError, KeyError, ValueError) as exc:
        raise _malformed("query-version", answer, qmp.name) from exc
