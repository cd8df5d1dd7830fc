"""The migration's phases against real QEMU: the record of a move, failures and cancels at
chosen phases (a listener hook picks the moment), and finishing that always completes."""

from __future__ import annotations

import os
import shutil
import socket
from typing import Any

import anyio
import anyio.lowlevel
import psutil
import pytest

from kvmflow.instance import Instance, InstanceState
from kvmflow.kvm import HvParams, InstanceSpec, KvmHypervisor
from kvmflow.migration import (
    MigrationError,
    MigrationPhase,
    MigrationPolicy,
    MigrationProgress,
    Outcome,
    PhaseChange,
    PhaseEvent,
    migrate,
)
from kvmflow.monitor import RunState, query_status
from kvmflow.node import LocalNode

pytestmark = pytest.mark.anyio

FAST = MigrationPolicy.fixed(bandwidth_mib=1000, downtime_ms=300, poll_interval=0.2)
MOVE = [
    PhaseEvent.START_TARGET,
    PhaseEvent.TARGET_LISTENS,
    PhaseEvent.STREAM,
    PhaseEvent.SOURCE_COMPLETED,
    PhaseEvent.TARGET_TOOK_OVER,
    PhaseEvent.FINISHED,
]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def started(name: str, hv: KvmHypervisor) -> Instance:
    instance = Instance(InstanceSpec(name, memory_mib=64, hvparams=HvParams(migration_port=0)), hv)
    await instance.start()
    return instance


async def run_state(hv: KvmHypervisor, name: str) -> RunState:
    async with hv.qmp(name) as qmp:
        return (await query_status(qmp)).state


async def assert_moved(instance: Instance, source: KvmHypervisor, target: KvmHypervisor) -> None:
    """Exactly one copy: running on the target, nothing left of it on the source."""
    assert instance.machine.state is InstanceState.RUNNING
    assert instance.machine.node == "node-b"
    assert instance.hypervisor is target
    assert await run_state(target, instance.name) is RunState.RUNNING
    assert not await source.is_running(instance.name)
    assert os.listdir(source.paths.dir("pid")) == []


async def test_a_move_records_every_phase_and_the_listener_sees_each_first(
    nodes: tuple[KvmHypervisor, KvmHypervisor],
) -> None:
    source, target = nodes
    instance = await started("ph-move", source)
    seen: list[PhaseChange] = []

    async def listener(change: PhaseChange) -> None:
        # Write-ahead: the listener sees a step before it is taken.
        seen.append(change)
        await anyio.lowlevel.checkpoint()

    result = await migrate(
        instance, target, target_address="127.0.0.1", policy=FAST, on_phase=listener
    )
    assert [c.event for c in result.phases] == MOVE
    assert seen == list(result.phases)
    assert result.phases[-1].after is MigrationPhase.DONE
    assert {(c.instance, c.source, c.target) for c in seen} == {("ph-move", "node-a", "node-b")}
    assert result.total_time_ms  # QEMU's real figure, never a 0 it did not mean
    await assert_moved(instance, source, target)


async def test_a_listener_that_fails_stops_the_migration_before_its_step(
    nodes: tuple[KvmHypervisor, KvmHypervisor],
) -> None:
    source, target = nodes
    instance = await started("ph-refuse", source)

    def listener(change: PhaseChange) -> None:
        if change.event is PhaseEvent.STREAM:
            raise RuntimeError("journal unwritable")

    with pytest.raises(RuntimeError, match="journal unwritable"):  # a bug is not translated
        await migrate(instance, target, target_address="127.0.0.1", policy=FAST, on_phase=listener)
    async with source.qmp("ph-refuse") as qmp:
        assert await qmp.execute("query-migrate") == {}  # `migrate` was never sent
        assert (await query_status(qmp)).state is RunState.RUNNING
    assert not await target.is_running("ph-refuse")
    assert os.listdir(target.paths.dir("pid")) == []
    assert instance.machine.state is InstanceState.RUNNING
    assert instance.machine.node == "node-a"


async def test_target_runtime_lost_while_finishing_still_ends_on_the_target(
    nodes: tuple[KvmHypervisor, KvmHypervisor],
) -> None:
    # Once the target runs the guest, nothing is undone: a failed finishing step is reported
    # with the guest recorded on the target, and the source copy is ended all the same.
    source, target = nodes
    instance = await started("ph-finish", source)

    def lose_target_runtime_dir(report: MigrationProgress) -> None:
        shutil.rmtree(target.paths.dir("conf"), ignore_errors=True)

    with pytest.raises(MigrationError) as info:
        await migrate(
            instance,
            target,
            target_address="127.0.0.1",
            policy=FAST,
            on_progress=lose_target_runtime_dir,
        )
    assert info.value.outcome is Outcome.MOVED_UNFINISHED
    assert info.value.runs_on == "node-b"
    assert "runtime was not saved" in info.value.reason
    await assert_moved(instance, source, target)
    await instance.stop(force=True)  # the instance is usable, not stuck in `migrating`
    assert instance.machine.state is InstanceState.STOPPED
    assert not await target.is_running("ph-finish")


