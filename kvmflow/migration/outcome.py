"""How a migration ended, looked up from where it stood and what the clean-up found.

A failure (an error, a cancel, a bug) hits a migration in some :class:`MigrationPhase`; the
abort then finds out what is left (:class:`Finding`). The pair decides the
:class:`Outcome` through one table, :data:`OUTCOMES`, instead of a chain of conditions, and
each outcome says where the guest runs, which instance event records it, and what the
operator is told.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from kvmflow.instance.states import InstanceEvent
from kvmflow.migration.errors import MigrationError
from kvmflow.migration.phases import MigrationPhase
from kvmflow.migration.status import BadAnswer


class Finding(enum.StrEnum):
    """What the clean-up after a failure found out."""

    SOURCE_KEPT = "source-kept"  # the undo ran; the source has the guest
    SOURCE_DIED = "source-died"  # the source QEMU is gone
    CONTACT_LOST = "contact-lost"  # the source node cannot be asked
    UNDO_FAILED = "undo-failed"  # the source could not take the guest back (or no answer)
    LEFT_AS_IS = "left-as-is"  # past the point of undo: nothing was touched


class Side(enum.StrEnum):
    SOURCE = "source"
    TARGET = "target"
    UNKNOWN = "unknown"


class Outcome(enum.StrEnum):
    MOVED = "moved"
    MOVED_UNFINISHED = "moved-unfinished"  # runs on the target; a finishing step failed
    ABORTED = "aborted"  # still runs on the source
    ABORTED_TARGET_LEFT = "aborted-target-left"  # ... and the target could not be removed
    TAKEN_BACK = "taken-back"  # the target never took over; the source resumed
    SOURCE_DIED = "source-died"
    LOST_CONTACT = "lost-contact"
    POSTCOPY_STRANDED = "postcopy-stranded"
    RUNS_NOWHERE_KNOWN = "runs-nowhere-known"


@dataclass(frozen=True)
class OutcomeInfo:
    """Where the guest runs after an outcome, how the instance records it, what to say."""

    side: Side
    event: InstanceEvent  # for a guest that was running; see :meth:`event_for`
    message: str  # str.format with source, target and cause

    def event_for(self, was_running: bool) -> InstanceEvent:
        if was_running:
            return self.event
        return {
            InstanceEvent.MIGRATED: InstanceEvent.MIGRATED_PAUSED,
            InstanceEvent.MIGRATION_ABORTED: InstanceEvent.MIGRATION_ABORTED_PAUSED,
        }.get(self.event, self.event)


E = InstanceEvent
INFO: dict[Outcome, OutcomeInfo] = {
    Outcome.MOVED: OutcomeInfo(Side.TARGET, E.MIGRATED, "it moved to {target}"),
    Outcome.MOVED_UNFINISHED: OutcomeInfo(
        Side.TARGET,
        E.MIGRATED,
        "the guest moved to {target} and runs there, but finishing failed ({cause}); the "
        "source copy on {source} was ended: check the target's runtime files",
    ),
    Outcome.ABORTED: OutcomeInfo(Side.SOURCE, E.MIGRATION_ABORTED, "{cause}"),
    Outcome.ABORTED_TARGET_LEFT: OutcomeInfo(
        Side.SOURCE,
        E.MIGRATION_ABORTED,
        "{cause}; the target QEMU on {target} could not be removed in time (it never "
        "received the guest): stop it there",
    ),
    Outcome.TAKEN_BACK: OutcomeInfo(
        Side.SOURCE,
        E.MIGRATION_ABORTED,
        "the target on {target} never took over after the copy ({cause}); the source took "
        "the guest back",
    ),
    Outcome.SOURCE_DIED: OutcomeInfo(
        Side.UNKNOWN, E.CRASHED, "{cause}; the source QEMU on {source} is gone"
    ),
    Outcome.LOST_CONTACT: OutcomeInfo(
        Side.UNKNOWN,
        E.CRASHED,
        "lost contact with the source node {source} ({cause}); the target on {target} was "
        "left waiting for the stream: when the source is reachable again, check where the "
        "guest runs and stop the other copy",
    ),
    Outcome.POSTCOPY_STRANDED: OutcomeInfo(
        Side.UNKNOWN,
        E.CRASHED,
        "post-copy failed after the switch ({cause}); the target {target} holds the newest "
        "guest state and the source {source} must not be resumed: restore the link and "
        "resume the migration, or stop both and restore from backup",
    ),
    Outcome.RUNS_NOWHERE_KNOWN: OutcomeInfo(
        Side.UNKNOWN,
        E.CRASHED,
        "{cause}; the guest runs on no node kvmflow can vouch for: check {source} and "
        "{target}, and resume the source only if the target never ran the guest",
    ),
}

P, F = MigrationPhase, Finding

#: (phase the failure hit, what the clean-up found) -> outcome. A missing pair is a bug.
OUTCOMES: dict[tuple[MigrationPhase, Finding], Outcome] = {
    **{
        (phase, finding): outcome
        for phase in (P.CHECKING, P.TARGET_STARTING, P.TARGET_LISTENING, P.STREAMING)
        for finding, outcome in (
            (F.SOURCE_KEPT, Outcome.ABORTED),
            (F.SOURCE_DIED, Outcome.SOURCE_DIED),
            (F.CONTACT_LOST, Outcome.LOST_CONTACT),
            # Before the stream the target holds nothing of the guest; once it streamed,
            # a target that could not be ended may hold part of it.
            (
                F.UNDO_FAILED,
                Outcome.RUNS_NOWHERE_KNOWN if phase is P.STREAMING else Outcome.ABORTED_TARGET_LEFT,
            ),
        )
    },
    (P.COMPLETED_ON_SOURCE, F.SOURCE_KEPT): Outcome.TAKEN_BACK,
    (P.COMPLETED_ON_SOURCE, F.SOURCE_DIED): Outcome.SOURCE_DIED,
    (P.COMPLETED_ON_SOURCE, F.CONTACT_LOST): Outcome.RUNS_NOWHERE_KNOWN,
    (P.COMPLETED_ON_SOURCE, F.UNDO_FAILED): Outcome.RUNS_NOWHERE_KNOWN,
    (P.TARGET_MAY_RUN, F.LEFT_AS_IS): Outcome.RUNS_NOWHERE_KNOWN,
    (P.POSTCOPY, F.LEFT_AS_IS): Outcome.POSTCOPY_STRANDED,
    (P.SWITCHED_OVER, F.LEFT_AS_IS): Outcome.MOVED_UNFINISHED,
}


def outcome_of(phase: MigrationPhase, finding: Finding) -> Outcome:
    """The outcome of a failure that hit ``phase`` and left ``finding``."""
    return OUTCOMES[(phase, finding)]


def outcome_error(
    outcome: Outcome,
    instance: str,
    source: str,
    target: str,
    cause: BaseException | str,
    bad_answers: list[BadAnswer] | None = None,
    target_said: str = "",
) -> MigrationError:
    """The error that tells the caller how the migration of ``instance`` ended and why."""
    info = INFO[outcome]
    runs_on = {Side.SOURCE: source, Side.TARGET: target, Side.UNKNOWN: None}[info.side]
    reason = info.message.format(source=source, target=target, cause=_cause_text(cause))
    return MigrationError(
        instance,
        reason,
        runs_on=runs_on,
        bad_answers=bad_answers,
        outcome=outcome,
        target_said=target_said,
    )


def _cause_text(cause: BaseException | str) -> str:
    if isinstance(cause, str):
        return cause
    if isinstance(cause, MigrationError):
        return cause.reason
    if not isinstance(cause, Exception):  # asyncio's and trio's cancellations, an interrupt
        return "cancelled" if "Cancel" in type(cause).__name__ else type(cause).__name__
    return str(cause) or type(cause).__name__
