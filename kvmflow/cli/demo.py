"""``kvmflow demo``: two local nodes, several busy guests, all live-migrated at once.

Node A keeps its runtime under one temporary root and listens on 127.0.0.2, node B under
another and 127.0.0.3. The tiny dirtying guest is built with gcc and booted several times on
A, each copy dirtying memory at a different rate; then the engine migrates them all
concurrently to B under the default policy, with progress bars, and a summary table says
how each went. Everything is stopped and removed at the end, also on Ctrl-C.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import anyio
from rich.console import Console

from kvmflow.engine import Engine, Limits
from kvmflow.errors import KvmflowError
from kvmflow.guest import build_dirty_guest, dirty_guest_spec, wait_for_sweeps
from kvmflow.instance import Instance
from kvmflow.kvm import default_accelerator
from kvmflow.migration import MigrationPolicy
from kvmflow.testing.nodes import local_nodes

from .progress import MigrationBars, human_bytes

#: (label, MiB dirtied per sweep, pause between sweeps in thousands of pause instructions)
PROFILES = [("idle", 0, 0), ("light", 8, 2000), ("medium", 24, 0), ("heavy", 48, 0)]


@dataclass
class DemoRow:
    instance: str
    profile: str
    outcome: str
    seconds: float | None = None
    downtime_ms: int | None = None
    moved_bytes: int = 0
    actions: list[str] = field(default_factory=list)


@dataclass
class DemoReport:
    accelerator: str
    rows: list[DemoRow]

    @property
    def ok(self) -> bool:
        return all(row.outcome == "completed" for row in self.rows)


async def run_demo(
    guests: int, console: Console, *, show_progress: bool, bandwidth_mib: int = 32
) -> DemoReport:
    """Run the whole demo and clean up; returns the summary rows."""
    accelerator = default_accelerator()
    root = Path(tempfile.mkdtemp(prefix="kvmflow-demo-"))
    nodes = local_nodes(root, "node-a", "node-b", addresses=("127.0.0.2", "127.0.0.3"))
    say = console.print if show_progress else (lambda *a, **k: None)
    say(
        f"[bold]kvmflow demo[/]: {guests} guests, node-a (127.0.0.2) -> node-b (127.0.0.3), "
        f"{'KVM' if accelerator == 'kvm' else 'TCG (no usable /dev/kvm)'}, "
        f"{bandwidth_mib} MiB/s per migration, default policy"
    )
    rows: list[DemoRow] = []
    try:
        guest = build_dirty_guest()
        policy = MigrationPolicy(bandwidth_mib=bandwidth_mib)
        async with Engine(nodes, limits=Limits(guests, guests), default_policy=policy) as engine:
            profiles: dict[str, str] = {}
            for n in range(guests):
                label, mib, pause = PROFILES[n % len(PROFILES)]
                name = f"demo-{n}-{label}"
                profiles[name] = label
                spec = dirty_guest_spec(name, guest, migration_port=0, mib=mib, pause=pause)
                await engine.add_instance(Instance(spec, nodes[0].hypervisor)).start()
            say(f"booting {guests} guests on node-a ...")
            async with anyio.create_task_group() as tg:
                for name in profiles:
                    tg.start_soon(wait_for_sweeps, nodes[0].hypervisor, name, 1)
            events = engine.events()
            started = time.monotonic()
            tickets = {name: engine.submit_migration(name, "node-b") for name in profiles}
            with MigrationBars(console, enabled=show_progress, total=guests) as bars:
                async with anyio.create_task_group() as tg:

                    async def draw() -> None:
                        async for event in events:
                            bars.handle(event)

                    tg.start_soon(draw)
                    for name, ticket in tickets.items():
                        try:
                            result = await ticket.wait()
                            rows.append(
                                DemoRow(
                                    name,
                                    profiles[name],
                                    "completed",
                                    round(result.elapsed, 2),
                                    result.downtime_ms,
                                    result.final.transferred,
                                    [d.name for d in result.decisions],
                                )
                            )
                        except KvmflowError as exc:
                            rows.append(DemoRow(name, profiles[name], f"failed: {exc}"))
                    await anyio.sleep(0.05)
                    tg.cancel_scope.cancel()
            say(f"all migrations ended after {time.monotonic() - started:.1f} s")
    finally:
        with anyio.CancelScope(shield=True):
            for node in nodes:
                for name in await node.hypervisor.list_instances():
                    await node.hypervisor.stop(name, force=True)
            shutil.rmtree(root, ignore_errors=True)
    return DemoReport(accelerator, rows)


def demo_table(report: DemoReport) -> list[list[str]]:
    """The summary as rows of text (header first)."""
    table = [["instance", "load", "outcome", "time", "downtime", "moved", "policy actions"]]
    for row in report.rows:
        table.append(
            [
                row.instance,
                row.profile,
                row.outcome,
                f"{row.seconds:.1f} s" if row.seconds is not None else "-",
                f"{row.downtime_ms} ms" if row.downtime_ms is not None else "-",
                human_bytes(row.moved_bytes) if row.moved_bytes else "-",
                ", ".join(row.actions) or "-",
            ]
        )
    return table
