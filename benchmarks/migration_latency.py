"""How fast kvmflow notices a finished migration, and what it adds around QEMU's own time.

For idle guests migrated between two local "nodes" (two runtime roots), it measures:

* detection latency: from the ``completed`` MIGRATION event QEMU stamps to the moment the
  watcher holds the ``completed`` answer, with events on (and the default 0.5 s poll) and
  with events off at the ancestor's 2 s poll interval;
* overhead: the whole ``migrate()`` call (target start, checks, watch, resume, source quit)
  divided by QEMU's own ``total-time``.

Run: ``python benchmarks/migration_latency.py [--rounds 5]``. The last line of output is one
JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import anyio
import structlog

from kvmflow.instance import Instance
from kvmflow.kvm import HvParams, InstanceSpec, KvmHypervisor
from kvmflow.migration import MigrationPolicy, MigrationProgress, MigrationStatus, migrate
from kvmflow.testing import local_hypervisors


async def one_migration(
    source: KvmHypervisor, target: KvmHypervisor, name: str, policy: MigrationPolicy
) -> tuple[float, float]:
    """Return (detection latency s, migrate() time / QEMU total-time)."""
    spec = InstanceSpec(name, memory_mib=64, hvparams=HvParams(migration_port=0))
    instance = Instance(spec, source)
    await instance.start()
    noticed: list[float] = []

    def progress(report: MigrationProgress) -> None:
        if report.snapshot.status is MigrationStatus.COMPLETED and not noticed:
            noticed.append(time.time())

    async with source.qmp(name) as qmp:
        with qmp.subscribe("MIGRATION") as events:
            started = time.monotonic()
            result = await migrate(
                instance,
                target,
                target_address="127.0.0.1",
                policy=policy,
                on_progress=progress,
                source_qmp=qmp,
            )
            elapsed = time.monotonic() - started
            completed_at = None
            while events.pending():
                event = await events.receive()
                if event.data.get("status") == "completed":
                    completed_at = event.timestamp
    await target.stop(name, force=True)
    assert completed_at is not None, "no completed MIGRATION event"
    assert noticed, "the watcher never reported completion"
    assert result.total_time_ms is not None, result.final
    return noticed[0] - completed_at, elapsed / (
        max(result.total_time_ms, 1) / 1000
    )  # QEMU may report 0 ms


async def run(rounds: int) -> dict[str, float]:
    root = Path(tempfile.mkdtemp(prefix="kvfb-"))
    try:
        source, target = local_hypervisors(root, "a", "b")
        events_policy = MigrationPolicy.fixed(bandwidth_mib=1000, poll_interval=0.5)
        polling_policy = MigrationPolicy.fixed(
            bandwidth_mib=1000, poll_interval=2.0, wake_on_events=False
        )
        with_events, polling, overhead = [], [], []
        for n in range(rounds):
            latency, ratio = await one_migration(source, target, f"bench-e{n}", events_policy)
            with_events.append(latency)
            overhead.append(ratio)
            latency, _ = await one_migration(source, target, f"bench-p{n}", polling_policy)
            polling.append(latency)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {
        "detect_ms_events": round(statistics.median(with_events) * 1000, 1),
        "detect_ms_poll_2s": round(statistics.median(polling) * 1000, 1),
        "migrate_over_qemu_total_time": round(statistics.median(overhead), 2),
        "rounds": rounds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    result = anyio.run(run, args.rounds)
    for key, value in result.items():
        print(f"{key:>32}: {value}", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
