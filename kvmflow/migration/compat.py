"""Can this instance move to that node's QEMU? Every reason it cannot, found before the source
is touched.

A migration between QEMU builds works when the target's QEMU knows the machine type the guest
runs on (pinned at its first start), can give the guest its CPU model with every feature the
source gives it, has each of its devices, and supports the capabilities the policy turns on.
:func:`incompatibilities` checks all of that at once from the two binaries' probes and the
instance's saved argv, and says for each problem what would fix it; a migration refuses to
start on any of them (:class:`~kvmflow.errors.IncompatibleTargetError`).
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import Any

from kvmflow.errors import KvmflowError, MigrationError
from kvmflow.kvm.argv import DRIVE_INTERFACES, machine_of, pin_machine
from kvmflow.kvm.baseline import newest_common_machine
from kvmflow.kvm.hvparams import DiskType
from kvmflow.kvm.hypervisor import KvmHypervisor
from kvmflow.kvm.qemu_info import QemuInfo, machine_family
from kvmflow.kvm.runtime import SavedRuntime
from kvmflow.kvm.tls import FILES
from kvmflow.migration.policy import MigrationPolicy
from kvmflow.monitor.queries import CommandRunner

#: The device a ``-drive if=...`` stands for, where the machine has no built-in controller.
_DRIVE_DEVICES = {DRIVE_INTERFACES[DiskType.PARAVIRTUAL]: "virtio-blk-pci"}
DEFAULT_CPU_MODEL = "qemu64"


@dataclass(frozen=True)
class Incompatibility:
    """One reason the target cannot take the instance, and what would fix it."""

    what: str
    fix: str

    def __str__(self) -> str:
        return f"{self.what} (fix: {self.fix})"


def migrate_arguments(qemu: QemuInfo | None, uri: str) -> dict[str, Any]:
    """``migrate``'s arguments for ``uri`` as ``qemu`` takes them: ``uri`` wherever it is
    still accepted (7.2 to 10.x), ``channels`` for a QEMU that only knows those."""
    if qemu is None or "uri" in qemu.migrate_arguments or "channels" not in qemu.migrate_arguments:
        return {"uri": uri}
    host, _, port = uri.removeprefix("tcp:").rpartition(":")
    address = {"transport": "socket", "type": "inet", "host": host.strip("[]"), "port": port}
    return {"channels": [{"channel-type": "main", "addr": address}]}


async def running_machine(qmp: CommandRunner, qemu: QemuInfo) -> str:
    """The machine type a running QEMU emulates (``qom-get /machine type``); its binary's
    default when the monitor cannot say (an HMP-only source)."""
    try:
        answer = await qmp.execute("qom-get", {"path": "/machine", "property": "type"})
    except KvmflowError:
        return qemu.resolve_machine(None)
    return str(answer).removesuffix("-machine")


def argv_devices(argv: list[str]) -> set[str]:
    """The device types a saved argv asks QEMU for."""
    devices = set()
    for flag, value in itertools.pairwise(argv):
        if flag == "-device":
            devices.add(value.split(",")[0])
        elif flag == "-drive":
            settings = dict(s.split("=", 1) for s in value.split(",") if "=" in s)
            device = _DRIVE_DEVICES.get(settings.get("if", ""))
            if device is not None:
                devices.add(device)
    return devices


def argv_cpu_model(argv: list[str]) -> str:
    for flag, value in itertools.pairwise(argv):
        if flag == "-cpu":
            return value.split(",")[0]
    return DEFAULT_CPU_MODEL


def wanted_capabilities(policy: MigrationPolicy) -> dict[str, bool]:
    """The capabilities the policy enables, and whether the target needs each too."""
    on_target = policy.enabled_capabilities("target")
    return {name: name in on_target for name in policy.enabled_capabilities("source")}


def incompatibilities(
    source: QemuInfo,
    target: QemuInfo,
    argv: list[str],
    policy: MigrationPolicy,
    *,
    target_node: str = "the target",
) -> list[Incompatibility]:
    """Everything that stops ``argv``'s guest from moving from ``source`` to ``target``."""
    problems: list[Incompatibility] = []
    upgrade = f"run a QEMU at least as new as {source.version_text} on {target_node}"
    machine = machine_of(argv)
    if machine is not None and machine not in target.machines:
        common = newest_common_machine(machine_family(machine), [source, target])
        pin = (
            f"pin machine_version={common} (takes effect at its next cold start) or "
            if common
            else ""
        )
        problems.append(
            Incompatibility(
                f"QEMU {target.version_text} on {target_node} has no machine type {machine}",
                pin + upgrade,
            )
        )
    problems += _cpu_problems(source, target, argv_cpu_model(argv), target_node)
    missing = sorted(argv_devices(argv) - target.devices)
    if missing and target.devices:
        problems.append(
            Incompatibility(
                f"QEMU {target.version_text} on {target_node} has no device " + ", ".join(missing),
                f"install the QEMU build that has them on {target_node}, or {upgrade}",
            )
        )
    for capability, both_sides in wanted_capabilities(policy).items():
        sides = [("source", source), ("target", target)] if both_sides else [("source", source)]
        for side, qemu in sides:
            if qemu.migration_capabilities and capability not in qemu.migration_capabilities:
                problems.append(
                    Incompatibility(
                        f"the {side}'s QEMU {qemu.version_text} has no migration capability "
                        f"{capability}",
                        f"use a policy without {capability}",
                    )
                )
    compression = policy.capabilities.multifd_compression if policy.capabilities.multifd else None
    for side, qemu in (("source", source), ("target", target)):
        if (
            compression is not None
            and qemu.multifd_compressions
            and (compression not in qemu.multifd_compressions)
        ):
            problems.append(
                Incompatibility(
                    f"the {side}'s QEMU {qemu.version_text} cannot compress multifd with "
                    f"{compression} (it has {', '.join(sorted(qemu.multifd_compressions))})",
                    "use a multifd_compression both builds have, or none",
                )
            )
    return problems


