"""A controller as a real process, for the kill tests: it migrates one instance under the
store's leases and kills itself with SIGKILL at a chosen point (a hook on a phase, a
progress report or a policy action: chosen deterministically, never by a sleep), or runs
recovery and prints its reports as JSON lines.

    python tests/controller.py migrate STORE ROOT NAME POLICY KILL_AT
    python tests/controller.py recover STORE ROOT [KILL_AT] [--abort]
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import anyio

from kvmflow.engine.recovery import Recovery
from kvmflow.instance import Instance, InstanceState
from kvmflow.instance.guard import OperationGuard
from kvmflow.migration import MigrationPolicy, migrate
from kvmflow.migration.phases import PhaseChange
from kvmflow.migration.policy import Action, Capabilities, DowntimeStep, StallRule
from kvmflow.migration.results import MigrationProgress
from kvmflow.monitor import QMPClient
from kvmflow.store import Owner, SQLiteStore
from kvmflow.testing import local_hypervisors

#: The policies the kill points need (each converges, or not, as its point wants).
POLICIES: dict[str, MigrationPolicy] = {
    # converges in a few seconds: the stream is seen active first
    "converging": MigrationPolicy.fixed(bandwidth_mib=30, downtime_ms=300, poll_interval=0.1),
    # a downtime step after 0.1 s: a policy action while streaming
    "stepping": MigrationPolicy.fixed(
        bandwidth_mib=30,
        downtime_ms=300,
        poll_interval=0.1,
        downtime_ceiling_ms=600,
        downtime_schedule=(DowntimeStep(400, after_seconds=0.1),),
    ),
    # does not converge; the stall rule switches to post-copy
    "postcopy": MigrationPolicy(
        bandwidth_mib=20,
        downtime_ms=50,
        poll_interval=0.25,
        downtime_schedule=(),
        seconds_per_gib=None,
        stall=StallRule(2, 0.1),
        stall_actions=(Action.POSTCOPY,),
        capabilities=Capabilities(postcopy_ram=True),
    ),
    # does not converge and has no deadline: streams until someone decides
    "endless": MigrationPolicy.fixed(bandwidth_mib=5, downtime_ms=20, poll_interval=0.1),
    # copies a local disk at 4 MiB/s: the copy is seen under way long before it is ready
    "slow-disks": MigrationPolicy.fixed(bandwidth_mib=4, downtime_ms=300, poll_interval=0.1),
    # does not converge; the deadline (1 s) aborts it
    "aborting": MigrationPolicy.fixed(
        bandwidth_mib=5,
        downtime_ms=20,
        poll_interval=0.1,
        seconds_per_gib=0.01,
        deadline_floor_seconds=1.0,
        deadline_actions=(Action.ABORT,),
    ),
}


def die() -> None:
    """The controller's crash: no clean-up of any kind runs."""
    os.kill(os.getpid(), signal.SIGKILL)


def phase_hook(kill_at: str) -> Any:
    def hook(change: PhaseChange) -> None:
        if change.after.value == kill_at:
            die()

    return hook


def progress_hook(kill_at: str) -> Any:
    def hook(report: MigrationProgress) -> None:
        if kill_at == "active" and report.snapshot.status.value == "active":
            die()
        if kill_at == "policy-action" and report.decisions:
            die()

    return hook


async def die_once_copying(qmp: QMPClient) -> None:
    while not any(job["offset"] > 0 for job in await qmp.execute("query-block-jobs")):
        await anyio.sleep(0.05)
    die()


async def run_migration(store_path: str, root: str, name: str, policy: str, kill_at: str) -> None:
    source, target = local_hypervisors(Path(root), "node-a", "node-b")
    runtime = await source.load_runtime(name)
    assert runtime is not None, f"{name} does not run on node-a"
    async with await SQLiteStore.open(store_path) as store:
        guard = OperationGuard(store, Owner.this_process("doomed-controller"), ttl=30)
        instance = Instance(runtime.spec, source, InstanceState.RUNNING, guard=guard)
        print("migrating", flush=True)
        async with source.qmp(name) as qmp, anyio.create_task_group() as tg:
            if kill_at == "disk-copying":  # once the copy of its local disk is under way
                tg.start_soon(die_once_copying, qmp)
            await migrate(
                instance,
                target,
                target_address="127.0.0.1",
                policy=POLICIES[policy],
                on_phase=phase_hook(kill_at),
                on_progress=progress_hook(kill_at),
                source_qmp=qmp,
            )
    print("the kill point was never reached", flush=True)
    sys.exit(3)


async def run_recovery(store_path: str, root: str, kill_at: str | None, abort: bool) -> None:
    source, target = local_hypervisors(Path(root), "node-a", "node-b")
    async with await SQLiteStore.open(store_path) as store:
        guard = OperationGuard(store, Owner.this_process("recovery"), ttl=30)
        recovery = Recovery(
            {"node-a": source, "node-b": target},
            guard,
            abort=abort,
            clean_orphans=True,
            on_phase=phase_hook(kill_at) if kill_at else None,
        )
        for report in await recovery.run():
            print(
                json.dumps(
                    {
                        "instance": report.instance,
                        "verdict": report.verdict.value,
                        "detail": report.detail,
                        "runs_on": report.runs_on,
                    }
                ),
                flush=True,
            )


def main(argv: list[str]) -> None:
    if argv[0] == "migrate":
        store, root, name, policy, kill_at = argv[1:6]
        anyio.run(run_migration, store, root, name, policy, kill_at)
    elif argv[0] == "recover":
        rest = [a for a in argv[3:] if a != "--abort"]
        anyio.run(run_recovery, argv[1], argv[2], rest[0] if rest else None, "--abort" in argv)
    else:
        raise SystemExit(f"unknown mode {argv[0]!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
