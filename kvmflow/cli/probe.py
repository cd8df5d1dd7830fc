"""``kvmflow probe``: start one throwaway QEMU, ask it over QMP and HMP what it is, stop it."""

from __future__ import annotations

import time
from dataclasses import dataclass

from kvmflow.kvm import scratch_qemu
from kvmflow.monitor import HMPClient, QMPClient, query_kvm, query_status, query_version


@dataclass(frozen=True)
class ProbeReport:
    """What one QEMU told us about itself."""

    qemu_version: str
    package: str
    accelerator: str
    run_state: str
    hmp_status: str
    qmp_round_trip_us: float

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


async def probe_running_qemu(qmp_path: str, hmp_path: str) -> ProbeReport:
    """Ask a QEMU's QMP and HMP monitors for version, run state and accelerator."""
    async with QMPClient(qmp_path, command_timeout=10) as qmp:
        version = await query_version(qmp)
        accel = await query_kvm(qmp)
        status = await query_status(qmp)
        rounds = 200
        started = time.perf_counter()
        for _ in range(rounds):
            await qmp.execute("query-status")
        round_trip = (time.perf_counter() - started) / rounds * 1e6
    async with HMPClient(hmp_path) as hmp:
        hmp_status = await hmp.run("info status")
    return ProbeReport(
        qemu_version=str(version),
        package=version.package,
        accelerator=accel.name,
        run_state=status.state.value,
        hmp_status=hmp_status,
        qmp_round_trip_us=round(round_trip, 1),
    )


def run_probe(backend: str = "asyncio") -> ProbeReport:
    """Start a scratch QEMU, probe it, and always stop it."""
    import anyio

    with scratch_qemu() as qemu:
        return anyio.run(
            probe_running_qemu, str(qemu.qmp_path), str(qemu.hmp_path), backend=backend
        )
