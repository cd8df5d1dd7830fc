"""The QEMU command line for an instance, one argv element per argument.

No shell ever sees these arguments. What differs between QEMU versions comes from the
binary's own :class:`~kvmflow.kvm.qemu_info.QemuInfo`: the machine type an alias stands for
(pinned into the saved argv at the first start, so that every restart and migration target
gets the same hardware), and ``-run-with`` (QEMU 9.1+) or ``-runas``/``-chroot`` (older).
Where the ancestor used a spelling QEMU 7.2 rejects, today's equivalent is used:

=================================  ==============================================
ancestor                           kvmflow
=================================  ==============================================
``-net nic,vlan=N,macaddr=..``     ``-netdev tap,id=..`` + ``-device MODEL,mac=..``
``-drive ...,boot=on``             ``-boot order=c|d|n``
``-localtime``                     ``-rtc base=localtime``
``-disable-kvm`` / ``-enable-kvm`` ``-accel tcg`` / ``-accel kvm``
``-no-acpi``                       ``-machine acpi=off``
``-usbdevice tablet``              ``-usb -device usb-tablet``
``-vnc ..,tls,x509=DIR``           ``-object tls-creds-*`` + ``-vnc ..,tls-creds=ID``
``-vnc ..,password``               ``-vnc ..,password=on``
``-nographic`` (no VNC)            ``-display none`` (``-nographic`` clashes with
                                   ``-daemonize``)
``-drive if=scsi``                 ``-device virtio-scsi-pci`` + ``scsi-hd`` (pc has
                                   no built-in SCSI bus in QEMU 7.2)
=================================  ==============================================
"""

from __future__ import annotations

import itertools

from kvmflow.errors import FieldProblem, ValidationError
from kvmflow.kvm.hvparams import BootOrder, DiskCache, DiskType, KvmFlag, NicType, SecurityModel
from kvmflow.kvm.qemu_info import QemuInfo
from kvmflow.kvm.runtime import RuntimePaths
from kvmflow.kvm.spec import VNC_BASE_PORT, InstanceSpec
from kvmflow.kvm.validation import is_ipv4, is_ipv6

QEMU_BINARY = "qemu-system-x86_64"

NIC_MODELS = {
    NicType.PARAVIRTUAL: "virtio-net-pci",
    NicType.RTL8139: "rtl8139",
    NicType.NE2K_PCI: "ne2k_pci",
    NicType.NE2K_ISA: "ne2k_isa",
    NicType.I82551: "i82551",
    NicType.I82557B: "i82557b",
    NicType.I82559ER: "i82559er",
    NicType.PCNET: "pcnet",
    NicType.E1000: "e1000",
}

DRIVE_INTERFACES = {
    DiskType.PARAVIRTUAL: "virtio",
    DiskType.IDE: "ide",
    DiskType.PFLASH: "pflash",
    DiskType.SD: "sd",
    DiskType.MTD: "mtd",
}

BOOT_DEVICES = {BootOrder.DISK: "c", BootOrder.CDROM: "d", BootOrder.NETWORK: "n"}


#: Options that belong to one start on one node, never to the saved argv.
PER_START_OPTIONS = frozenset({"-runas", "-chroot", "-run-with", "-incoming", "-D"})


