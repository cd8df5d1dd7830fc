"""Submitted migrations as tickets: their lifecycle as a table, and the engine's limits.

======================  ==========================================================
state                   meaning
======================  ==========================================================
``queued``              waiting for the limits (or the instance) to allow it
``active``              its migration coroutine runs
``completed``           the instance moved; ``result`` says how
``failed``              it did not move (or did not finish); ``error`` says why
``cancelled``           cancelled, before it started or while it ran
======================  ==========================================================
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

import anyio

from kvmflow.errors import FieldProblem, MisuseError, ValidationError
from kvmflow.instance.instance import Instance
from kvmflow.migration.policy import MigrationPolicy
from kvmflow.migration.results import MigrationResult
from kvmflow.monitor.qmp import QMPClient


class TicketState(enum.StrEnum):
    QUEUED = "queued"
    ACTIVE = "active"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


T = TicketState

#: state -> the states it may go to. Anything not listed is illegal.
TICKET_TRANSITIONS: dict[TicketState, frozenset[TicketState]] = {
    T.QUEUED: frozenset({T.ACTIVE, T.CANCELLED}),
    T.ACTIVE: frozenset({T.COMPLETED, T.FAILED, T.CANCELLED}),
    T.COMPLETED: frozenset(),
    T.FAILED: frozenset(),
    T.CANCELLED: frozenset(),
}


@dataclass(frozen=True)
class Limits:
    """How many migrations may run at once (KubeVirt and oVirt use 2 out, 2 in)."""

    max_outbound: int = 2
    max_inbound: int = 2
    max_total: int | None = None

    def __post_init__(self) -> None:
        problems = [
            FieldProblem(name, value, "at least 1" + (" or unset" if name == "max_total" else ""))
            for name, value in (
                ("max_outbound", self.max_outbound),
                ("max_inbound", self.max_inbound),
                ("max_total", self.max_total),
            )
            if value is not None and (not isinstance(value, int) or value < 1)
        ]
        if problems:
            raise ValidationError(problems)


class MigrationTicket:
    """One submitted migration: queued, then active, then done (see the module table)."""

    def __init__(
        self,
        ticket_id: int,
        instance: Instance,
        target: str,
        priority: int,
        policy: MigrationPolicy | None,
        live: bool,
        on_cancel: Callable[[MigrationTicket], None],
    ) -> None:
        self.id = ticket_id
        self.instance = instance
        self.source = instance.node_name
        self.target = target
        self.priority = priority
        self.policy = policy
        self.live = live
        self.state = TicketState.QUEUED
        self.result: MigrationResult | None = None
        self.error: BaseException | None = None
        self.scope: anyio.CancelScope | None = None
        self.qmp: QMPClient | None = None
        self.bandwidth_mib: int | None = None
        self.watching = False  # past its set-up: progress is being reported
        self._on_cancel = on_cancel
        self._done = anyio.Event()

    def __repr__(self) -> str:
        return (
            f"MigrationTicket({self.id}, {self.instance.name}: {self.source} -> "
            f"{self.target}, {self.state})"
        )

    @property
    def done(self) -> bool:
        return not TICKET_TRANSITIONS[self.state]

    def cancel(self) -> None:
        """Cancel: a queued migration never starts; an active one is cancelled cleanly."""
        self._on_cancel(self)

    async def wait(self) -> MigrationResult:
        """Wait for the end; return the result or raise why it did not happen."""
        await self._done.wait()
        if self.result is not None:
            return self.result
        assert self.error is not None
        raise self.error

    def move_to(self, state: TicketState) -> None:
        """Change state as the table allows; the end states wake every waiter."""
        if state not in TICKET_TRANSITIONS[self.state]:
            raise MisuseError(
                f"migration ticket {self.id}: {self.state.value} cannot become {state.value}"
            )
        self.state = state
        if self.done:
            self._done.set()
