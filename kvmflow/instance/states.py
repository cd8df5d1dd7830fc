"""The orchestration states of an instance and every legal transition, as one table.

This is kvmflow's view of an instance (where it runs, what is being done to it); QEMU's own
run state, the migration status and the monitor connection state are separate enums
(:class:`~kvmflow.monitor.queries.RunState`, :class:`~kvmflow.migration.status.
MigrationStatus`, :class:`~kvmflow.monitor.connection.ConnectionState`). The README's state
diagram is drawn from :data:`TRANSITIONS` by :func:`mermaid_diagram`.
"""

from __future__ import annotations

import enum


class InstanceState(enum.StrEnum):
    DEFINED = "defined"  # known, no process anywhere
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    MIGRATING = "migrating"  # a copy is being moved to another node
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"  # the process died or an operation left it unknown


class InstanceEvent(enum.StrEnum):
    START = "start"
    STARTED = "started"
    START_FAILED = "start-failed"
    PAUSE = "pause"
    RESUME = "resume"
    MIGRATE = "migrate"
    MIGRATED = "migrated"  # the instance now runs on the target node
    MIGRATED_PAUSED = "migrated-paused"  # ... and stays paused there, as it was
    MIGRATION_ABORTED = "migration-aborted"  # it still runs on the source node
    MIGRATION_ABORTED_PAUSED = "migration-aborted-paused"  # ... still paused there
    STOP = "stop"
    STOPPED = "stopped"
    STOP_FAILED = "stop-failed"  # the process survived; the guest runs on
    STOP_FAILED_PAUSED = "stop-failed-paused"  # ... and stays paused, as it was
    CRASHED = "crashed"
    RECOVER = "recover"  # checked: no process is left, the instance is stopped


S, E = InstanceState, InstanceEvent

#: (state, event) -> next state. Anything not listed is illegal.
TRANSITIONS: dict[tuple[InstanceState, InstanceEvent], InstanceState] = {
    (S.DEFINED, E.START): S.STARTING,
    (S.STOPPED, E.START): S.STARTING,
    (S.STARTING, E.STARTED): S.RUNNING,
    (S.STARTING, E.START_FAILED): S.STOPPED,
    (S.RUNNING, E.PAUSE): S.PAUSED,
    (S.PAUSED, E.RESUME): S.RUNNING,
    (S.RUNNING, E.MIGRATE): S.MIGRATING,
    (S.PAUSED, E.MIGRATE): S.MIGRATING,
    (S.MIGRATING, E.MIGRATED): S.RUNNING,
    (S.MIGRATING, E.MIGRATED_PAUSED): S.PAUSED,
    (S.MIGRATING, E.MIGRATION_ABORTED): S.RUNNING,
    (S.MIGRATING, E.MIGRATION_ABORTED_PAUSED): S.PAUSED,
    (S.RUNNING, E.STOP): S.STOPPING,
    (S.PAUSED, E.STOP): S.STOPPING,
    (S.STOPPING, E.STOPPED): S.STOPPED,
    (S.STOPPING, E.STOP_FAILED): S.RUNNING,
    (S.STOPPING, E.STOP_FAILED_PAUSED): S.PAUSED,
    (S.RUNNING, E.CRASHED): S.FAILED,
    (S.PAUSED, E.CRASHED): S.FAILED,
    (S.MIGRATING, E.CRASHED): S.FAILED,
    (S.STOPPING, E.CRASHED): S.STOPPED,
    (S.FAILED, E.RECOVER): S.STOPPED,
    (S.FAILED, E.START): S.STARTING,
}


def next_state(state: InstanceState, event: InstanceEvent) -> InstanceState | None:
    """The state ``event`` leads to from ``state``, or ``None`` if it is illegal."""
    return TRANSITIONS.get((state, event))


def mermaid_diagram() -> str:
    """The transition table as a Mermaid state diagram (for the README)."""
    lines = ["stateDiagram-v2", "    [*] --> defined"]
    for (state, event), target in TRANSITIONS.items():
        lines.append(f"    {state.value} --> {target.value}: {event.value}")
    return "\n".join(lines)