def _cpu_problems(
    source: QemuInfo, target: QemuInfo, model: str, target_node: str
) -> list[Incompatibility]:
    if model not in target.cpu_models:
        return [
            Incompatibility(
                f"QEMU {target.version_text} on {target_node} has no CPU model {model}",
                "set cpu_type to a model both nodes have (see kvmflow.kvm.baseline)",
            )
        ]
    if model == "host" or model not in source.cpu_models:
        return []  # "host" is the host's own CPU: the operator vouches that the hosts match
    lost = (
        target.cpu_models[model].unavailable_features
        - source.cpu_models[model].unavailable_features
    )
    if not lost:
        return []
    return [
        Incompatibility(
            f"the host of {target_node} cannot give a {model} guest "
            + ", ".join(sorted(lost))
            + ", which the source gives it",
            "set cpu_type to a model both hosts can run (see kvmflow.kvm.baseline)",
        )
    ]


async def pinned_argv(
    runtime: SavedRuntime, source_qemu: QemuInfo, qmp: CommandRunner | None
) -> list[str]:
    """The saved argv with its machine type; a runtime saved before pinning gets the type
    the running source emulates (asked over ``qmp``, else its binary's default)."""
    argv = list(runtime.argv)
    if machine_of(argv) is not None:
        return argv
    machine = await running_machine(qmp, source_qemu) if qmp else source_qemu.resolve_machine(None)
    return pin_machine(argv, machine)


async def tls_problems(
    policy: MigrationPolicy, source: KvmHypervisor, target: KvmHypervisor
) -> list[Incompatibility]:
    """With ``policy.tls``, each node must have its credentials, and the files its end of
    the stream reads (the source a client's, the target a server's)."""
    if not policy.tls:
        return []
    problems = []
    for hv, endpoint in ((source, "client"), (target, "server")):
        node = hv.node.name
        if hv.migration_tls is None:
            problems.append(
                Incompatibility(
                    f"node {node} has no migration TLS credentials",
                    f"give node {node} a migration_tls_dir, or migrate without TLS",
                )
            )
            continue
        for name in FILES[endpoint]:
            path = os.path.join(hv.migration_tls.directory, name)
            if await hv.node.path_kind(path) != "file":
                problems.append(
                    Incompatibility(
                        f"node {node} has no {path} (its {endpoint} end needs it)",
                        f"put the node's {name} there (QEMU's tls-creds-x509 layout)",
                    )
                )
    return problems


async def check_migration(
    source: KvmHypervisor, target: KvmHypervisor, name: str, policy: MigrationPolicy
) -> list[Incompatibility]:
    """Everything that stops ``name`` (running on ``source``) from moving to ``target`` with
    ``policy``, without touching either: the pre-check of ``kvmflow migrate --check`` and of
    an evacuation's plan. Raises :class:`MigrationError` when ``name`` does not run there."""
    runtime = await source.load_runtime(name)
    if runtime is None or await source.find_pid(name) is None:
        raise MigrationError(name, f"it is not running on {source.node.name}", runs_on=None)
    source_qemu, target_qemu = await source.qemu(), await target.qemu()
    argv = list(runtime.argv)
    if machine_of(argv) is None:
        try:
            async with source.qmp(name, connect_timeout=2, command_timeout=10) as qmp:
                argv = await pinned_argv(runtime, source_qemu, qmp)
        except KvmflowError:  # its monitor is busy (a migration holds it): the default
            argv = await pinned_argv(runtime, source_qemu, None)
    return incompatibilities(source_qemu, target_qemu, argv, policy, target_node=target.node.name)
