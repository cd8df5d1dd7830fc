"""Several "nodes" on this machine, each with its own runtime root: for tests, examples,
benchmarks and the demo, and for embedders who try kvmflow out on one host."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from kvmflow.engine.engine import NodeEntry
from kvmflow.kvm.argv import QEMU_BINARY
from kvmflow.kvm.hypervisor import KvmHypervisor
from kvmflow.kvm.runtime import RuntimePaths
from kvmflow.kvm.scratch import default_accelerator
from kvmflow.node.local import LocalNode


def local_hypervisors(
    root: Path, *names: str, qemu_binaries: Mapping[str, str] | None = None
) -> list[KvmHypervisor]:
    """One hypervisor per name, on this machine, rooted at ``root/<name>`` (KVM where
    ``/dev/kvm`` works, TCG elsewhere), each running the QEMU ``qemu_binaries`` names for
    it (the system's by default)."""
    accelerator = default_accelerator()
    binaries = qemu_binaries or {}
    return [
        KvmHypervisor(
            LocalNode(name),
            RuntimePaths(str(root / name)),
            default_accelerator=accelerator,
            qemu_binary=binaries.get(name, QEMU_BINARY),
        )
        for name in names
    ]


def local_nodes(
    root: Path,
    *names: str,
    addresses: tuple[str, ...] = (),
    link_budgets_mib: dict[str, int] | None = None,
) -> list[NodeEntry]:
    """Engine entries for :func:`local_hypervisors`; node ``i`` listens for migrations on
    ``addresses[i]`` (default 127.0.0.1) with the link budget its name has, if any."""
    budgets = link_budgets_mib or {}
    return [
        NodeEntry(
            hypervisor,
            addresses[index] if index < len(addresses) else "127.0.0.1",
            link_budget_mib=budgets.get(hypervisor.node.name),
        )
        for index, hypervisor in enumerate(local_hypervisors(root, *names))
    ]
