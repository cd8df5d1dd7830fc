"""What every node of a group can run: the newest machine type and a CPU model they share.

Pinning every instance to these (``machine_version``, ``cpu_type``) is what lets a fleet
migrate guests back and forth while its nodes run different QEMU releases and CPUs. The
machine type comes from each QEMU's ``query-machines``; the CPU model is one that every
node's host runs with nothing taken away (``query-cpu-definitions`` lists no unavailable
feature), and among those the one with the most features (``query-cpu-model-expansion``).
x86 QEMU has no ``query-cpu-model-baseline`` (it is s390x's), hence the intersection.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from kvmflow.kvm.hypervisor import KvmHypervisor
from kvmflow.kvm.qemu_info import QemuInfo, machine_family, machine_version_key

#: Models that are no fixed CPU: what the host has (``host``, ``max``) or a bare minimum.
NOT_A_BASELINE = frozenset({"host", "max", "base"})


def newest_common_machine(family: str, qemus: Sequence[QemuInfo]) -> str | None:
    """The newest versioned machine type of ``family`` (``pc-i440fx``, or an alias such as
    ``pc``) that every QEMU knows; ``None`` if they share none."""
    family = machine_family(family)
    known = [
        {n for n in q.machines if machine_family(n) == family and machine_version_key(n)}
        for q in qemus
    ]
    common = set.intersection(*known) if known else set()
    return max(common, key=machine_version_key) if common else None


def runnable_everywhere(qemus: Sequence[QemuInfo]) -> list[str]:
    """CPU models that every QEMU's host runs in full, by name."""
    sets = [
        {m.name for m in q.cpu_models.values() if m.runnable and m.migration_safe} for q in qemus
    ]
    common = set.intersection(*sets) - NOT_A_BASELINE if sets else set()
    return sorted(common)


async def baseline_cpu_model(hypervisors: Sequence[KvmHypervisor]) -> str | None:
    """The CPU model with the most features that every hypervisor's node runs in full, or
    ``None`` when they share none (then only ``host`` between identical hosts remains)."""
    qemus = [await hv.qemu() for hv in hypervisors]
    candidates = runnable_everywhere(qemus)
    if not candidates:
        return None
    counts = await _feature_counts(hypervisors[0], candidates)
    return max(candidates, key=lambda name: (counts.get(name, 0), name))


async def _feature_counts(hypervisor: KvmHypervisor, models: list[str]) -> dict[str, int]:
    """How many features each model turns on, asked of one QEMU over one stdio session."""
    qemu = await hypervisor.qemu()
    script: list[dict[str, Any]] = [{"execute": "qmp_capabilities"}]
    script += [
        {
            "execute": "query-cpu-model-expansion",
            "arguments": {"type": "full", "model": {"name": name}},
            "id": name,
        }
        for name in models
    ]
    script.append({"execute": "quit"})
    argv = [qemu.binary, "-machine", "none", "-accel", qemu.accelerator, "-nodefaults"]
    result = await hypervisor.node.run(
        [*argv, "-display", "none", "-qmp", "stdio"],
        stdin="".join(json.dumps(line) + "\n" for line in script).encode(),
        timeout=30,
    )
    counts: dict[str, int] = {}
    for line in result.stdout.splitlines():
        try:
            message = json.loads(line)
            props = message["return"]["model"]["props"]
        except (ValueError, KeyError, TypeError):
            continue
        counts[str(message.get("id"))] = sum(1 for value in props.values() if value is True)
    return counts
