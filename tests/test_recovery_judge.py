"""Recovery's judgement, row by row (pure: a recorded migration and two copies in, a plan
out), including the cases no kill test reaches on cue: both copies holding the guest, a
copy that does not answer, a target that may have run and is gone."""

from __future__ import annotations

import pytest

from kvmflow.engine.reality import Copy, CopyState
from kvmflow.engine.recovery import Plan, judge
from kvmflow.errors import RecoveryError
from kvmflow.migration import MigrationPolicy
from kvmflow.migration.adopt import RecordedMigration

S = CopyState


def record(phase: str, **details: object) -> RecordedMigration:
    base: dict[str, object] = {
        "source": "a",
        "target": "b",
        "address": "127.0.0.1",
        "port": 4444,
        "policy": MigrationPolicy().as_record(),
        "was_running": True,
    }
    return RecordedMigration.from_journal("vm", phase, base | details, 0.0)


def copy(node: str, state: CopyState | None, migration: str | None = None) -> Copy | None:
    return None if state is None else Copy("vm", node, state, 1, migration)


CASES = [
    # (phase, extra facts, source state, source migration, target state, plan)
    ("intent", {}, S.RUNNING, None, None, Plan.CLEAN_TARGET),
    ("target-listening", {}, S.RUNNING, None, S.INMIGRATE, Plan.CLEAN_TARGET),
    ("target-listening", {}, S.RUNNING, "active", S.INMIGRATE, Plan.LEAVE),
    ("streaming", {}, S.RUNNING, "active", S.INMIGRATE, Plan.ADOPT),
    ("streaming", {}, None, None, S.INMIGRATE, Plan.CLEAN_TARGET),
    ("aborting", {"from": "streaming"}, S.RUNNING, "active", S.INMIGRATE, Plan.ADOPT),
    ("post-copy", {}, S.POSTMIGRATE, "postcopy-active", S.RUNNING, Plan.ADOPT),
    ("post-copy", {}, S.POSTMIGRATE, "postcopy-active", None, Plan.LEAVE),
    ("post-copy", {}, None, None, S.RUNNING, Plan.LEAVE),
    ("completed-on-source", {}, S.POSTMIGRATE, "completed", S.PAUSED, Plan.ADOPT),
    ("completed-on-source", {}, None, None, S.PAUSED, Plan.RESUME_TARGET),
    ("completed-on-source", {"cont_may_be_sent": True}, None, None, S.RUNNING, Plan.RESUME_TARGET),
    ("completed-on-source", {}, None, None, S.INMIGRATE, Plan.LEAVE),
    (
        "completed-on-source",
        {"cont_may_be_sent": True},
        S.POSTMIGRATE,
        "completed",
        None,
        Plan.LEAVE,
    ),
    ("target-may-run", {}, S.POSTMIGRATE, "completed", S.RUNNING, Plan.FINISH),
    ("target-may-run", {}, S.POSTMIGRATE, "completed", None, Plan.LEAVE),
    ("switched-over", {}, S.POSTMIGRATE, "completed", S.RUNNING, Plan.FINISH),
    ("switched-over", {}, S.RUNNING, "completed", S.RUNNING, Plan.LEAVE),
    ("done", {}, None, None, S.RUNNING, Plan.FINISH),
    ("aborted", {}, S.RUNNING, "cancelled", None, Plan.CLOSE_ABORTED),
    ("stranded", {}, S.POSTMIGRATE, "failed", S.PAUSED, Plan.LEAVE),
    ("streaming", {}, S.UNREACHABLE, None, S.INMIGRATE, Plan.LEAVE),
]


@pytest.mark.parametrize(
    ("phase", "facts", "source", "migration", "target", "plan"),
    CASES,
    ids=[f"{c[0]}-{c[2]}-{c[4]}-{c[5].name}" for c in CASES],
)
def test_judge(
    phase: str,
    facts: dict[str, object],
    source: CopyState | None,
    migration: str | None,
    target: CopyState | None,
    plan: Plan,
) -> None:
    got, why = judge(record(phase, **facts), copy("a", source, migration), copy("b", target))
    assert got is plan, why
    assert why  # every plan says why


def test_an_entry_without_what_recovery_needs_is_refused_touching_nothing() -> None:
    with pytest.raises(RecoveryError, match="incomplete or unreadable"):
        RecordedMigration.from_journal("vm", "streaming", {"source": "a"}, 0.0)
