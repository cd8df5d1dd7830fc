"""One migration stream against 2, 4 and 8 multifd channels, on a shaped 10 Gbit/s link.

Two hosts of :func:`kvmflow.testing.netns.netns_lab` (network namespaces, sshd each, links
shaped to ``--rate`` Mbit/s), a guest of ``--memory`` MiB whose ``--mib`` MiB hold data and
are dirtied once per sweep (``--pause`` thousand pause instructions between sweeps set the
pace), migrated back and forth ``--rounds`` times per channel count (interleaved, so that the
machine's noise falls on all alike), QEMU's own bandwidth cap lifted. Reports per count the
median time to complete, QEMU's measured downtime and throughput, each as a ratio to the
single stream measured in the same run. The last line is one JSON object.

Run (as root): ``python benchmarks/multifd.py [--rate 10000] [--rounds 3]``.
"""

from __future__ import annotations

import argparse
import json
import logging
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
from kvmflow.migration import MigrationPolicy, migrate
from kvmflow.migration.policy import Capabilities
from kvmflow.testing.netns import LinkShape, netns_lab

CHANNELS = (1, 2, 4, 8)
PORT = 8102


def policy_for(channels: int) -> MigrationPolicy:
    caps = Capabilities(multifd=channels > 1, multifd_channels=max(channels, 2))
    return MigrationPolicy.fixed(
        bandwidth_mib=100_000, downtime_ms=300, poll_interval=0.1, capabilities=caps
    )


async def run(rate: float, rounds: int, memory: int, mib: int, pause: int) -> dict[str, Any]:
    guest = build_dirty_guest()
    root = Path(tempfile.mkdtemp(prefix="kvf-mfd-"))
    samples: dict[int, list[dict[str, float]]] = {n: [] for n in CHANNELS}
    try:
        with netns_lab(2, LinkShape(rate_mbit=rate)) as lab:
            a, b = lab.hypervisors(root)
            # Every page it dirties holds data from its first sweep on, so the stream carries
            # ``mib`` MiB of real memory (zero pages cost QEMU next to nothing).
            spec = dirty_guest_spec(
                "mfd", guest, migration_port=PORT, mib=mib, memory_mib=memory, pause=pause
            )
            instance = Instance(spec, a)
            await instance.start()
            await wait_for_sweeps(a, "mfd", minimum=1, timeout=120)
            addresses = {a.node.name: lab.hosts[0].address, b.node.name: lab.hosts[1].address}
            try:
                for _ in range(rounds):
                    for channels in CHANNELS:
                        target = b if instance.machine.node == a.node.name else a
                        result = await migrate(
                            instance,
                            target,
                            target_address=addresses[target.node.name],
                            policy=policy_for(channels),
                        )
                        sample = {
                            "seconds": result.elapsed,
                            "downtime_ms": float(result.downtime_ms or 0),
                            "mbps": result.final.throughput_mbps,
                        }
                        samples[channels].append(sample)
                        print(f"{channels} channel(s): {sample}", file=sys.stderr)
            finally:
                with anyio.CancelScope(shield=True):
                    await instance.stop(force=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return report(samples, rate, memory, mib, pause)


def report(
    samples: dict[int, list[dict[str, float]]], rate: float, memory: int, mib: int, pause: int
) -> dict[str, Any]:
    medians = {
        n: {key: statistics.median(s[key] for s in runs) for key in runs[0]}
        for n, runs in samples.items()
    }
    base = medians[1]
    out: dict[str, Any] = {
        "link_mbit": rate,
        "guest_mib": memory,
        "dirty_mib": mib,
        "pause": pause,
    }
    for n, figures in medians.items():
        out[f"channels_{n}"] = {
            **{k: round(v, 3) for k, v in figures.items()},
            "seconds_over_one_stream": round(figures["seconds"] / base["seconds"], 2),
            "mbps_over_one_stream": round(figures["mbps"] / base["mbps"], 2),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=10_000, help="link rate, Mbit/s")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--memory", type=int, default=1024, help="guest RAM, MiB")
    parser.add_argument("--mib", type=int, default=512, help="MiB of data, dirtied per sweep")
    parser.add_argument("--pause", type=int, default=1000, help="thousand pauses per sweep")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    print(json.dumps(anyio.run(run, args.rate, args.rounds, args.memory, args.mib, args.pause)))


if __name__ == "__main__":
    main()
