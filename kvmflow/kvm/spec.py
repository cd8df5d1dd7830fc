"""What an instance is: its name, memory, vCPUs, VNC port, disks, NICs, tags and
:class:`~kvmflow.kvm.hvparams.HvParams`.

Instance names are checked when a spec is built, so that no name can escape a runtime
directory or reach a shell.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from kvmflow.errors import FieldProblem, ValidationError
from kvmflow.kvm.hvparams import HvParams

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
NAME_RULE = (
    "1 to 63 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit "
    "(no slashes, spaces or shell characters)"
)
MAC_PATTERN = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
VNC_BASE_PORT = 5900


class DiskMode(enum.StrEnum):
    READ_WRITE = "rw"
    READ_ONLY = "ro"


class NicMode(enum.StrEnum):
    BRIDGED = "bridged"
    ROUTED = "routed"


#: In a local disk's path, the name of the node it is on (nodes that share one file system,
#: as test nodes on one machine do, keep their local disks apart with it).
NODE_PLACEHOLDER = "{node}"


@dataclass(frozen=True)
class Disk:
    """A block device backing file or device node, read-write (read-only is refused).

    A ``local`` disk lives on its node's own storage (a raw image file): a migration copies
    it to the target node (same path, ``{node}`` standing for the node's name) while the
    guest runs, and afterwards removes the source's copy unless ``keep_source``. A disk that
    is not local is shared storage, valid on every node as it is."""

    path: str
    mode: DiskMode = DiskMode.READ_WRITE
    local: bool = False
    keep_source: bool = False

    def path_on(self, node: str) -> str:
        """The disk's path on ``node``."""
        return self.path.replace(NODE_PLACEHOLDER, node)


@dataclass(frozen=True)
class Nic:
    """A network interface: MAC, optional IP, bridged or routed, and its link (bridge or
    routing table)."""

    mac: str
    ip: str | None = None
    mode: NicMode = NicMode.BRIDGED
    link: str | None = None


@dataclass(frozen=True)
class InstanceSpec:
    """Everything that describes one instance. The name is checked on construction."""

    name: str
    memory_mib: int = 128
    vcpus: int = 1
    network_port: int | None = None
    disks: tuple[Disk, ...] = ()
    nics: tuple[Nic, ...] = ()
    tags: tuple[str, ...] = ()
    hvparams: HvParams = field(default_factory=HvParams)

    def __post_init__(self) -> None:
        check_instance_name(self.name)

    def with_hvparams(self, **changes: Any) -> InstanceSpec:
        """A copy with some hypervisor parameters changed."""
        return replace(self, hvparams=replace(self.hvparams, **changes))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (the runtime file stores this)."""
        return {
            "name": self.name,
            "memory_mib": self.memory_mib,
            "vcpus": self.vcpus,
            "network_port": self.network_port,
            "disks": [
                {
                    "path": d.path,
                    "mode": d.mode.value,
                    "local": d.local,
                    "keep_source": d.keep_source,
                }
                for d in self.disks
            ],
            "nics": [
                {"mac": n.mac, "ip": n.ip, "mode": n.mode.value, "link": n.link} for n in self.nics
            ],
            "tags": list(self.tags),
            "hvparams": self.hvparams.to_dict(),
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> InstanceSpec:
        """Inverse of :meth:`to_dict`; shape errors become a :class:`ValidationError`."""
        try:
            return cls(
                name=values["name"],
                memory_mib=_whole("memory_mib", values.get("memory_mib", 128)),
                vcpus=_whole("vcpus", values.get("vcpus", 1)),
                network_port=values.get("network_port"),
                disks=tuple(
                    Disk(
                        d["path"],
                        DiskMode(d.get("mode", "rw")),
                        _flag(d, "local"),
                        _flag(d, "keep_source"),
                    )
                    for d in values.get("disks", ())
                ),
                nics=tuple(
                    Nic(n["mac"], n.get("ip"), NicMode(n.get("mode", "bridged")), n.get("link"))
                    for n in values.get("nics", ())
                ),
                tags=tuple(values.get("tags", ())),
                hvparams=HvParams.from_dict(values.get("hvparams", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValidationError(
                [FieldProblem("instance", dict(values), f"malformed: {exc}")]
            ) from exc


#: The keys an instance's description may have (what :meth:`InstanceSpec.from_dict` reads).
SPEC_KEYS = frozenset(
    {"name", "memory_mib", "vcpus", "network_port", "disks", "nics", "tags", "hvparams"}
)


def _flag(values: Mapping[str, Any], key: str) -> bool:
    value = values.get(key, False)
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, not {value!r}")
    return value


def _whole(field: str, value: object) -> int:
    """An integer as given: 64.9 or ``true`` is refused, not silently made 64 or 1."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError([FieldProblem(field, value, "a whole number")])
    return value


def check_instance_name(name: object) -> str:
    """Return the name if it is safe for paths and shells, else raise ValidationError."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise ValidationError([FieldProblem("name", name, NAME_RULE)])
    return name
