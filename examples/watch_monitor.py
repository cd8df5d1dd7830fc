"""Share one QMP connection between several tasks and watch events, on asyncio or trio.

Run: ``python examples/watch_monitor.py [asyncio|trio]``. It starts a throwaway paused QEMU,
has one task watch STOP/RESUME events while others toggle and query the guest over the same
connection, prints what happened, and stops QEMU again.
"""

from __future__ import annotations

import sys

import anyio

from kvmflow import QMPClient, query_status
from kvmflow.kvm import scratch_qemu


async def main(qmp_path: str) -> list[str]:
    seen: list[str] = []
    async with QMPClient(qmp_path, command_timeout=10) as qmp:
        with qmp.subscribe("STOP", "RESUME") as events:

            async def watch() -> None:
                async for event in events:
                    seen.append(event.name)
                    if len(seen) == 4:
                        return

            async def toggle() -> None:
                for command in ("cont", "stop", "cont", "stop"):
                    await qmp.execute(command)

            async def query() -> None:
                for _ in range(10):
                    status = await query_status(qmp)
                    print(f"run state: {status.state.value}")

            async with anyio.create_task_group() as tg:
                tg.start_soon(watch)
                tg.start_soon(toggle)
                tg.start_soon(query)
    print("events:", " ".join(seen))
    return seen


if __name__ == "__main__":
    backend = sys.argv[1] if len(sys.argv) > 1 else "asyncio"
    with scratch_qemu() as qemu:
        anyio.run(main, str(qemu.qmp_path), backend=backend)
