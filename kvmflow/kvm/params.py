"""Instance descriptions and every hypervisor parameter of the ancestor, with its checks.

An :class:`InstanceSpec` says what an instance is (name, memory, vCPUs, VNC port, disks,
NICs, tags, :class:`HvParams`). :func:`validate_spec` checks every field and every
cross-field rule and reports all problems at once in one :class:`ValidationError`; it never
writes anything. Instance names are checked when a spec is built, so that no name can escape
a runtime directory or reach a shell.
"""

from __future__ import annotations

import enum
import ipaddress
import os
import pwd
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from kvmflow.errors import FieldProblem, ValidationError

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
NAME_RULE = (
    "1 to 63 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit "
    "(no slashes, spaces or shell characters)"
)
MAC_PATTERN = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
VNC_BASE_PORT = 5900


class BootOrder(enum.StrEnum):
    DISK = "disk"
    CDROM = "cdrom"
    NETWORK = "network"


class NicType(enum.StrEnum):
    RTL8139 = "rtl8139"
    NE2K_PCI = "ne2k_pci"
    NE2K_ISA = "ne2k_isa"
    I82551 = "i82551"
    I82557B = "i82557b"
    I82559ER = "i82559er"
    PCNET = "pcnet"
    E1000 = "e1000"
    PARAVIRTUAL = "paravirtual"


class DiskType(enum.StrEnum):
    IDE = "ide"
    SCSI = "scsi"
    SD = "sd"
    MTD = "mtd"
    PFLASH = "pflash"
    PARAVIRTUAL = "paravirtual"


#: Disk types QEMU's x86 ``pc`` machine has no controller for (QEMU 7.2 refuses them with
#: "machine type does not support if=sd"); refused at validation instead of at start.
UNSUPPORTED_ON_X86 = frozenset({DiskType.SD, DiskType.MTD})


class UsbMouse(enum.StrEnum):
    MOUSE = "mouse"
    TABLET = "tablet"


class DiskCache(enum.StrEnum):
    DEFAULT = "default"
    NONE = "none"
    WRITETHROUGH = "writethrough"
    WRITEBACK = "writeback"


class SecurityModel(enum.StrEnum):
    NONE = "none"
    USER = "user"
    POOL = "pool"


class KvmFlag(enum.StrEnum):
    ENABLED = "enabled"
    DISABLED = "disabled"


class DiskMode(enum.StrEnum):
    READ_WRITE = "rw"
    READ_ONLY = "ro"


class NicMode(enum.StrEnum):
    BRIDGED = "bridged"
    ROUTED = "routed"


@dataclass(frozen=True)
class Disk:
    """A block device backing file or device node, read-write (read-only is refused)."""

    path: str
    mode: DiskMode = DiskMode.READ_WRITE


@dataclass(frozen=True)
class Nic:
    """A network interface: MAC, optional IP, bridged or routed, and its link (bridge or
    routing table)."""

    mac: str
    ip: str | None = None
    mode: NicMode = NicMode.BRIDGED
    link: str | None = None


