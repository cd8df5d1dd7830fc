"""Embedding kvmflow in a controller: the same code on asyncio and on trio (via anyio).

The controller owns an Engine with two local nodes, starts two small guests on node-a,
watches the engine's event stream, and moves both guests to node-b. Run:
``python examples/controller.py [asyncio|trio]``.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import anyio

from kvmflow.engine import Engine, MigrationCompleted
from kvmflow.instance import Instance
from kvmflow.kvm import HvParams, InstanceSpec
from kvmflow.migration import MigrationPolicy
from kvmflow.testing import local_nodes


async def controller(root: Path) -> list[str]:
    nodes = local_nodes(root, "node-a", "node-b")
    policy = MigrationPolicy.fixed(bandwidth_mib=500, poll_interval=0.1)
    moved: list[str] = []
    async with Engine(nodes, default_policy=policy) as engine:
        for n in range(2):
            spec = InstanceSpec(f"ctl-{n}", memory_mib=64, hvparams=HvParams(migration_port=0))
            await engine.add_instance(Instance(spec, nodes[0].hypervisor)).start()
        events = engine.events()

        async def watch() -> None:
            async for event in events:
                if isinstance(event, MigrationCompleted):
                    moved.append(event.instance)
                    print(f"{event.instance}: {event.source} -> {event.target}")
                    if len(moved) == 2:
                        return

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            for n in range(2):
                engine.submit_migration(f"ctl-{n}", "node-b")
        for name in moved:
            print(f"{name} now runs on {engine.where(name)}")
        for node in nodes:
            for name in await node.hypervisor.list_instances():
                await node.hypervisor.stop(name, force=True)
    return moved


def main() -> None:
    backend = sys.argv[1] if len(sys.argv) > 1 else "asyncio"
    root = Path(tempfile.mkdtemp(prefix="kvf-ctl-"))
    try:
        anyio.run(controller, root, backend=backend)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
