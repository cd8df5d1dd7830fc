"""Checking an instance description, all at once: its own rules, and what the node it goes
to must have.

Rules of the description alone (ranges, formats, cross-field rules) are pure. What the
description needs from a machine (a kernel file, a directory, a user) is a list of
:class:`Requirement` checked where the instance will run: :func:`validate_spec_on` asks the
node (over SSH for a remote one), :func:`validate_spec` this machine. Every problem is
reported at once in one :class:`ValidationError`; nothing is written.
"""

from __future__ import annotations

import enum
import ipaddress
import os
import pwd
import re
from dataclasses import dataclass

from kvmflow.errors import FieldProblem, ValidationError
from kvmflow.kvm.hvparams import UNSUPPORTED_ON_X86, BootOrder, HvParams, SecurityModel
from kvmflow.kvm.spec import (
    MAC_PATTERN,
    NODE_PLACEHOLDER,
    VNC_BASE_PORT,
    DiskMode,
    InstanceSpec,
    Nic,
    NicMode,
)
from kvmflow.node.base import Node


class Need(enum.StrEnum):
    FILE = "file"
    DIRECTORY = "directory"
    PATH = "path"  # any kind of file (a disk may be a block device)
    USER = "user"


@dataclass(frozen=True)
class Requirement:
    """``subject`` (a path or a user name) must exist on the node as ``need``; otherwise
    ``field`` gets the problem ``rule``."""

    field: str
    subject: str
    need: Need
    rule: str


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


def is_ip(address: str) -> bool:
    """Whether ``address`` is a literal IPv4 or IPv6 address."""
    return is_ipv4(address) or is_ipv6(address)


def validate_spec(spec: InstanceSpec) -> None:
    """Check ``spec`` for this machine; raise one ValidationError listing everything."""
    problems, needs = spec_problems(spec)
    problems += [_problem(r) for r in needs if not _met_here(r)]
    if problems:
        raise ValidationError(problems)


async def validate_spec_on(spec: InstanceSpec, node: Node) -> None:
    """Check ``spec`` for ``node`` (files and users looked up there)."""
    problems, needs = spec_problems(spec)
    for requirement in needs:
        if not await _met_on(requirement, node):
            problems.append(_problem(requirement))
    if problems:
        raise ValidationError(problems)


def _problem(requirement: Requirement) -> FieldProblem:
    return FieldProblem(requirement.field, requirement.subject, requirement.rule)


def _met_here(requirement: Requirement) -> bool:
    subject = requirement.subject.replace(NODE_PLACEHOLDER, "local")
    if requirement.need is Need.USER:
        try:
            pwd.getpwnam(subject)
        except KeyError:
            return False
        return True
    if requirement.need is Need.FILE:
        return os.path.isfile(subject)
    if requirement.need is Need.DIRECTORY:
        return os.path.isdir(subject)
    return os.path.exists(subject)


async def _met_on(requirement: Requirement, node: Node) -> bool:
    if requirement.need is Need.USER:
        return await node.user_exists(requirement.subject)
    kind = await node.path_kind(requirement.subject.replace(NODE_PLACEHOLDER, node.name))
    if requirement.need is Need.PATH:
        return kind is not None
    return kind == requirement.need.value


