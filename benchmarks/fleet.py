"""The fleet at scale: 1,000 concurrent migrations through the real engine.

The QEMUs are simulated by ``kvmflow.testing.fleet`` in a separate process (so its CPU is
not counted as the engine's); everything else is real: the engine, the migration coroutine,
the policy engine, one QMP connection per source monitor, MIGRATION events and polling.
Guests of 1 to 3 GiB move at 100 MiB/s while dirtying 8 MiB/s, so completions spread over
about 20 s. Reported: engine CPU seconds per migration, the engine's share of one core
while all migrations are in flight (polling every 0.5 s, before the first completes), peak
memory, and the delay between the fleet completing a migration and the engine's completed
event (median and p99). The in-flight window runs from the moment every migration is being
watched (past its setup) to the first completion.

Each run is made twice, each in its own process: with CPython's garbage collector as the
process found it (``default``) and after :func:`kvmflow.tuning.tune_gc_for_fleet`
(``tuned``, what the kvmflow CLI does), because full collections of the ~400k objects
that 1,000 in-flight migrations hold stop the event loop for ~200 ms.

With ``--store on`` every migration runs under a lease in a SQLite store of record (on the
machine's disk: the intent, every phase, the placement and the outcome written before acting,
``synchronous=FULL``; leases renewed, cancel requests polled and progress written in the
guard's shared rounds). ``--store both`` (the default) runs tuned with and without it and
reports the ratios of the two.

Run: ``python benchmarks/fleet.py [--migrations 1000] [--gc both|default|tuned]
[--store both|on|off]``. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
import structlog

from kvmflow.engine import Engine, Limits, MigrationCompleted, MigrationProgressed, NodeEntry
from kvmflow.instance import Instance
from kvmflow.instance.guard import OperationGuard
from kvmflow.kvm import HvParams, InstanceSpec, KvmHypervisor, RuntimePaths
from kvmflow.migration import MigrationPolicy
from kvmflow.store import Owner, SQLiteStore
from kvmflow.testing.fleet import FakeNode, fleet_process
from kvmflow.tuning import tune_gc_for_fleet

PER_NODE = 20


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def system_seconds() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_stime


async def run(
    migrations: int, control: str, root: Path, tuned: bool, with_store: bool
) -> dict[str, float]:
    async with contextlib.AsyncExitStack() as stack:
        guard = None
        if with_store:
            store = await stack.enter_async_context(await SQLiteStore.open(root / "store.sqlite"))
            guard = OperationGuard(store, Owner.this_process("bench-fleet"))
        return await run_fleet(migrations, control, root, tuned, guard)


async def run_fleet(
    migrations: int, control: str, root: Path, tuned: bool, guard: OperationGuard | None
) -> dict[str, float]:
    node_count = max(1, -(-migrations // PER_NODE))  # every migration has a node pair
    sources = [FakeNode(f"src{n}", control, dirty_rate=8 << 20) for n in range(node_count)]
    targets = [FakeNode(f"dst{n}", control) for n in range(node_count)]
    entries = [
        NodeEntry(KvmHypervisor(node, RuntimePaths(str(root / node.name))), "127.0.0.1")
        for node in (*sources, *targets)
    ]
    policy = MigrationPolicy.fixed(bandwidth_mib=100, downtime_ms=300, poll_interval=0.5)
    limits = Limits(max_outbound=PER_NODE, max_inbound=PER_NODE)
    completed_at: dict[str, float] = {}
    watching: set[str] = set()  # migrations past their setup, being polled
    window: dict[str, float] = {}
    async with Engine(
        entries, limits=limits, default_policy=policy, guard=guard, recover_on_enter=False
    ) as engine:
        names = []
        for n in range(migrations):
            # Guests from 1 to 3 GiB, so that completions spread out as in a real fleet.
            spec = InstanceSpec(
                f"vm{n}",
                memory_mib=1024 + (n * 37) % 2048,
                hvparams=HvParams(migration_port=20000 + n),
            )
            instance = engine.add_instance(Instance(spec, entries[n // PER_NODE].hypervisor))
            await instance.start()
            names.append(spec.name)
        if tuned:
            tune_gc_for_fleet()  # set-up is done: what lives now is frozen out of scans
        events = engine.events(max_buffered=10 * migrations + 1000)
        begin_cpu, begin = cpu_seconds(), time.monotonic()
        tickets = [
            engine.submit_migration(name, f"dst{n // PER_NODE}") for n, name in enumerate(names)
        ]
        async for event in events:
            if isinstance(event, MigrationProgressed):
                watching.add(event.instance)
                if len(watching) == migrations and "cpu0" not in window:
                    window["cpu0"], window["t0"] = cpu_seconds(), time.monotonic()
                    window["sys0"] = system_seconds()
            elif isinstance(event, MigrationCompleted):
                if "cpu1" not in window:
                    window["cpu1"], window["t1"] = cpu_seconds(), time.monotonic()
                    window["sys1"] = system_seconds()
                completed_at[event.instance] = time.time()
                if len(completed_at) == migrations:
                    break
        end_cpu, end = cpu_seconds(), time.monotonic()
        failed = [t for t in tickets if t.state != "completed"]
        fleet_done = await sources[0]._call(op="completed_at")
    qemu_done = {key.split("@")[0]: value for key, value in fleet_done.items()}
    delays = sorted(
        (completed_at[name] - qemu_done[name]) * 1000 for name in completed_at if name in qemu_done
    )
    steady = (window["cpu1"] - window["cpu0"]) / max(window["t1"] - window["t0"], 1e-9)
    for node in (*sources, *targets):
        await node.aclose()
    return {
        "migrations": migrations,
        "failed": len(failed),
        "wall_seconds": round(end - begin, 2),
        "engine_cpu_seconds_per_migration": round((end_cpu - begin_cpu) / migrations, 4),
        "engine_core_share_in_flight": round(steady, 3),
        "of_which_kernel": round(
            (window["sys1"] - window["sys0"]) / max(window["t1"] - window["t0"], 1e-9), 3
        ),
        "steady_window_seconds": round(window["t1"] - window["t0"], 2),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "completion_notice_ms_median": round(statistics.median(delays), 1),
        "completion_notice_ms_p99": round(delays[int(len(delays) * 0.99) - 1], 1),
    }


def measure(migrations: int, tuned: bool, with_store: bool) -> dict[str, float]:
    """One run in this process, with a fresh fleet process."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    root = Path(tempfile.mkdtemp(prefix="kvff-", dir="/var/tmp"))  # the disk, not tmpfs
    control = str(root / "fleet.sock")
    try:
        with fleet_process(control):
            return anyio.run(run, migrations, control, root, tuned, with_store)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def measure_in_child(migrations: int, mode: str, store: str) -> dict[str, float]:
    """One run in a child process, so that the garbage collector starts untouched."""
    child = subprocess.run(
        [sys.executable, __file__, "--migrations", str(migrations), "--gc", mode, "--store", store],
        capture_output=True,
        text=True,
        check=True,
    )
    figures: dict[str, float] = json.loads(child.stdout.strip().splitlines()[-1])
    return figures


