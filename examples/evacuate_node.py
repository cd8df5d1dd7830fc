"""A batch evacuation script with a custom policy.

Starts four small guests on node-a, plans (dry run) and then runs the evacuation of node-a
onto node-b and node-c with a custom policy: at most two migrations at once per node, a
shared 400 MiB/s link budget on node-a, downtime raised on each pass and auto-converge when
a guest will not converge. Prints the plan and the outcome. Run:
``python examples/evacuate_node.py``.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import anyio

from kvmflow.engine import Engine, Limits
from kvmflow.instance import Instance
from kvmflow.kvm import HvParams, InstanceSpec
from kvmflow.migration import MigrationPolicy
from kvmflow.migration.policy import Action, StallRule, pass_schedule
from kvmflow.testing import local_nodes

POLICY = MigrationPolicy(
    downtime_ms=100,
    downtime_ceiling_ms=1000,
    downtime_schedule=pass_schedule(100, 500, 4),
    stall=StallRule(window_seconds=20, min_progress=0.1),
    stall_actions=(Action.AUTO_CONVERGE, Action.RAISE_DOWNTIME, Action.ABORT),
    seconds_per_gib=300,
    poll_interval=0.2,
)


async def evacuate(root: Path) -> bool:
    nodes = local_nodes(root, "node-a", "node-b", "node-c", link_budgets_mib={"node-a": 400})
    async with Engine(
        nodes, limits=Limits(max_outbound=2, max_inbound=2), default_policy=POLICY
    ) as engine:
        try:
            for n in range(4):
                spec = InstanceSpec(f"evac-{n}", memory_mib=64, hvparams=HvParams(migration_port=0))
                await engine.add_instance(Instance(spec, nodes[0].hypervisor)).start()
            plan = await engine.plan_evacuation("node-a", ["node-b", "node-c"])
            for name, target, memory in plan.moves:
                print(f"plan: {name} ({memory} MiB) -> {target}")
            summary = await engine.evacuate("node-a", ["node-b", "node-c"])
            for name, target in sorted(summary.moved):
                print(f"moved: {name} -> {target}")
            for name, reason in summary.failed:
                print(f"failed: {name}: {reason}")
            print(f"left on node-a: {len(engine.on_node('node-a'))}")
            return summary.ok
        finally:
            for node in nodes:
                for name in await node.hypervisor.list_instances():
                    await node.hypervisor.stop(name, force=True)


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="kvf-evac-"))
    try:
        ok = anyio.run(evacuate, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    raise SystemExit(0 if ok else 3)


if __name__ == "__main__":
    main()
