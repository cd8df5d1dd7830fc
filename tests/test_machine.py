"""The instance state machine: the table, illegal events, observers, one owner at a time."""

from __future__ import annotations

import anyio
import pytest
from structlog.testing import capture_logs

from kvmflow.errors import DeadlineError
from kvmflow.instance import (
    TRANSITIONS,
    IllegalTransitionError,
    InstanceBusyError,
    InstanceEvent,
    InstanceMachine,
    InstanceState,
    mermaid_diagram,
)
from kvmflow.instance.machine import Transition

pytestmark = pytest.mark.anyio


def test_every_state_is_reachable_and_can_be_left() -> None:
    targets = {target for target in TRANSITIONS.values()}
    sources = {state for state, _ in TRANSITIONS}
    assert set(InstanceState) - {InstanceState.DEFINED} <= targets
    assert set(InstanceState) <= sources


def test_illegal_event_names_state_and_event_and_changes_nothing() -> None:
    machine = InstanceMachine("vm1", "node-a")
    with pytest.raises(IllegalTransitionError) as info:
        machine.fire(InstanceEvent.MIGRATE)
    assert info.value.state is InstanceState.DEFINED
    assert info.value.event is InstanceEvent.MIGRATE
    assert "'migrate' is not allowed in state 'defined'" in str(info.value)
    assert machine.state is InstanceState.DEFINED
    assert list(machine.history) == []


def test_transitions_are_logged_with_instance_and_node() -> None:
    machine = InstanceMachine("vm1", "node-a")
    with capture_logs() as logs:
        machine.fire(InstanceEvent.START)
        machine.fire(InstanceEvent.STARTED)
        machine.fire(InstanceEvent.MIGRATE)
        machine.fire(InstanceEvent.MIGRATED, node="node-b")
    assert [(e["before"], e["trigger"], e["after"], e["node"]) for e in logs] == [
        ("defined", "start", "starting", "node-a"),
        ("starting", "started", "running", "node-a"),
        ("running", "migrate", "migrating", "node-a"),
        ("migrating", "migrated", "running", "node-b"),
    ]
    assert machine.node == "node-b"


async def test_observers_wait_for_states_and_changes() -> None:
    machine = InstanceMachine("vm1", "node-a")
    changes: list[Transition] = []
    reached: list[InstanceState] = []

    async def watcher() -> None:
        changes.append(await machine.next_change(timeout=5))
        reached.append(await machine.wait_for(InstanceState.RUNNING, timeout=5))

    async with anyio.create_task_group() as tg:
        tg.start_soon(watcher)
        await anyio.wait_all_tasks_blocked()  # the watcher waits for the first change
        machine.fire(InstanceEvent.START)
        await anyio.wait_all_tasks_blocked()  # ... and now for RUNNING
        assert reached == []
        machine.fire(InstanceEvent.STARTED)
    assert changes[0].after is InstanceState.STARTING
    assert reached == [InstanceState.RUNNING]
    with pytest.raises(DeadlineError, match="to be stopped"):
        await machine.wait_for(InstanceState.STOPPED, timeout=0.05)


async def test_second_operation_is_refused_while_one_runs() -> None:
    machine = InstanceMachine("vm1", "node-a", InstanceState.RUNNING)
    async with machine.operation_scope("migrate"):
        with pytest.raises(InstanceBusyError, match="busy with 'migrate'; 'stop' refused"):
            async with machine.operation_scope("stop"):
                pass
    async with machine.operation_scope("stop"):
        assert machine.operation == "stop"
    assert machine.operation is None


def test_mermaid_diagram_comes_from_the_table() -> None:
    diagram = mermaid_diagram()
    assert diagram.startswith("stateDiagram-v2")
    assert diagram.count("-->") == len(TRANSITIONS) + 1
    assert "running --> migrating: migrate" in diagram


def test_readme_diagram_is_the_transition_table() -> None:
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert f"```mermaid\n{mermaid_diagram()}\n```" in readme


def test_history_keeps_the_newest_transitions_only() -> None:
    from kvmflow.instance.machine import HISTORY_LENGTH

    machine = InstanceMachine("vm1", "node-a", InstanceState.RUNNING)
    for _ in range(HISTORY_LENGTH * 3):
        machine.fire(InstanceEvent.PAUSE)
        machine.fire(InstanceEvent.RESUME)
    assert len(machine.history) == HISTORY_LENGTH
    assert machine.history[-1].event is InstanceEvent.RESUME


def test_a_failed_stop_of_a_paused_instance_leaves_it_paused() -> None:
    machine = InstanceMachine("vm1", "node-a", InstanceState.PAUSED)
    machine.fire(InstanceEvent.STOP)
    assert machine.fire(InstanceEvent.STOP_FAILED_PAUSED) is InstanceState.PAUSED


def test_readme_phase_diagram_is_the_phase_table() -> None:
    from pathlib import Path

    from kvmflow.migration.phases import mermaid_diagram as phase_diagram

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert f"```mermaid\n{phase_diagram()}\n```" in readme
