"""QMP round trips to a QEMU on another node, over SSH, against the same QEMU locally.

One real QEMU and one real OpenSSH sshd on 127.0.0.2 (standing for another host). Timed:
sequential ``query-status`` round trips through kvmflow's ``QMPClient`` on the local unix
socket (``local``), through an :class:`~kvmflow.node.SSHNode`'s stream-local forwarding to
the same socket (``ssh``), and a plain asyncssh script writing the same bytes through
the same kind of channel (``raw_ssh``, the floor for SSH). Rounds alternate so that noise
hits all three alike; each figure is the median of its rounds.

Run: ``python benchmarks/ssh_roundtrip.py [--rounds 5] [--count 1000]`` as root. The last
line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import anyio
import asyncssh
import structlog

from kvmflow.kvm import scratch_qemu
from kvmflow.monitor import QMPClient
from kvmflow.monitor.transport import Connector
from kvmflow.node import SSHNode, SSHTarget
from kvmflow.testing.sshd import SSHFleet, ssh_fleet


async def through_kvmflow(monitor: Path | Connector, count: int) -> float:
    async with QMPClient(monitor) as qmp:
        start = time.perf_counter()
        for _ in range(count):
            await qmp.execute("query-status")
        return (time.perf_counter() - start) / count * 1e6


async def raw_ssh(fleet: SSHFleet, path: Path, count: int) -> float:
    host = fleet.hosts[0]
    async with asyncssh.connect(
        host.host,
        host.port,
        username="root",
        client_keys=[str(fleet.client_key)],
        known_hosts=str(fleet.known_hosts),
    ) as connection:
        reader, writer = await connection.open_unix_connection(str(path))
        await reader.readline()
        writer.write(b'{"execute":"qmp_capabilities"}\n')
        await reader.readline()
        start = time.perf_counter()
        for n in range(1, count + 1):
            writer.write(b'{"execute":"query-status","id":%d}\n' % n)
            await reader.readline()
        elapsed = time.perf_counter() - start
        writer.close()
        return elapsed / count * 1e6


async def measure(fleet: SSHFleet, path: Path, rounds: int, count: int) -> dict[str, float]:
    host = fleet.hosts[0]
    node = SSHNode(
        "remote",
        SSHTarget(
            host.host,
            port=host.port,
            client_keys=(str(fleet.client_key),),
            known_hosts=str(fleet.known_hosts),
        ),
    )
    samples: dict[str, list[float]] = {"local": [], "ssh": [], "raw_ssh": []}
    try:
        connector = node.monitor_connector(str(path))
        for _ in range(rounds):
            samples["local"].append(await through_kvmflow(path, count))
            samples["ssh"].append(await through_kvmflow(connector, count))
            samples["raw_ssh"].append(await raw_ssh(fleet, path, count))
    finally:
        await node.aclose()
    figures = {
        f"{name}_us": round(statistics.median(values), 1) for name, values in samples.items()
    }
    figures["ratio_ssh_vs_local"] = round(figures["ssh_us"] / figures["local_us"], 2)
    figures["ratio_ssh_vs_raw_ssh"] = round(figures["ssh_us"] / figures["raw_ssh_us"], 2)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--count", type=int, default=1000)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    with scratch_qemu() as qemu, ssh_fleet(["127.0.0.2"]) as fleet:
        figures = anyio.run(measure, fleet, qemu.qmp_path, args.rounds, args.count)
    for key, value in figures.items():
        print(f"{key:>22}: {value}", file=sys.stderr)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
