"""Where one migration stands, and every legal step between phases, as one table.

The phase says what the world holds at each moment, so that every exit path (and, later, a
controller that restarts) knows what to undo or finish:

============================  =================================================================
phase                         what exists
============================  =================================================================
``checking``                  nothing was touched yet
``target-starting``           a target QEMU may exist (it holds no guest state)
``target-listening``          the target waits for the stream; the source may be paused by us
``streaming``                 the source sends the guest; it still owns it
``post-copy``                 the target runs the guest and pulls the rest: neither side may
                              be thrown away
``completed-on-source``       the source sent everything and is stopped (``postmigrate``);
                              the target has not run the guest yet
``target-may-run``            ``cont`` went to the target and its answer was lost: the guest
                              may run there
``switched-over``             the target runs the guest (or holds it paused, as it was): from
                              here on nothing is undone, finishing must complete
``aborting``                  undoing what was done before the switch-over
``done`` / ``aborted``        the end: moved, or undone (the outcome says where the guest runs)
``stranded``                  the end, where kvmflow cannot vouch for either side (contact
                              lost, post-copy broken, a ``cont`` unanswered): both QEMUs are
                              left as they are for the operator
============================  =================================================================

:data:`TRANSITIONS` is the table; :class:`PhaseTracker` applies it, logs every step and
hands it to a listener before the next step runs (write-ahead, for a journal).
"""

from __future__ import annotations

import enum
import inspect
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from kvmflow._logging import get_logger
from kvmflow.errors import IllegalPhaseTransitionError


class MigrationPhase(enum.StrEnum):
    CHECKING = "checking"
    TARGET_STARTING = "target-starting"
    TARGET_LISTENING = "target-listening"
    STREAMING = "streaming"
    POSTCOPY = "post-copy"
    COMPLETED_ON_SOURCE = "completed-on-source"
    TARGET_MAY_RUN = "target-may-run"
    SWITCHED_OVER = "switched-over"
    ABORTING = "aborting"
    DONE = "done"
    ABORTED = "aborted"
    STRANDED = "stranded"


class PhaseEvent(enum.StrEnum):
    START_TARGET = "start-target"
    TARGET_LISTENS = "target-listens"
    STREAM = "stream"  # ``migrate`` was sent to the source
    SWITCH_TO_POSTCOPY = "switch-to-postcopy"
    SOURCE_COMPLETED = "source-completed"
    CONT_UNANSWERED = "cont-unanswered"  # ``cont`` went to the target, its answer was lost
    TARGET_TOOK_OVER = "target-took-over"
    FINISHED = "finished"
    ABORT = "abort"
    ABORT_DONE = "abort-done"
    GIVE_UP = "give-up"  # neither side can be vouched for: leave both for the operator


P, V = MigrationPhase, PhaseEvent

#: Phases before the switch-over: an abort from here may undo everything.
UNDOABLE: frozenset[MigrationPhase] = frozenset(
    {P.CHECKING, P.TARGET_STARTING, P.TARGET_LISTENING, P.STREAMING, P.COMPLETED_ON_SOURCE}
)

#: Steps a listener may refuse (by raising): intentions, taken before the action they
#: announce. Every other step records a fact (QEMU completed, an abort ran): a listener
#: that fails on one is logged and the step stands, or the clean-up could not finish.
REFUSABLE: frozenset[PhaseEvent] = frozenset({V.START_TARGET, V.TARGET_LISTENS, V.STREAM})