def build_argv(
    spec: InstanceSpec,
    paths: RuntimePaths,
    qemu: QemuInfo,
    *,
    default_accelerator: str = "kvm",
    node: str = "local",
) -> list[str]:
    """The part of the command line that is saved in the runtime and reused on restart
    (local disks at their paths on ``node``); raises :class:`ValidationError` for a machine
    type or CPU model ``qemu`` lacks."""
    hv = spec.hvparams
    name = spec.name
    machine = _machine_type(spec, qemu)
    argv = [
        qemu.binary,
        "-name",
        name,
        "-m",
        str(spec.memory_mib),
        "-smp",
        str(spec.vcpus),
        "-pidfile",
        paths.pid_file(name),
        "-daemonize",
    ]
    argv += ["-machine", f"type={machine}" + ("" if hv.acpi else ",acpi=off")]
    if hv.cpu_type is not None:
        argv += ["-cpu", hv.cpu_type]
    if hv.kvm_flag is KvmFlag.ENABLED:
        accelerator = "kvm"
    elif hv.kvm_flag is KvmFlag.DISABLED:
        accelerator = "tcg"
    else:
        accelerator = default_accelerator
    argv += ["-accel", accelerator]
    argv += ["-boot", f"order={BOOT_DEVICES[hv.boot_order]}"]
    argv += _disk_args(spec, node)
    if hv.cdrom_image_path:
        argv += ["-drive", f"file={hv.cdrom_image_path},format=raw,media=cdrom,if=ide,readonly=on"]
    if hv.kernel_path:
        argv += ["-kernel", hv.kernel_path]
        if hv.initrd_path:
            argv += ["-initrd", hv.initrd_path]
        append = f"root={hv.root_path}"
        if hv.kernel_args:
            append += f" {hv.kernel_args}"
        if hv.serial_console:
            append += " console=ttyS0,38400"
        argv += ["-append", append]
    if hv.usb_mouse is not None:
        argv += ["-usb", "-device", f"usb-{hv.usb_mouse.value}"]
    argv += _vnc_args(spec, paths)
    if hv.serial_console:
        argv += ["-serial", f"unix:{paths.serial_socket(name)},server=on,wait=off"]
    else:
        argv += ["-serial", "none"]
    argv += ["-qmp", f"unix:{paths.qmp_socket(name)},server=on,wait=off"]
    argv += ["-qmp", f"unix:{paths.takeover_socket(name)},server=on,wait=off"]
    argv += ["-monitor", f"unix:{paths.hmp_socket(name)},server=on,wait=off"]
    if hv.use_localtime:
        argv += ["-rtc", "base=localtime"]
    argv += _nic_args(spec, paths)
    return argv


def _machine_type(spec: InstanceSpec, qemu: QemuInfo) -> str:
    """The concrete machine type for ``spec`` on ``qemu``, after checking its CPU model too."""
    hv = spec.hvparams
    problems: list[FieldProblem] = []
    machine = ""
    try:
        machine = qemu.resolve_machine(hv.machine_version)
    except LookupError as exc:
        problems.append(FieldProblem("machine_version", hv.machine_version, str(exc)))
    if hv.cpu_type is not None and hv.cpu_type not in qemu.cpu_models:
        problems.append(
            FieldProblem(
                "cpu_type",
                hv.cpu_type,
                f"QEMU {qemu.version_text} ({qemu.binary}) has no such CPU model",
            )
        )
    if problems:
        raise ValidationError(problems)
    return machine


def execution_args(
    spec: InstanceSpec,
    paths: RuntimePaths,
    qemu: QemuInfo,
    *,
    uid: int | None = None,
    incoming: str | None = None,
) -> list[str]:
    """Per-start arguments taken from the current configuration and this node's QEMU, never
    saved: the user and chroot to run as, the log that keeps QEMU's stderr after it
    daemonizes (``-D``), and ``-incoming`` for a migration target."""
    hv = spec.hvparams
    user: str | None = None
    if hv.security_model is SecurityModel.USER:
        assert hv.security_domain is not None
        user = hv.security_domain
    elif hv.security_model is SecurityModel.POOL:
        if uid is None:
            raise ValidationError(
                [FieldProblem("security_model", "pool", "needs a uid from the uid pool")]
            )
        user = f"{uid}:{uid}"
    chroot = paths.chroot_dir(spec.name) if hv.use_chroot else None
    args: list[str] = []
    if qemu.uses_run_with:
        settings = [f"user={user}"] if user else []
        settings += [f"chroot={chroot}"] if chroot else []
        if settings:
            args += ["-run-with", ",".join(settings)]
    else:
        args += ["-runas", user] if user else []
        args += ["-chroot", chroot] if chroot else []
    args += ["-D", paths.log_file(spec.name)]
    if incoming is not None:
        args += ["-incoming", incoming]
    return args


def portable_argv(argv: list[str], qemu_binary: str) -> list[str]:
    """A saved argv for a start on another node or QEMU: that node's binary as argv[0], and
    none of the per-start options (runtimes saved before they moved out still carry
    ``-chroot``)."""
    kept = [qemu_binary]
    rest = iter(argv[1:])
    for arg in rest:
        if arg in PER_START_OPTIONS:
            next(rest, None)
        else:
            kept.append(arg)
    return kept


