"""Cost of the journal per migration phase: a phase step of the real
:class:`~kvmflow.migration.phases.PhaseTracker` with the store's journal listener (what a
migration under a guard does) against the same step with no store, and the bare store
write against the worker-thread hop every store call makes anyway, all in one run,
alternating so that each sees the same machine.

Prints the medians and p99s in microseconds, and the ratios, as one JSON line. The store
file lives in a temporary directory on the machine's own disk (``--dir`` to choose), since
``synchronous=FULL`` makes every commit wait for the disk.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import anyio
import anyio.to_thread
import structlog

from kvmflow.migration.phases import PhaseChange, PhaseEvent, PhaseTracker
from kvmflow.store import Owner, SQLiteStore


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


async def run(count: int, directory: str | None) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="kvfs-", dir=directory) as root:
        async with await SQLiteStore.open(Path(root) / "store.sqlite") as store:
            lease = await store.acquire("bench", Owner.this_process("bench"), "migrate", 3600)
            entry = await store.begin(lease, "checking", {"source": "a", "target": "b"})
            hop: list[float] = []
            write: list[float] = []
            bare_step: list[float] = []
            journaled_step: list[float] = []

            async def journal(change: PhaseChange) -> None:
                """What a migration under a guard does with each step (HeldOperation.phase)."""
                nonlocal entry
                entry = await store.record_phase(
                    lease, entry, change.after.value, {"step": change.event.value}
                )

            for n in range(count):  # alternate, so that all see the same machine
                started = time.perf_counter()
                await anyio.to_thread.run_sync(lambda: None)
                hop.append((time.perf_counter() - started) * 1e6)
                started = time.perf_counter()
                entry = await store.record_phase(lease, entry, "streaming", {"n": n})
                write.append((time.perf_counter() - started) * 1e6)
                bare = PhaseTracker("bench", "a", "b")
                started = time.perf_counter()
                await bare.step(PhaseEvent.START_TARGET)
                bare_step.append((time.perf_counter() - started) * 1e6)
                journaled = PhaseTracker("bench", "a", "b")
                journaled.add_listener(journal)
                started = time.perf_counter()
                await journaled.step(PhaseEvent.START_TARGET)
                journaled_step.append((time.perf_counter() - started) * 1e6)
    result = {
        "hop_median_us": round(statistics.median(hop), 1),
        "hop_p99_us": round(percentile(hop, 0.99), 1),
        "write_median_us": round(statistics.median(write), 1),
        "write_p99_us": round(percentile(write, 0.99), 1),
    }
    result |= {
        "step_no_store_median_us": round(statistics.median(bare_step), 1),
        "step_no_store_p99_us": round(percentile(bare_step, 0.99), 1),
        "step_journaled_median_us": round(statistics.median(journaled_step), 1),
        "step_journaled_p99_us": round(percentile(journaled_step, 0.99), 1),
    }
    result["write_over_hop_median"] = round(result["write_median_us"] / result["hop_median_us"], 1)
    result["journal_cost_per_phase_median_us"] = round(
        result["step_journaled_median_us"] - result["step_no_store_median_us"], 1
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--dir", default=None, help="where the temporary store goes")
    args = parser.parse_args()
    # As an embedding application would: the library's info lines are not printed.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    result = anyio.run(run, args.count, args.dir)
    for name, value in result.items():
        print(f"{name:>24}: {value}", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