@dataclass(frozen=True)
class HvParams:
    """The hypervisor parameters of the ancestor, with its defaults."""

    kernel_path: str | None = None
    initrd_path: str | None = None
    root_path: str | None = None
    kernel_args: str = ""
    acpi: bool = True
    serial_console: bool = True
    vnc_bind_address: str | None = None
    vnc_tls: bool = False
    vnc_x509_path: str | None = None
    vnc_x509_verify: bool = False
    vnc_password_file: str | None = None
    cdrom_image_path: str | None = None
    boot_order: BootOrder = BootOrder.DISK
    nic_type: NicType = NicType.PARAVIRTUAL
    disk_type: DiskType = DiskType.PARAVIRTUAL
    usb_mouse: UsbMouse | None = None
    migration_port: int = 8102  # 0: the target's kernel picks a free port per migration
    migration_bandwidth: int = 32
    migration_downtime: int = 30
    use_localtime: bool = False
    disk_cache: DiskCache = DiskCache.DEFAULT
    security_model: SecurityModel = SecurityModel.NONE
    security_domain: str | None = None
    kvm_flag: KvmFlag | None = None
    vhost_net: bool = False
    use_chroot: bool = False

    def __post_init__(self) -> None:
        # Types and choices are checked on construction (strings become enums), so that a
        # HvParams object always holds well-typed values; environment checks (files,
        # users) are left to validate_spec.
        problems: list[FieldProblem] = []
        for item in fields(self):
            value = getattr(self, item.name)
            try:
                object.__setattr__(self, item.name, _COERCE[item.name](value))
            except (TypeError, ValueError) as exc:
                problems.append(FieldProblem(item.name, value, str(exc)))
        if problems:
            raise ValidationError(problems)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> HvParams:
        """Build from plain values (a config file), reporting every bad field at once."""
        known = {f.name for f in fields(cls)}
        unknown = [
            FieldProblem(key, value, f"unknown parameter; known: {', '.join(sorted(known))}")
            for key, value in values.items()
            if key not in known
        ]
        try:
            params = cls(**{k: v for k, v in values.items() if k in known})
        except ValidationError as exc:
            raise ValidationError(unknown + exc.problems) from None
        if unknown:
            raise ValidationError(unknown)
        return params

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}


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
            "disks": [{"path": d.path, "mode": d.mode.value} for d in self.disks],
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
                memory_mib=int(values.get("memory_mib", 128)),
                vcpus=int(values.get("vcpus", 1)),
                network_port=values.get("network_port"),
                disks=tuple(
                    Disk(d["path"], DiskMode(d.get("mode", "rw"))) for d in values.get("disks", ())
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


def check_instance_name(name: object) -> str:
    """Return the name if it is safe for paths and shells, else raise ValidationError."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise ValidationError([FieldProblem("name", name, NAME_RULE)])
    return name


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, enum.Enum) else value


def _strict_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError("must be true or false")


def _optional_str(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise ValueError("must be a string or unset")


def _string(value: Any) -> str:
    if isinstance(value, str):
        return value
    raise ValueError("must be a string")


def _integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("must be an integer")
    return value


def _choice(kind: type[enum.StrEnum], optional: bool = False) -> Callable[[Any], Any]:
    def coerce(value: Any) -> Any:
        if value is None and optional:
            return None
        try:
            return kind(value)
        except ValueError:
            allowed = ", ".join(m.value for m in kind)
            raise ValueError(f"must be one of {allowed}{' or unset' if optional else ''}") from None

    return coerce


_COERCE: dict[str, Callable[[Any], Any]] = {
    "kernel_path": _optional_str,
    "initrd_path": _optional_str,
    "root_path": _optional_str,
    "kernel_args": _string,
    "acpi": _strict_bool,
    "serial_console": _strict_bool,
    "vnc_bind_address": _optional_str,
    "vnc_tls": _strict_bool,
    "vnc_x509_path": _optional_str,
    "vnc_x509_verify": _strict_bool,
    "vnc_password_file": _optional_str,
    "cdrom_image_path": _optional_str,
    "boot_order": _choice(BootOrder),
    "nic_type": _choice(NicType),
    "disk_type": _choice(DiskType),
    "usb_mouse": _choice(UsbMouse, optional=True),
    "migration_port": _integer,
    "migration_bandwidth": _integer,
    "migration_downtime": _integer,
    "use_localtime": _strict_bool,
    "disk_cache": _choice(DiskCache),
    "security_model": _choice(SecurityModel),
    "security_domain": _optional_str,
    "kvm_flag": _choice(KvmFlag, optional=True),
    "vhost_net": _strict_bool,
    "use_chroot": _strict_bool,
}


# ----------------------------------------------------------------------------- validation


def is_ipv4(address: str) -> bool:
    """Whether ``address`` is a literal IPv4 address (the ancestor's IsValidIP4)."""
    try:
        ipaddress.IPv4Address(address)
    except ValueError:
        return False
    return True


def is_ipv6(address: str) -> bool:
    """Whether ``address`` is a literal IPv6 address (the ancestor's IsValidIP6)."""
    try:
        ipaddress.IPv6Address(address)
    except ValueError:
        return False
    return True


def _check_file(problems: list[FieldProblem], name: str, path: str | None, what: str) -> None:
    if path is None:
        return
    if not os.path.isabs(path):
        problems.append(FieldProblem(name, path, f"must be an absolute path to {what}"))
    elif not os.path.isfile(path):
        problems.append(FieldProblem(name, path, f"must be an existing {what}"))


def validate_hvparams(hv: HvParams, problems: list[FieldProblem]) -> None:
    """Append every problem of ``hv`` (single fields and cross-field rules) to ``problems``."""
    _check_file(problems, "kernel_path", hv.kernel_path, "file")
    _check_file(problems, "initrd_path", hv.initrd_path, "file")
    _check_file(problems, "vnc_password_file", hv.vnc_password_file, "file")
    _check_file(problems, "cdrom_image_path", hv.cdrom_image_path, "file")
    if hv.vnc_x509_path is not None and not (
        os.path.isabs(hv.vnc_x509_path) and os.path.isdir(hv.vnc_x509_path)
    ):
        problems.append(
            FieldProblem(
                "vnc_x509_path", hv.vnc_x509_path, "must be an existing directory (absolute path)"
            )
        )
    for name in ("vnc_x509_path", "vnc_bind_address"):
        value = getattr(hv, name)
        if value is not None and "," in value:
            problems.append(
                FieldProblem(name, value, "must not contain commas (QEMU option syntax)")
            )
    address = hv.vnc_bind_address
    if address is not None and not (is_ipv4(address) or is_ipv6(address)):
        if not os.path.isabs(address):
            problems.append(
                FieldProblem(
                    "vnc_bind_address",
                    address,
                    "must be an IPv4 address, an IPv6 address, or an absolute directory path",
                )
            )
        elif not os.path.isdir(address):
            problems.append(
                FieldProblem("vnc_bind_address", address, "a path must be an existing directory")
            )
    if hv.kernel_path is not None and not hv.root_path:
        problems.append(
            FieldProblem("root_path", hv.root_path, "must be set when kernel_path is set")
        )
    if hv.vnc_x509_verify and hv.vnc_x509_path is None:
        problems.append(FieldProblem("vnc_x509_verify", True, "needs vnc_x509_path"))
    if hv.boot_order is BootOrder.CDROM and hv.cdrom_image_path is None:
        problems.append(FieldProblem("boot_order", "cdrom", "needs cdrom_image_path"))
    if hv.disk_type in UNSUPPORTED_ON_X86:
        problems.append(
            FieldProblem(
                "disk_type",
                hv.disk_type.value,
                "qemu-system-x86_64's pc machine has no such controller; use ide, scsi, pflash "
                "or paravirtual",
            )
        )
    if not 0 <= hv.migration_port <= 65535:
        problems.append(
            FieldProblem(
                "migration_port",
                hv.migration_port,
                "must be a TCP port, 1 to 65535, or 0 to let the target pick a free one",
            )
        )
    for name in ("migration_bandwidth", "migration_downtime"):
        value = getattr(hv, name)
        if value <= 0:
            problems.append(FieldProblem(name, value, "must be a positive integer"))
    _validate_security(hv, problems)
    for name in ("root_path", "kernel_args"):
        value = getattr(hv, name) or ""
        if "\n" in value or "\x00" in value:
            problems.append(FieldProblem(name, value, "must be one line without NUL bytes"))


def _validate_security(hv: HvParams, problems: list[FieldProblem]) -> None:
    if hv.security_model is SecurityModel.USER:
        if not hv.security_domain:
            problems.append(
                FieldProblem(
                    "security_domain",
                    hv.security_domain,
                    "security_model=user needs an existing user name",
                )
            )
        else:
            try:
                pwd.getpwnam(hv.security_domain)
            except KeyError:
                problems.append(
                    FieldProblem(
                        "security_domain", hv.security_domain, "must name an existing user"
                    )
                )
    elif hv.security_domain is not None:
        problems.append(
            FieldProblem(
                "security_domain",
                hv.security_domain,
                f"must be unset with security_model={hv.security_model.value}",
            )
        )


def validate_spec(spec: InstanceSpec) -> None:
    """Check the whole instance description; raise one ValidationError listing everything."""
    problems: list[FieldProblem] = []
    if (
        isinstance(spec.memory_mib, bool)
        or not isinstance(spec.memory_mib, int)
        or (spec.memory_mib < 16)
    ):
        problems.append(FieldProblem("memory_mib", spec.memory_mib, "an integer, at least 16"))
    if (
        isinstance(spec.vcpus, bool)
        or not isinstance(spec.vcpus, int)
        or not (1 <= spec.vcpus <= 255)
    ):
        problems.append(FieldProblem("vcpus", spec.vcpus, "an integer from 1 to 255"))
    port = spec.network_port
    if (
        spec.hvparams.vnc_bind_address is not None
        and is_ip(spec.hvparams.vnc_bind_address)
        and (not isinstance(port, int) or not VNC_BASE_PORT <= port <= 65535)
    ):
        problems.append(
            FieldProblem(
                "network_port",
                port,
                f"VNC on an IP address needs a port from {VNC_BASE_PORT} to 65535 "
                f"(display = port - {VNC_BASE_PORT})",
            )
        )
    for index, disk in enumerate(spec.disks):
        if disk.mode is not DiskMode.READ_WRITE:
            problems.append(
                FieldProblem(
                    f"disks[{index}].mode",
                    disk.mode.value,
                    "read-only disks are not supported; use rw",
                )
            )
        if not os.path.isabs(disk.path) or "," in disk.path:
            problems.append(
                FieldProblem(
                    f"disks[{index}].path", disk.path, "must be an absolute path without commas"
                )
            )
        elif not os.path.exists(disk.path):
            problems.append(FieldProblem(f"disks[{index}].path", disk.path, "must exist"))
    for index, nic in enumerate(spec.nics):
        _validate_nic(index, nic, problems)
    for index, tag in enumerate(spec.tags):
        if not isinstance(tag, str) or not tag or "\n" in tag or "\x00" in tag:
            problems.append(FieldProblem(f"tags[{index}]", tag, "a non-empty single-line string"))
    if spec.hvparams.cdrom_image_path and "," in spec.hvparams.cdrom_image_path:
        problems.append(
            FieldProblem(
                "cdrom_image_path", spec.hvparams.cdrom_image_path, "must not contain commas"
            )
        )
    validate_hvparams(spec.hvparams, problems)
    if problems:
        raise ValidationError(problems)


def _validate_nic(index: int, nic: Nic, problems: list[FieldProblem]) -> None:
    if not isinstance(nic.mac, str) or not MAC_PATTERN.fullmatch(nic.mac):
        problems.append(
            FieldProblem(
                f"nics[{index}].mac", nic.mac, "six lower-case hex pairs separated by colons"
            )
        )
    if nic.ip is not None and not is_ip(nic.ip):
        problems.append(FieldProblem(f"nics[{index}].ip", nic.ip, "an IPv4 or IPv6 address"))
    if nic.mode is NicMode.ROUTED and nic.ip is None:
        problems.append(FieldProblem(f"nics[{index}].ip", None, "a routed NIC needs an IP"))
    if nic.link is not None and (not nic.link or "\n" in nic.link or "\x00" in nic.link):
        problems.append(
            FieldProblem(f"nics[{index}].link", nic.link, "a non-empty single-line name")
        )


def is_ip(address: str) -> bool:
    """Whether ``address`` is a literal IPv4 or IPv6 address."""
    return is_ipv4(address) or is_ipv6(address)
