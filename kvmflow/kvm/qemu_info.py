"""What one QEMU binary on one node is and can do, learned once by asking it.

Fleets run several QEMU versions at once (a rolling upgrade is one), and versions differ in
what matters here: QEMU 10 replaced ``-runas``/``-chroot`` with ``-run-with``, the ``pc``
alias names a different machine type in every release, capabilities come and go. So nothing
is assumed from a version number: :func:`probe_qemu` runs the binary on its node (``-help``,
then one QMP session over stdio with ``-machine none``) and returns a :class:`QemuInfo`,
from which argv and QMP calls are built. A probe costs about 100 ms; callers cache the result
(:meth:`KvmHypervisor.qemu <kvmflow.kvm.hypervisor.KvmHypervisor.qemu>`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kvmflow.errors import QemuStartError
from kvmflow.node.base import Node

#: The commands of one probe session, by id. ``-machine none`` needs no guest and no disk.
_PROBE_COMMANDS: dict[str, tuple[str, dict[str, Any]]] = {
    "version": ("query-version", {}),
    "machines": ("query-machines", {}),
    "cpus": ("query-cpu-definitions", {}),
    "commands": ("query-commands", {}),
    "schema": ("query-qmp-schema", {}),
    "devices": ("qom-list-types", {"implements": "device", "abstract": False}),
    "capabilities": ("query-migrate-capabilities", {}),
}
_OPTION = re.compile(r"^-([a-z0-9][a-z0-9_-]*)", re.MULTILINE)


@dataclass(frozen=True)
class MachineType:
    """One entry of ``query-machines``."""

    name: str
    alias: str | None = None
    is_default: bool = False
    deprecated: bool = False


@dataclass(frozen=True)
class CpuModel:
    """One entry of ``query-cpu-definitions``: the features this host cannot give a guest
    of that model under the probe's accelerator."""

    name: str
    unavailable_features: frozenset[str] = frozenset()
    migration_safe: bool = True

    @property
    def runnable(self) -> bool:
        return not self.unavailable_features


@dataclass(frozen=True)
class QemuInfo:
    """A QEMU binary as it described itself."""

    binary: str
    version: tuple[int, int, int]
    package: str = ""
    machines: Mapping[str, MachineType] = field(default_factory=dict)
    cpu_models: Mapping[str, CpuModel] = field(default_factory=dict)
    commands: frozenset[str] = frozenset()
    options: frozenset[str] = frozenset()
    devices: frozenset[str] = frozenset()
    migration_capabilities: frozenset[str] = frozenset()
    migration_parameters: frozenset[str] = frozenset()
    migrate_arguments: frozenset[str] = frozenset({"uri"})
    incoming_arguments: frozenset[str] = frozenset({"uri"})
    migration_statuses: frozenset[str] = frozenset()
    multifd_compressions: frozenset[str] = frozenset()
    accelerator: str = "kvm"

    @property
    def version_text(self) -> str:
        return ".".join(map(str, self.version))

    @property
    def uses_run_with(self) -> bool:
        """Whether user and chroot are spelled ``-run-with`` (all QEMU 10.0 has) rather than
        ``-runas``/``-chroot`` (QEMU 7.2)."""
        return "run-with" in self.options and "runas" not in self.options

    def resolve_machine(self, wanted: str | None) -> str:
        """The concrete, versioned machine type for ``wanted`` (an alias such as ``pc``, a
        concrete type, or ``None`` for this QEMU's default). Raises :class:`LookupError`
        naming what this QEMU has when it knows no such machine."""
        if wanted is None:
            for machine in self.machines.values():
                if machine.is_default:
                    return machine.name
            wanted = "pc"
        if wanted in self.machines:
            return wanted
        for machine in self.machines.values():
            if machine.alias == wanted:
                return machine.name
        raise LookupError(
            f"QEMU {self.version_text} ({self.binary}) has no machine type {wanted!r}; "
            f"it has {', '.join(self.machine_names_like(wanted)) or 'none like it'}"
        )

    def machine_names_like(self, wanted: str) -> list[str]:
        """Machine types of the same family as ``wanted`` (``pc-i440fx-*`` for ``pc-i440fx-7.2``),
        newest first."""
        family = machine_family(wanted)
        names = [name for name in self.machines if machine_family(name) == family]
        return sorted(names, key=machine_version_key, reverse=True)


def machine_family(name: str) -> str:
    """``pc-i440fx`` for ``pc-i440fx-7.2`` and for the alias ``pc``; ``pc-q35`` for ``q35``."""
    aliases = {"pc": "pc-i440fx", "q35": "pc-q35"}
    if name in aliases:
        return aliases[name]
    return re.sub(r"-\d+(\.\d+)*$", "", name)