async def test_a_cancel_just_after_completion_waits_for_the_finish(
    nodes: tuple[KvmHypervisor, KvmHypervisor],
) -> None:
    source, target = nodes
    instance = await started("ph-cancel", source)
    steps: list[PhaseEvent] = []
    with anyio.CancelScope() as scope:

        def cancel_at_completion(change: PhaseChange) -> None:
            steps.append(change.event)
            if change.event is PhaseEvent.SOURCE_COMPLETED:
                scope.cancel()

        await migrate(
            instance,
            target,
            target_address="127.0.0.1",
            policy=FAST,
            on_phase=cancel_at_completion,
        )
    assert scope.cancelled_caught  # the cancel still reaches the caller...
    assert steps == MOVE  # ...after the migration finished
    await assert_moved(instance, source, target)


async def test_a_cancel_while_the_target_starts_leaves_nothing(
    nodes: tuple[KvmHypervisor, KvmHypervisor],
) -> None:
    source, target = nodes
    instance = await started("ph-early", source)
    with anyio.CancelScope() as scope:

        def cancel_when_listening(change: PhaseChange) -> None:
            if change.event is PhaseEvent.TARGET_LISTENS:
                scope.cancel()

        await migrate(
            instance,
            target,
            target_address="127.0.0.1",
            policy=FAST,
            on_phase=cancel_when_listening,
        )
    assert scope.cancelled_caught
    assert not await target.is_running("ph-early")
    assert os.listdir(target.paths.dir("pid")) == []
    assert await run_state(source, "ph-early") is RunState.RUNNING
    assert instance.machine.state is InstanceState.RUNNING
    assert instance.machine.node == "node-a"


class LosesRuntimeDirOnStart(LocalNode):
    """A node on which the runtime directory is removed just after QEMU daemonized."""

    def __init__(self, name: str, root: str) -> None:
        super().__init__(name)
        self.root = root

    async def run(self, argv: list[str], **kwargs: Any) -> Any:
        result = await super().run(argv, **kwargs)
        if "-daemonize" in argv:
            shutil.rmtree(self.root, ignore_errors=True)
        return result


async def test_a_target_whose_runtime_dir_vanished_while_starting_is_not_orphaned(
    nodes: tuple[KvmHypervisor, KvmHypervisor],
) -> None:
    source, plain_target = nodes
    target = KvmHypervisor(
        LosesRuntimeDirOnStart("node-b", plain_target.paths.root), plain_target.paths
    )
    instance = await started("ph-orphan", source)
    with pytest.raises(MigrationError) as info:
        await migrate(instance, target, target_address="127.0.0.1", policy=FAST)
    assert info.value.runs_on == "node-a"
    assert info.value.outcome is Outcome.ABORTED
    # The target QEMU had no pid file any more; it was found by its command line and ended.
    pid_file = plain_target.paths.pid_file("ph-orphan")
    assert [
        p.pid for p in psutil.process_iter(["cmdline"]) if pid_file in (p.info["cmdline"] or ())
    ] == []
    assert await run_state(source, "ph-orphan") is RunState.RUNNING
    assert instance.machine.state is InstanceState.RUNNING


async def test_a_journal_that_fails_every_write_stops_the_migration_cleanly(
    nodes: tuple[KvmHypervisor, KvmHypervisor],
) -> None:
    source, target = nodes
    instance = await started("ph-journal", source)
    attempts: list[PhaseEvent] = []

    def unwritable(change: PhaseChange) -> None:
        attempts.append(change.event)
        raise OSError("journal unreachable")

    with pytest.raises(OSError, match="journal unreachable"):
        await migrate(
            instance, target, target_address="127.0.0.1", policy=FAST, on_phase=unwritable
        )
    # Refused before the target was started; the abort's own steps still ran to the end.
    assert attempts == [PhaseEvent.START_TARGET, PhaseEvent.ABORT, PhaseEvent.ABORT_DONE]
    assert not await target.is_running("ph-journal")
    assert await run_state(source, "ph-journal") is RunState.RUNNING
    assert instance.machine.state is InstanceState.RUNNING


class StopHangs(KvmHypervisor):
    """A node whose stop never returns (an SSH command without a timeout, a stuck disk)."""

    async def stop(self, name: str, **kwargs: Any) -> None:
        await anyio.sleep_forever()


async def test_an_abort_that_hangs_ends_within_its_deadline_and_says_what_is_left(
    nodes: tuple[KvmHypervisor, KvmHypervisor], free_port: int
) -> None:
    source, plain_target = nodes
    target = StopHangs(plain_target.node, plain_target.paths)
    instance = await started("ph-hang", source)
    policy = FAST.with_changes(cleanup_timeout=1.0)
    with socket.socket() as squatter:  # the target cannot listen: the abort must undo it
        squatter.bind(("127.0.0.1", free_port))
        squatter.listen()
        with anyio.fail_after(30), pytest.raises(MigrationError) as info:
            await migrate(
                instance, target, target_address="127.0.0.1", port=free_port, policy=policy
            )
    assert info.value.outcome is Outcome.ABORTED_TARGET_LEFT
    assert info.value.runs_on == "node-a"
    assert "could not be removed in time" in info.value.reason
    assert await run_state(source, "ph-hang") is RunState.RUNNING
    assert instance.machine.state is InstanceState.RUNNING
    await plain_target.stop("ph-hang", force=True)  # what the operator is told to do
    assert not await plain_target.is_running("ph-hang")
