"""A cluster controller as a real process, for the cluster tests: it joins the etcd store
as controller ID over the nodes node-a and node-b under ROOT, holds its shard, takes over a
dead controller's nodes (recovery), and runs the commands it reads on stdin, one JSON
object a line. It prints what happens as JSON lines (``event``: ready, takeover, result,
refused, standing-down).

    python -m tests.cluster_controller URL ID ROOT TTL

A command ``{"do": "migrate", "name": N, "target": T, "policy": P, "hook": H}`` migrates N
under the policy P of ``tests.controller``; the hook H picks the moment to misbehave
(deterministically): ``kill-at-active`` (SIGKILL once the stream is active),
``freeze-at-streaming`` (SIGSTOP to itself as the journal records the stream, before
``migrate`` is sent), or ``none``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread

from kvmflow.engine import Engine, NodeEntry
from kvmflow.engine.controller import ClusterController
from kvmflow.engine.shards import Takeover
from kvmflow.errors import KvmflowError
from kvmflow.instance import Instance, InstanceState
from kvmflow.instance.guard import OperationGuard
from kvmflow.migration import migrate
from kvmflow.migration.phases import PhaseChange
from kvmflow.migration.results import MigrationProgress
from kvmflow.store import Owner
from kvmflow.store.etcd import EtcdStore
from kvmflow.store.url import etcd_target
from kvmflow.testing import local_hypervisors
from tests.controller import POLICIES


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, "at": time.time(), **fields}, default=str), flush=True)


def phase_hook(hook: str) -> Any:
    def on_phase(change: PhaseChange) -> None:
        if hook == "freeze-at-streaming" and change.after.value == "streaming":
            emit("freezing")
            os.kill(os.getpid(), signal.SIGSTOP)
            emit("resumed")

    return on_phase


def progress_hook(hook: str) -> Any:
    def on_progress(report: MigrationProgress) -> None:
        if hook == "kill-at-active" and report.snapshot.status.value == "active":
            os.kill(os.getpid(), signal.SIGKILL)

    return on_progress


class Runner:
    def __init__(self, root: Path, guard: OperationGuard) -> None:
        source, target = local_hypervisors(root, "node-a", "node-b")
        self.hypervisors = {"node-a": source, "node-b": target}
        self.guard = guard

    async def find(self, name: str) -> Instance | None:
        for hv in self.hypervisors.values():
            runtime = await hv.load_runtime(name)
            if runtime is not None and await hv.is_running(name):
                return Instance(runtime.spec, hv, InstanceState.RUNNING, guard=self.guard)
        return None

    async def migrate(self, command: dict[str, Any]) -> None:
        name, hook = command["name"], command.get("hook", "none")
        try:
            instance = await self.find(name)
            if instance is None:
                raise KvmflowError(f"{name} runs on no node")
            result = await migrate(
                instance,
                self.hypervisors[command["target"]],
                target_address="127.0.0.1",
                policy=POLICIES[command["policy"]],
                on_phase=phase_hook(hook),
                on_progress=progress_hook(hook),
            )
        except KvmflowError as exc:
            emit("refused", error=type(exc).__name__, detail=str(exc))
            return
        emit("result", runs_on=command["target"], downtime_ms=result.downtime_ms)


async def commands(runner: Runner, tg: anyio.abc.TaskGroup) -> None:
    while line := await anyio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True):
        if line.strip():
            command = json.loads(line)
            if command["do"] == "migrate":
                tg.start_soon(runner.migrate, command)


async def main(url: str, ident: str, root: str, ttl: int) -> None:
    owner = Owner.this_process(ident)
    store = await EtcdStore.open(etcd_target(url), owner, ttl=ttl, role="controller")
    guard = OperationGuard(store, owner, ttl=ttl)
    runner = Runner(Path(root), guard)
    entries = [NodeEntry(hv, "127.0.0.1") for hv in runner.hypervisors.values()]

    def took_over(takeover: Takeover) -> None:
        emit(
            "takeover",
            nodes=takeover.nodes,
            claimed_at=takeover.claimed_at,
            reports=[
                {"instance": r.instance, "verdict": r.verdict.value, "detail": r.detail}
                for r in takeover.reports
            ],
        )

    async with store, Engine(entries, guard=guard, recover_on_enter=False) as engine:
        controller = ClusterController(
            engine, store, interval=0.3, find_instance=runner.find, on_takeover=took_over
        )
        async with anyio.create_task_group() as tg:
            await tg.start(controller.run)
            emit("ready", held=sorted(controller.keeper.held))
            tg.start_soon(commands, runner, tg)
            await controller.stood_down.wait()
            emit("standing-down", reason=str(controller.reason))
            tg.cancel_scope.cancel()


if __name__ == "__main__":
    import faulthandler

    faulthandler.register(signal.SIGUSR1)
    url, ident, root, ttl = sys.argv[1:5]
    anyio.run(main, url, ident, root, int(ttl))