def machine_version_key(name: str) -> tuple[int, ...]:
    """``(7, 2)`` for ``pc-i440fx-7.2``; ``()`` for a name without a version."""
    found = re.search(r"-(\d+(?:\.\d+)*)$", name)
    return tuple(int(part) for part in found.group(1).split(".")) if found else ()


async def probe_qemu(
    node: Node, binary: str, *, accelerator: str = "kvm", timeout: float = 30.0
) -> QemuInfo:
    """Ask ``binary`` on ``node`` what it is. Raises :class:`QemuStartError` when it does not
    run or does not answer as a QEMU does."""
    help_run = await node.run([binary, "-help"], timeout=timeout)
    if not help_run.ok:
        raise QemuStartError(
            f"QEMU binary {binary} on {node.name} does not run: {help_run.error_text()}"
        )
    script: list[dict[str, Any]] = [{"execute": "qmp_capabilities"}]
    script += [
        {"execute": command, "arguments": arguments, "id": key}
        for key, (command, arguments) in _PROBE_COMMANDS.items()
    ]
    script.append({"execute": "quit"})
    stdin = "".join(json.dumps(line) + "\n" for line in script).encode()
    argv = [binary, "-machine", "none", "-accel", accelerator, "-nodefaults"]
    session = await node.run(
        [*argv, "-display", "none", "-qmp", "stdio"], stdin=stdin, timeout=timeout
    )
    replies = _replies_by_id(session.stdout)
    missing = [key for key in _PROBE_COMMANDS if key not in replies]
    if missing:
        raise QemuStartError(
            f"QEMU binary {binary} on {node.name} did not answer its probe "
            f"({', '.join(missing)} unanswered): {session.error_text()}"
        )
    return qemu_info_from(binary, help_run.stdout.decode(errors="replace"), replies, accelerator)


def _replies_by_id(output: bytes) -> dict[str, Any]:
    replies: dict[str, Any] = {}
    for line in output.splitlines():
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if isinstance(message, dict) and "return" in message and "id" in message:
            replies[str(message["id"])] = message["return"]
    return replies


def qemu_info_from(
    binary: str, help_text: str, replies: Mapping[str, Any], accelerator: str = "kvm"
) -> QemuInfo:
    """A :class:`QemuInfo` from a probe's outputs (pure: tested with recorded answers)."""
    version = replies["version"]["qemu"]
    schema = _Schema(replies["schema"])
    machines = {
        m["name"]: MachineType(
            m["name"], m.get("alias"), bool(m.get("is-default")), bool(m.get("deprecated"))
        )
        for m in replies["machines"]
    }
    cpus = {
        c["name"]: CpuModel(
            c["name"],
            frozenset(c.get("unavailable-features") or ()),
            bool(c.get("migration-safe", True)),
        )
        for c in replies["cpus"]
    }
    return QemuInfo(
        binary=binary,
        version=(int(version["major"]), int(version["minor"]), int(version["micro"])),
        package=str(replies["version"].get("package", "")),
        machines=machines,
        cpu_models=cpus,
        commands=frozenset(c["name"] for c in replies["commands"]),
        options=frozenset(_OPTION.findall(help_text)),
        devices=frozenset(t["name"] for t in replies["devices"]),
        migration_capabilities=frozenset(c["capability"] for c in replies["capabilities"]),
        migration_parameters=schema.argument_names("migrate-set-parameters"),
        migrate_arguments=schema.argument_names("migrate"),
        incoming_arguments=schema.argument_names("migrate-incoming"),
        migration_statuses=schema.enum_of_member("query-migrate", "status"),
        multifd_compressions=schema.enum_of_argument(
            "migrate-set-parameters", "multifd-compression"
        ),
        accelerator=accelerator,
    )


class _Schema:
    """Just enough of ``query-qmp-schema`` (whose type names are opaque numbers)."""

    def __init__(self, entries: Iterable[Mapping[str, Any]]) -> None:
        self._by_name = {str(entry["name"]): entry for entry in entries}

    def _members(self, type_name: str) -> dict[str, str]:
        entry = self._by_name.get(type_name, {})
        return {str(m["name"]): str(m.get("type", "")) for m in entry.get("members", [])}

    def argument_names(self, command: str) -> frozenset[str]:
        entry = self._by_name.get(command, {})
        return frozenset(self._members(str(entry.get("arg-type", ""))))

    def enum_of_member(self, command: str, member: str, side: str = "ret-type") -> frozenset[str]:
        """The values of the enum that ``member`` of ``command``'s answer (or arguments,
        ``side="arg-type"``) has as its type."""
        entry = self._by_name.get(command, {})
        type_name = self._members(str(entry.get(side, ""))).get(member, "")
        return frozenset(str(v) for v in self._by_name.get(type_name, {}).get("values", []))

    def enum_of_argument(self, command: str, member: str) -> frozenset[str]:
        return self.enum_of_member(command, member, side="arg-type")
