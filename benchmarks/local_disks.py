"""A guest with a local disk migrated over a shaped 1 Gbit/s link: disk and RAM under one
bandwidth.

Two hosts of :func:`kvmflow.testing.netns.netns_lab` (network namespaces reached over SSH,
links shaped to ``--rate`` Mbit/s), a guest of ``--memory`` MiB dirtying 16 MiB per sweep
with a local disk of ``--disk`` MiB of random data, migrated back and forth ``--rounds``
times with the policy's bandwidth at the link's rate. Reports per run the total time against
the time (disk + RAM) take at that bandwidth, as a ratio, and QEMU's downtime against the
policy's limit. The last line is one JSON object.

Run (as root): ``python benchmarks/local_disks.py [--disk 1024] [--rounds 2]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import anyio
import structlog

from kvmflow.guest import build_dirty_guest, dirty_guest_spec, wait_for_sweeps
from kvmflow.instance import Instance
from kvmflow.kvm import Disk
from kvmflow.migration import MigrationPolicy, migrate
from kvmflow.testing.netns import LinkShape, netns_lab

PORT = 8102
MIB = 1 << 20


async def run(rate: float, rounds: int, disk_mib: int, memory: int) -> dict[str, Any]:
    guest = build_dirty_guest()
    root = Path(tempfile.mkdtemp(prefix="kvf-ld-"))
    bandwidth_mib = int(rate * 1e6 / 8 / MIB)  # the link's rate, as the policy's budget
    policy = MigrationPolicy.fixed(bandwidth_mib=bandwidth_mib, downtime_ms=300, poll_interval=0.1)
    runs: list[dict[str, float]] = []
    try:
        with netns_lab(2, LinkShape(rate_mbit=rate)) as lab:
            a, b = lab.hypervisors(root / "run")
            for host in lab.hosts:
                (root / host.name).mkdir()
            with (root / "host0" / "disk.img").open("wb") as file:
                for _ in range(disk_mib):
                    file.write(os.urandom(MIB))
            disk = Disk(str(root / "{node}" / "disk.img"), local=True)
            spec = dirty_guest_spec(
                "ldb", guest, migration_port=PORT, mib=16, memory_mib=memory, disks=(disk,)
            )
            instance = Instance(spec, a)
            await instance.start()
            await wait_for_sweeps(a, "ldb")
            addresses = {a.node.name: lab.hosts[0].address, b.node.name: lab.hosts[1].address}
            try:
                for _ in range(rounds):
                    target = b if instance.machine.node == a.node.name else a
                    result = await migrate(
                        instance, target, target_address=addresses[target.node.name], policy=policy
                    )
                    ideal = (disk_mib + memory) / bandwidth_mib
                    sample = {
                        "seconds": round(result.elapsed, 2),
                        "ideal_seconds": round(ideal, 2),
                        "over_ideal": round(result.elapsed / ideal, 2),
                        "downtime_ms": float(result.downtime_ms or 0),
                        "downtime_limit_ms": float(policy.downtime_ms),
                    }
                    runs.append(sample)
                    print(f"{instance.machine.node}: {sample}", file=sys.stderr)
            finally:
                with anyio.CancelScope(shield=True):
                    await instance.stop(force=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {
        "link_mbit": rate,
        "bandwidth_mib": bandwidth_mib,
        "disk_mib": disk_mib,
        "memory_mib": memory,
        "runs": runs,
        "median_over_ideal": statistics.median(r["over_ideal"] for r in runs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=1000, help="link rate, Mbit/s")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--disk", type=int, default=1024, help="local disk, MiB of data")
    parser.add_argument("--memory", type=int, default=256, help="guest RAM, MiB")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    print(json.dumps(anyio.run(run, args.rate, args.rounds, args.disk, args.memory)))


if __name__ == "__main__":
    main()