KEYS = ("completion_notice_ms_p99", "engine_core_share_in_flight", "peak_rss_mib")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--migrations", type=int, default=1000)
    parser.add_argument("--gc", choices=("both", "default", "tuned"), default="both")
    parser.add_argument("--store", choices=("both", "on", "off"), default="both")
    args = parser.parse_args()
    if args.gc != "both" and args.store != "both":
        result: dict[str, object] = dict(
            measure(args.migrations, args.gc == "tuned", args.store == "on")
        )
        for key, value in result.items():
            print(f"{key:>34}: {value}", file=sys.stderr)
        print(json.dumps(result))
        return
    cases = [
        (gc, store)
        for gc in (("default", "tuned") if args.gc == "both" else (args.gc,))
        for store in (("off", "on") if args.store == "both" else (args.store,))
    ]
    runs = {
        f"{gc}/store-{store}": measure_in_child(args.migrations, gc, store) for gc, store in cases
    }
    names = list(runs)
    print(f"{'':>34}" + "".join(f"{name:>20}" for name in names), file=sys.stderr)
    for key in runs[names[0]]:
        row = "".join(f"{runs[name][key]:>20}" for name in names)
        print(f"{key:>34}{row}", file=sys.stderr)
    ratios: dict[str, float] = {}
    if "default/store-off" in runs and "tuned/store-off" in runs:
        for key in KEYS:
            ratios[f"tuned_over_default_{key}"] = _ratio(
                runs, "tuned/store-off", "default/store-off", key
            )
    gc = "tuned" if args.gc != "default" else "default"
    if f"{gc}/store-on" in runs and f"{gc}/store-off" in runs:
        for key in KEYS:
            ratios[f"store_on_over_off_{key}"] = _ratio(
                runs, f"{gc}/store-on", f"{gc}/store-off", key
            )
    print(json.dumps({**ratios, **runs}))


def _ratio(runs: dict[str, dict[str, float]], top: str, bottom: str, key: str) -> float:
    return round(runs[top][key] / max(runs[bottom][key], 1e-9), 2)


if __name__ == "__main__":
    main()