def relocate_disks(argv: list[str], spec: InstanceSpec, source: str, target: str) -> list[str]:
    """``argv`` with each local disk's path on ``source`` replaced by its path on ``target``."""
    moved = list(argv)
    for disk in spec.disks:
        old, new = f"file={disk.path_on(source)},", f"file={disk.path_on(target)},"
        if disk.local and old != new:
            moved = [arg.replace(old, new) if arg.startswith(old) else arg for arg in moved]
    return moved


def machine_of(argv: list[str]) -> str | None:
    """The machine type a saved argv pins (``-machine type=X,...``), or ``None``."""
    for flag, value in itertools.pairwise(argv):
        if flag == "-machine":
            for setting in value.split(","):
                if setting.startswith("type="):
                    return setting.removeprefix("type=")
    return None


def pin_machine(argv: list[str], machine: str) -> list[str]:
    """``argv`` with its machine type set to ``machine`` (for runtimes saved unpinned)."""
    pinned = list(argv)
    for index, flag in enumerate(pinned[:-1]):
        if flag == "-machine":
            settings = [s for s in pinned[index + 1].split(",") if not s.startswith("type=")]
            pinned[index + 1] = ",".join([f"type={machine}", *settings])
            return pinned
    return [pinned[0], "-machine", f"type={machine}", *pinned[1:]]


def _disk_args(spec: InstanceSpec, node: str) -> list[str]:
    hv = spec.hvparams
    cache = "" if hv.disk_cache is DiskCache.DEFAULT else f",cache={hv.disk_cache.value}"
    args: list[str] = []
    if hv.disk_type is DiskType.SCSI and spec.disks:
        args += ["-device", "virtio-scsi-pci,id=scsi0"]
    for index, disk in enumerate(spec.disks):
        if hv.disk_type is DiskType.SCSI:
            args += [
                "-drive",
                f"file={disk.path_on(node)},format=raw,if=none,id=disk{index}{cache}",
                "-device",
                f"scsi-hd,drive=disk{index},bus=scsi0.0",
            ]
        else:
            interface = DRIVE_INTERFACES[hv.disk_type]
            args += ["-drive", f"file={disk.path_on(node)},format=raw,if={interface}{cache}"]
    return args


def _vnc_args(spec: InstanceSpec, paths: RuntimePaths) -> list[str]:
    hv = spec.hvparams
    address = hv.vnc_bind_address
    if address is None:
        return ["-display", "none"]
    args: list[str] = []
    if is_ipv4(address) or is_ipv6(address):
        port = spec.network_port
        if port is None or port < VNC_BASE_PORT:
            raise ValidationError(
                [
                    FieldProblem(
                        "network_port", port, f"VNC needs a port of at least {VNC_BASE_PORT}"
                    )
                ]
            )
        host = f"[{address}]" if is_ipv6(address) else address
        display = f"{host}:{port - VNC_BASE_PORT}"
    else:
        display = f"unix:{paths.vnc_socket(address, spec.name)}"
    options = ""
    if hv.vnc_tls:
        if hv.vnc_x509_path:
            verify = "on" if hv.vnc_x509_verify else "off"
            args += [
                "-object",
                f"tls-creds-x509,id=vnctls0,endpoint=server,"
                f"dir={hv.vnc_x509_path},verify-peer={verify}",
            ]
        else:
            args += ["-object", "tls-creds-anon,id=vnctls0,endpoint=server"]
        options += ",tls-creds=vnctls0"
    if hv.vnc_password_file:
        options += ",password=on"
    return [*args, "-vnc", display + options]


def _nic_args(spec: InstanceSpec, paths: RuntimePaths) -> list[str]:
    if not spec.nics:
        return ["-nic", "none"]
    hv = spec.hvparams
    model = NIC_MODELS[hv.nic_type]
    args: list[str] = []
    for index, nic in enumerate(spec.nics):
        netdev = f"tap,id=nic{index},script={paths.nic_script(spec.name, index)},downscript=no"
        if hv.vhost_net:
            netdev += ",vhost=on"
        args += ["-netdev", netdev, "-device", f"{model},netdev=nic{index},mac={nic.mac}"]
    return args