def spec_problems(spec: InstanceSpec) -> tuple[list[FieldProblem], list[Requirement]]:
    """The problems of ``spec`` itself, and what a node must have for it."""
    problems: list[FieldProblem] = []
    needs: list[Requirement] = []
    if (
        isinstance(spec.memory_mib, bool)
        or not isinstance(spec.memory_mib, int)
        or spec.memory_mib < 16
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
        name = f"disks[{index}]"
        if disk.mode is not DiskMode.READ_WRITE:
            problems.append(
                FieldProblem(
                    f"{name}.mode", disk.mode.value, "read-only disks are not supported; use rw"
                )
            )
        if not os.path.isabs(disk.path) or "," in disk.path:
            problems.append(
                FieldProblem(f"{name}.path", disk.path, "must be an absolute path without commas")
            )
        elif NODE_PLACEHOLDER in disk.path and not disk.local:
            problems.append(
                FieldProblem(
                    f"{name}.path", disk.path, "only a local disk's path may name its {node}"
                )
            )
        else:
            needs.append(Requirement(f"{name}.path", disk.path, Need.PATH, "must exist"))
        if disk.keep_source and not disk.local:
            problems.append(
                FieldProblem(f"{name}.keep_source", True, "only a local disk has a source copy")
            )
    for index, nic in enumerate(spec.nics):
        _check_nic(index, nic, problems)
    for index, tag in enumerate(spec.tags):
        if not isinstance(tag, str) or not tag or "\n" in tag or "\x00" in tag:
            problems.append(FieldProblem(f"tags[{index}]", tag, "a non-empty single-line string"))
    if spec.hvparams.cdrom_image_path and "," in spec.hvparams.cdrom_image_path:
        problems.append(
            FieldProblem(
                "cdrom_image_path", spec.hvparams.cdrom_image_path, "must not contain commas"
            )
        )
    _check_hvparams(spec.hvparams, problems, needs)
    return problems, needs


def _check_nic(index: int, nic: Nic, problems: list[FieldProblem]) -> None:
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


def _file(
    problems: list[FieldProblem], needs: list[Requirement], name: str, path: str | None
) -> None:
    if path is None:
        return
    if not os.path.isabs(path):
        problems.append(FieldProblem(name, path, "must be an absolute path to file"))
    else:
        needs.append(Requirement(name, path, Need.FILE, "must be an existing file"))


def _check_hvparams(hv: HvParams, problems: list[FieldProblem], needs: list[Requirement]) -> None:
    for name in ("kernel_path", "initrd_path", "vnc_password_file", "cdrom_image_path"):
        _file(problems, needs, name, getattr(hv, name))
    if hv.vnc_x509_path is not None:
        rule = "must be an existing directory (absolute path)"
        if os.path.isabs(hv.vnc_x509_path):
            needs.append(Requirement("vnc_x509_path", hv.vnc_x509_path, Need.DIRECTORY, rule))
        else:
            problems.append(FieldProblem("vnc_x509_path", hv.vnc_x509_path, rule))
    for name in ("vnc_x509_path", "vnc_bind_address"):
        value = getattr(hv, name)
        if value is not None and "," in value:
            problems.append(
                FieldProblem(name, value, "must not contain commas (QEMU option syntax)")
            )
    address = hv.vnc_bind_address
    if address is not None and not is_ip(address):
        if not os.path.isabs(address):
            problems.append(
                FieldProblem(
                    "vnc_bind_address",
                    address,
                    "must be an IPv4 address, an IPv6 address, or an absolute directory path",
                )
            )
        else:
            needs.append(
                Requirement(
                    "vnc_bind_address",
                    address,
                    Need.DIRECTORY,
                    "a path must be an existing directory",
                )
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
    _check_security(hv, problems, needs)
    for name, rule in (
        ("machine_version", "a QEMU machine type such as pc, q35 or pc-i440fx-7.2"),
        ("cpu_type", "a QEMU CPU model name such as qemu64, host or Skylake-Client-v4"),
    ):
        value = getattr(hv, name)
        if value is not None and not _QEMU_NAME.fullmatch(value):
            problems.append(FieldProblem(name, value, f"{rule}: letters, digits, '.', '_', '-'"))
    for name in ("root_path", "kernel_args"):
        value = getattr(hv, name) or ""
        if "\n" in value or "\x00" in value:
            problems.append(FieldProblem(name, value, "must be one line without NUL bytes"))


_QEMU_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _check_security(hv: HvParams, problems: list[FieldProblem], needs: list[Requirement]) -> None:
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
            needs.append(
                Requirement(
                    "security_domain", hv.security_domain, Need.USER, "must name an existing user"
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
