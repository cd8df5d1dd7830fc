"""Monitor round-trip benchmark against one real QEMU.

Sequential ``query-status`` round trips through kvmflow's QMP client (asyncio and trio), a
plain blocking socket (the floor), one ``socat`` subprocess per HMP command (the ancestor's
way) and the ``qemu.qmp`` library when installed; plus throughput with 100 concurrent
callers on one connection. Rounds alternate between clients so that machine noise hits
them alike; each figure is the median of its rounds.

QEMU reads a monitor socket one byte per main-loop pass (about 5 us a byte here), so what a
command costs depends on its length. kvmflow sends ``{"execute":"query-status","id":N}``;
the floor is measured twice, with those same bytes (``raw_same_bytes``, the fair floor and
the one ``ratio_vs_raw`` uses) and with the shortest line without an id (``raw_no_id``).

Run: ``python benchmarks/monitor_roundtrip.py [--rounds 5] [--count 2000]``. The last line
of output is one JSON object.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import structlog

from kvmflow.kvm import scratch_qemu
from kvmflow.monitor import QMPClient


def raw_socket(path: Path, count: int, with_id: bool) -> float:
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(str(path))
    reader = sock.makefile("rb")
    reader.readline()
    sock.sendall(b'{"execute":"qmp_capabilities"}\n')
    reader.readline()
    start = time.perf_counter()
    for n in range(1, count + 1):
        if with_id:
            sock.sendall(b'{"execute":"query-status","id":%d}\n' % n)
        else:
            sock.sendall(b'{"execute":"query-status"}\n')
        reader.readline()
    elapsed = time.perf_counter() - start
    sock.close()
    return elapsed / count * 1e6


def kvmflow_client(path: Path, count: int, backend: str) -> float:
    async def run() -> float:
        async with QMPClient(path) as qmp:
            start = time.perf_counter()
            for _ in range(count):
                await qmp.execute("query-status")
            return (time.perf_counter() - start) / count * 1e6

    return anyio.run(run, backend=backend)


def kvmflow_concurrent(path: Path, count: int, callers: int = 100) -> float:
    async def run() -> float:
        async with QMPClient(path) as qmp:
            per_caller = max(1, count // callers)

            async def caller() -> None:
                for _ in range(per_caller):
                    await qmp.execute("query-status")

            start = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for _ in range(callers):
                    tg.start_soon(caller)
            return (time.perf_counter() - start) / (per_caller * callers) * 1e6

    return anyio.run(run)


def socat_hmp(path: Path, count: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
        subprocess.run(
            ["socat", "STDIO", f"UNIX-CONNECT:{path}"],
            input=b"info status\n",
            capture_output=True,
            check=True,
        )
    return (time.perf_counter() - start) / count * 1e6


def qemu_qmp_library(path: Path, count: int) -> float:
    import asyncio

    from qemu.qmp import QMPClient as Upstream  # type: ignore[import-not-found]

    async def run() -> float:
        client = Upstream("bench")
        await client.connect(str(path))
        start = time.perf_counter()
        for _ in range(count):
            await client.execute("query-status")
        elapsed = time.perf_counter() - start
        await client.disconnect()
        return elapsed / count * 1e6

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--count", type=int, default=2000)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    count = args.count
    with scratch_qemu() as qemu:
        qmp, hmp = qemu.qmp_path, qemu.hmp_path
        cases: dict[str, Callable[[], float]] = {
            "raw_same_bytes": lambda: raw_socket(qmp, count, True),
            "raw_no_id": lambda: raw_socket(qmp, count, False),
            "kvmflow_asyncio": lambda: kvmflow_client(qmp, count, "asyncio"),
            "kvmflow_trio": lambda: kvmflow_client(qmp, count, "trio"),
            "kvmflow_100_callers": lambda: kvmflow_concurrent(qmp, count),
        }
        if shutil.which("socat"):
            cases["socat_hmp"] = lambda: socat_hmp(hmp, max(count // 20, 20))
        if importlib.util.find_spec("qemu") and importlib.util.find_spec("qemu.qmp"):
            cases["qemu_qmp"] = lambda: qemu_qmp_library(qmp, count)
        samples: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.rounds):
            for name, case in cases.items():
                samples[name].append(case())
    medians = {name: round(statistics.median(values), 1) for name, values in samples.items()}
    for name, value in medians.items():
        print(f"{name:>22}: {value:9.1f} us per query-status", file=sys.stderr)
    result: dict[str, float | str] = dict(medians)
    result["ratio_vs_raw"] = round(medians["kvmflow_asyncio"] / medians["raw_same_bytes"], 3)
    result["ratio_vs_raw_no_id"] = round(medians["kvmflow_asyncio"] / medians["raw_no_id"], 3)
    result["ratio_trio_vs_raw"] = round(medians["kvmflow_trio"] / medians["raw_same_bytes"], 3)
    result["unit"] = "us"
    print(json.dumps(result))


if __name__ == "__main__":
    main()
