"""The hypervisor parameters of the ancestor (Ganeti's KVM module), typed and coerced.

Each field carries its coercer as field metadata, so that a field cannot be added without
one: plain values from a config file (strings for choices) become enums on construction,
and a wrong type is a :class:`ValidationError` naming the field, never a ``KeyError``.
Rules that need the filesystem or other fields live in :mod:`kvmflow.kvm.validation`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from kvmflow.errors import FieldProblem, ValidationError


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


def _coerce(coerce: Callable[[Any], Any]) -> dict[str, Callable[[Any], Any]]:
    """A field's metadata: the coercer that checks and converts its value."""
    return {"coerce": coerce}


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


@dataclass(frozen=True)
class HvParams:
    """The hypervisor parameters of the ancestor, with its defaults."""

    kernel_path: str | None = field(default=None, metadata=_coerce(_optional_str))
    initrd_path: str | None = field(default=None, metadata=_coerce(_optional_str))
    root_path: str | None = field(default=None, metadata=_coerce(_optional_str))
    kernel_args: str = field(default="", metadata=_coerce(_string))
    acpi: bool = field(default=True, metadata=_coerce(_strict_bool))
    serial_console: bool = field(default=True, metadata=_coerce(_strict_bool))
    vnc_bind_address: str | None = field(default=None, metadata=_coerce(_optional_str))
    vnc_tls: bool = field(default=False, metadata=_coerce(_strict_bool))
    vnc_x509_path: str | None = field(default=None, metadata=_coerce(_optional_str))
    vnc_x509_verify: bool = field(default=False, metadata=_coerce(_strict_bool))
    vnc_password_file: str | None = field(default=None, metadata=_coerce(_optional_str))
    cdrom_image_path: str | None = field(default=None, metadata=_coerce(_optional_str))
    boot_order: BootOrder = field(default=BootOrder.DISK, metadata=_coerce(_choice(BootOrder)))
    nic_type: NicType = field(default=NicType.PARAVIRTUAL, metadata=_coerce(_choice(NicType)))
    disk_type: DiskType = field(default=DiskType.PARAVIRTUAL, metadata=_coerce(_choice(DiskType)))
    usb_mouse: UsbMouse | None = field(
        default=None, metadata=_coerce(_choice(UsbMouse, optional=True))
    )
    # 0: the target's kernel picks a free port per migration
    migration_port: int = field(default=8102, metadata=_coerce(_integer))
    migration_bandwidth: int = field(default=32, metadata=_coerce(_integer))
    migration_downtime: int = field(default=30, metadata=_coerce(_integer))
    use_localtime: bool = field(default=False, metadata=_coerce(_strict_bool))
    disk_cache: DiskCache = field(default=DiskCache.DEFAULT, metadata=_coerce(_choice(DiskCache)))
    security_model: SecurityModel = field(
        default=SecurityModel.NONE, metadata=_coerce(_choice(SecurityModel))
    )
    security_domain: str | None = field(default=None, metadata=_coerce(_optional_str))
    kvm_flag: KvmFlag | None = field(
        default=None, metadata=_coerce(_choice(KvmFlag, optional=True))
    )
    vhost_net: bool = field(default=False, metadata=_coerce(_strict_bool))
    use_chroot: bool = field(default=False, metadata=_coerce(_strict_bool))
    # None: the node's QEMU default (pc), pinned to its concrete version at the first start
    machine_version: str | None = field(default=None, metadata=_coerce(_optional_str))
    cpu_type: str | None = field(default=None, metadata=_coerce(_optional_str))  # None: qemu64

    def __post_init__(self) -> None:
        # Types and choices are checked on construction (strings become enums), so that a
        # HvParams object always holds well-typed values; environment checks (files,
        # users) are left to validation.
        problems: list[FieldProblem] = []
        for item in fields(self):
            value = getattr(self, item.name)
            try:
                object.__setattr__(self, item.name, item.metadata["coerce"](value))
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
        return {f.name: plain(getattr(self, f.name)) for f in fields(self)}


def plain(value: Any) -> Any:
    """An enum's value, anything else as it is (for JSON)."""
    return value.value if isinstance(value, enum.Enum) else value