#: (phase, event) -> next phase. Anything not listed is illegal.
TRANSITIONS: dict[tuple[MigrationPhase, PhaseEvent], MigrationPhase] = {
    (P.CHECKING, V.START_TARGET): P.TARGET_STARTING,
    (P.TARGET_STARTING, V.TARGET_LISTENS): P.TARGET_LISTENING,
    (P.TARGET_LISTENING, V.STREAM): P.STREAMING,
    (P.STREAMING, V.SWITCH_TO_POSTCOPY): P.POSTCOPY,
    (P.STREAMING, V.SOURCE_COMPLETED): P.COMPLETED_ON_SOURCE,
    (P.POSTCOPY, V.SOURCE_COMPLETED): P.SWITCHED_OVER,  # the target has run since the switch
    (P.COMPLETED_ON_SOURCE, V.CONT_UNANSWERED): P.TARGET_MAY_RUN,
    (P.COMPLETED_ON_SOURCE, V.TARGET_TOOK_OVER): P.SWITCHED_OVER,
    (P.SWITCHED_OVER, V.FINISHED): P.DONE,
    (P.CHECKING, V.ABORT): P.ABORTING,
    (P.TARGET_STARTING, V.ABORT): P.ABORTING,
    (P.TARGET_LISTENING, V.ABORT): P.ABORTING,
    (P.STREAMING, V.ABORT): P.ABORTING,
    (P.COMPLETED_ON_SOURCE, V.ABORT): P.ABORTING,
    (P.ABORTING, V.SOURCE_COMPLETED): P.COMPLETED_ON_SOURCE,  # completed before the cancel
    (P.ABORTING, V.ABORT_DONE): P.ABORTED,
    (P.ABORTING, V.GIVE_UP): P.STRANDED,
    (P.POSTCOPY, V.GIVE_UP): P.STRANDED,
    (P.TARGET_MAY_RUN, V.GIVE_UP): P.STRANDED,
}

#: Where a migration ends.
TERMINAL: frozenset[MigrationPhase] = frozenset({P.DONE, P.ABORTED, P.STRANDED})


@dataclass(frozen=True)
class PhaseChange:
    """One step of one migration, as a listener (a journal, a test hook) sees it."""

    instance: str
    source: str
    target: str
    before: MigrationPhase
    event: PhaseEvent
    after: MigrationPhase
    at: float  # time.time() of the step


#: Called with every step before the migration goes on; may be a coroutine function.
PhaseListener = Callable[[PhaseChange], Awaitable[None] | None]


def next_phase(phase: MigrationPhase, event: PhaseEvent) -> MigrationPhase | None:
    """The phase ``event`` leads to from ``phase``, or ``None`` if it is illegal."""
    return TRANSITIONS.get((phase, event))


class PhaseTracker:
    """The current phase of one migration; applies the table, logs, tells the listener."""

    def __init__(
        self,
        instance: str,
        source: str,
        target: str,
        listener: PhaseListener | None = None,
        *,
        phase: MigrationPhase = MigrationPhase.CHECKING,  # another: an adopted migration
    ) -> None:
        self.instance, self.source, self.target = instance, source, target
        self.phase = phase
        self.history: list[PhaseChange] = []
        self._listeners = [listener] if listener is not None else []
        self._log = get_logger("kvmflow.migration").bind(
            instance=instance, source=source, target=target
        )

    async def step(self, event: PhaseEvent) -> MigrationPhase:
        """Apply ``event`` once the listener has seen it. A listener that raises on a
        :data:`REFUSABLE` step stops it (the phase stays, the error propagates)."""
        after = next_phase(self.phase, event)
        if after is None:
            raise IllegalPhaseTransitionError(self.instance, self.phase, event)
        change = PhaseChange(
            self.instance, self.source, self.target, self.phase, event, after, time.time()
        )
        for listener in self._listeners:  # write-ahead: a refused step is not taken
            try:
                outcome = listener(change)
                if inspect.isawaitable(outcome):
                    await outcome
            except Exception as exc:
                if event in REFUSABLE:
                    raise
                self._log.error(
                    "phase listener failed; the step stands", step=event.value, error=repr(exc)
                )
        self.phase = after
        self.history.append(change)
        self._log.info(
            "migration phase", before=change.before.value, step=event.value, after=after.value
        )
        return after

    def add_listener(self, listener: PhaseListener) -> None:
        """Tell ``listener`` too, and first (a journal records a step before others act)."""
        self._listeners.insert(0, listener)

    @property
    def undoable(self) -> bool:
        """Whether the guest is still the source's (an abort may undo everything)."""
        return self.phase in UNDOABLE


def mermaid_diagram() -> str:
    """The phase table as a Mermaid state diagram (for the README)."""
    lines = ["stateDiagram-v2", "    [*] --> checking"]
    for (phase, event), after in TRANSITIONS.items():
        lines.append(f"    {phase.value} --> {after.value}: {event.value}")
    lines += [f"    {phase.value} --> [*]" for phase in MigrationPhase if phase in TERMINAL]
    return "\n".join(lines)
