"""The migration phase table and the outcome table, checked as data."""

from __future__ import annotations

import pytest

from kvmflow.errors import IllegalPhaseTransitionError
from kvmflow.instance import InstanceEvent
from kvmflow.migration.errors import MigrationError
from kvmflow.migration.outcome import INFO, OUTCOMES, Finding, Outcome, Side, outcome_error
from kvmflow.migration.phases import (
    TERMINAL,
    TRANSITIONS,
    UNDOABLE,
    MigrationPhase,
    PhaseChange,
    PhaseEvent,
    PhaseTracker,
    mermaid_diagram,
)

pytestmark = pytest.mark.anyio


def test_every_phase_is_reachable_and_only_terminal_ones_cannot_be_left() -> None:
    reached = {MigrationPhase.CHECKING} | set(TRANSITIONS.values())
    assert reached == set(MigrationPhase)
    left = {phase for phase, _ in TRANSITIONS}
    assert left == set(MigrationPhase) - TERMINAL
    assert not UNDOABLE & TERMINAL
    assert MigrationPhase.SWITCHED_OVER not in UNDOABLE
    assert MigrationPhase.POSTCOPY not in UNDOABLE


def test_only_undoable_phases_can_abort() -> None:
    aborting = {phase for phase, event in TRANSITIONS if event is PhaseEvent.ABORT}
    assert aborting == UNDOABLE


def test_every_outcome_is_described_and_reachable() -> None:
    assert set(INFO) == set(Outcome)
    assert set(OUTCOMES.values()) | {Outcome.MOVED} == set(Outcome)
    for outcome, info in INFO.items():
        moved = info.side is Side.TARGET
        assert (info.event is InstanceEvent.MIGRATED) is moved, outcome
        if info.side is Side.UNKNOWN:
            assert info.event is InstanceEvent.CRASHED, outcome


def test_past_the_switch_over_nothing_is_ever_undone() -> None:
    for (phase, finding), outcome in OUTCOMES.items():
        if phase in (MigrationPhase.SWITCHED_OVER, MigrationPhase.POSTCOPY):
            assert finding is Finding.LEFT_AS_IS
            assert INFO[outcome].side is not Side.SOURCE, (phase, outcome)


def test_a_paused_guest_keeps_its_pause_in_the_outcome_event() -> None:
    assert INFO[Outcome.MOVED].event_for(False) is InstanceEvent.MIGRATED_PAUSED
    assert INFO[Outcome.ABORTED].event_for(False) is InstanceEvent.MIGRATION_ABORTED_PAUSED
    assert INFO[Outcome.SOURCE_DIED].event_for(False) is InstanceEvent.CRASHED


def test_the_error_says_where_the_guest_runs() -> None:
    error = outcome_error(Outcome.TAKEN_BACK, "vm1", "a", "b", RuntimeError("boom"))
    assert isinstance(error, MigrationError)
    assert (error.runs_on, error.outcome) == ("a", Outcome.TAKEN_BACK)
    assert "the target on b never took over after the copy (boom)" in str(error)
    moved = outcome_error(Outcome.MOVED_UNFINISHED, "vm1", "a", "b", "runtime lost")
    assert moved.runs_on == "b"
    assert "it runs on b" in str(moved)
    lost = outcome_error(
        Outcome.LOST_CONTACT, "vm1", "a", "b", MigrationError("vm1", "x", runs_on=None)
    )
    assert lost.runs_on is None
    assert "lost contact with the source node a (x)" in lost.reason


async def test_the_tracker_refuses_illegal_steps_and_changes_nothing() -> None:
    tracker = PhaseTracker("vm1", "a", "b")
    with pytest.raises(IllegalPhaseTransitionError) as info:
        await tracker.step(PhaseEvent.FINISHED)
    assert "step 'finished' is not allowed in phase 'checking'" in str(info.value)
    assert tracker.phase is MigrationPhase.CHECKING
    assert tracker.history == []


async def test_a_refusing_listener_keeps_the_phase() -> None:
    seen: list[PhaseChange] = []

    def listener(change: PhaseChange) -> None:
        seen.append(change)
        if change.event is PhaseEvent.TARGET_LISTENS:
            raise OSError("disk full")

    tracker = PhaseTracker("vm1", "a", "b", listener)
    assert await tracker.step(PhaseEvent.START_TARGET) is MigrationPhase.TARGET_STARTING
    with pytest.raises(OSError, match="disk full"):
        await tracker.step(PhaseEvent.TARGET_LISTENS)
    assert tracker.phase is MigrationPhase.TARGET_STARTING
    assert [c.event for c in tracker.history] == [PhaseEvent.START_TARGET]
    assert len(seen) == 2


def test_the_diagram_comes_from_the_table() -> None:
    diagram = mermaid_diagram()
    assert diagram.count("-->") == len(TRANSITIONS) + 1 + len(TERMINAL)
    assert "switched-over --> done: finished" in diagram


async def test_a_failing_listener_cannot_stop_a_step_that_records_a_fact() -> None:
    def broken(change: PhaseChange) -> None:
        raise OSError("journal unreachable")

    tracker = PhaseTracker("vm1", "a", "b", broken)
    with pytest.raises(OSError, match="journal unreachable"):
        await tracker.step(PhaseEvent.START_TARGET)  # an intention: refused
    assert await tracker.step(PhaseEvent.ABORT) is MigrationPhase.ABORTING  # facts stand
    assert await tracker.step(PhaseEvent.ABORT_DONE) is MigrationPhase.ABORTED
    assert [c.event for c in tracker.history] == [PhaseEvent.ABORT, PhaseEvent.ABORT_DONE]
