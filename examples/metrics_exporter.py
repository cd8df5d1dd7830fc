"""Reacting to the engine's event stream: export migration metrics (Prometheus text format).

Migrates one guest and turns engine events into counters and gauges, then prints them in
the Prometheus exposition format, as a metrics endpoint would serve them. Run:
``python examples/metrics_exporter.py``.
"""

from __future__ import annotations

import shutil
import tempfile
from collections import Counter
from pathlib import Path

import anyio

from kvmflow.engine import (
    Engine,
    EngineEvent,
    MigrationCompleted,
    MigrationFailed,
    MigrationProgressed,
    MigrationStarted,
    PolicyActionTaken,
)
from kvmflow.instance import Instance
from kvmflow.kvm import HvParams, InstanceSpec
from kvmflow.migration import MigrationPolicy
from kvmflow.testing import local_nodes


class Metrics:
    """Counters and gauges fed by engine events."""

    def __init__(self) -> None:
        self.counters: Counter[str] = Counter()
        self.gauges: dict[str, float] = {}

    def observe(self, event: EngineEvent) -> None:
        labels = f'instance="{event.instance}",source="{event.source}",target="{event.target}"'
        if isinstance(event, MigrationStarted):
            self.counters["kvmflow_migrations_started_total"] += 1
        elif isinstance(event, MigrationProgressed) and event.progress is not None:
            snapshot = event.progress.snapshot
            self.gauges[f"kvmflow_migration_remaining_bytes{{{labels}}}"] = snapshot.remaining
            self.gauges[f"kvmflow_migration_throughput_mbps{{{labels}}}"] = snapshot.throughput_mbps
        elif isinstance(event, PolicyActionTaken) and event.decision is not None:
            self.counters[f'kvmflow_policy_actions_total{{action="{event.decision.name}"}}'] += 1
        elif isinstance(event, MigrationCompleted) and event.result is not None:
            self.counters["kvmflow_migrations_completed_total"] += 1
            self.gauges[f"kvmflow_migration_downtime_ms{{{labels}}}"] = (
                event.result.downtime_ms or 0
            )
            self.counters["kvmflow_migrated_bytes_total"] += event.result.final.transferred
        elif isinstance(event, MigrationFailed):
            self.counters["kvmflow_migrations_failed_total"] += 1

    def exposition(self) -> str:
        lines = [f"{name} {value}" for name, value in sorted(self.counters.items())]
        lines += [f"{name} {value:g}" for name, value in sorted(self.gauges.items())]
        return "\n".join(lines)


async def run(root: Path) -> str:
    nodes = local_nodes(root, "node-a", "node-b")
    metrics = Metrics()
    policy = MigrationPolicy.fixed(bandwidth_mib=200, poll_interval=0.05)
    async with Engine(nodes, default_policy=policy) as engine:
        spec = InstanceSpec("metrics-1", memory_mib=64, hvparams=HvParams(migration_port=0))
        await engine.add_instance(Instance(spec, nodes[0].hypervisor)).start()
        events = engine.events()
        ticket = engine.submit_migration("metrics-1", "node-b")
        async with anyio.create_task_group() as tg:

            async def export() -> None:
                async for event in events:
                    metrics.observe(event)

            tg.start_soon(export)
            await ticket.wait()
            await anyio.sleep(0.05)
            tg.cancel_scope.cancel()
        await nodes[1].hypervisor.stop("metrics-1", force=True)
    return metrics.exposition()


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="kvf-metrics-"))
    try:
        print(anyio.run(run, root))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
