"""The QEMU 7.2+ command line for an instance, one argv element per argument.

No shell ever sees these arguments. Where the ancestor used a spelling QEMU 7.2 rejects,
today's equivalent is used (each checked against the installed QEMU):

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

from kvmflow.errors import FieldProblem, ValidationError
from kvmflow.kvm.hvparams import BootOrder, DiskCache, DiskType, KvmFlag, NicType, SecurityModel
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


def build_argv(
    spec: InstanceSpec,
    paths: RuntimePaths,
    *,
    default_accelerator: str = "kvm",
    qemu_binary: str = QEMU_BINARY,
) -> list[str]:
    """The part of the command line that is saved in the runtime and reused on restart."""
    hv = spec.hvparams
    name = spec.name
    argv = [
        qemu_binary,
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
    if not hv.acpi:
        argv += ["-machine", "acpi=off"]
    if hv.kvm_flag is KvmFlag.ENABLED:
        accelerator = "kvm"
    elif hv.kvm_flag is KvmFlag.DISABLED:
        accelerator = "tcg"
    else:
        accelerator = default_accelerator
    argv += ["-accel", accelerator]
    argv += ["-boot", f"order={BOOT_DEVICES[hv.boot_order]}"]
    argv += _disk_args(spec)
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
    argv += ["-monitor", f"unix:{paths.hmp_socket(name)},server=on,wait=off"]
    if hv.use_localtime:
        argv += ["-rtc", "base=localtime"]
    if hv.use_chroot:
        argv += ["-chroot", paths.chroot_dir(name)]
    argv += _nic_args(spec, paths)
    return argv


def execution_args(
    spec: InstanceSpec, *, uid: int | None = None, incoming: str | None = None
) -> list[str]:
    """Per-start arguments taken from the current configuration, never saved: security
    (``-runas``) and ``-incoming`` for a migration target."""
    hv = spec.hvparams
    args: list[str] = []
    if hv.security_model is SecurityModel.USER:
        assert hv.security_domain is not None
        args += ["-runas", hv.security_domain]
    elif hv.security_model is SecurityModel.POOL:
        if uid is None:
            raise ValidationError(
                [FieldProblem("security_model", "pool", "needs a uid from the uid pool")]
            )
        args += ["-runas", f"{uid}:{uid}"]
    if incoming is not None:
        args += ["-incoming", incoming]
    return args


def _disk_args(spec: InstanceSpec) -> list[str]:
    hv = spec.hvparams
    cache = "" if hv.disk_cache is DiskCache.DEFAULT else f",cache={hv.disk_cache.value}"
    args: list[str] = []
    if hv.disk_type is DiskType.SCSI and spec.disks:
        args += ["-device", "virtio-scsi-pci,id=scsi0"]
    for index, disk in enumerate(spec.disks):
        if hv.disk_type is DiskType.SCSI:
            args += [
                "-drive",
                f"file={disk.path},format=raw,if=none,id=disk{index}{cache}",
                "-device",
                f"scsi-hd,drive=disk{index},bus=scsi0.0",
            ]
        else:
            interface = DRIVE_INTERFACES[hv.disk_type]
            args += ["-drive", f"file={disk.path},format=raw,if={interface}{cache}"]
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
