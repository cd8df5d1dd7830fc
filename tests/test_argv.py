"""The QEMU command line for each parameter (modern spellings only)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest

from kvmflow.errors import ValidationError
from kvmflow.kvm import Disk, HvParams, InstanceSpec, Nic, RuntimePaths, build_argv
from kvmflow.kvm.argv import execution_args, machine_of, pin_machine, portable_argv
from kvmflow.kvm.hvparams import DiskCache, DiskType, KvmFlag, NicType, SecurityModel, UsbMouse
from kvmflow.kvm.qemu_info import CpuModel, MachineType, QemuInfo

PATHS = RuntimePaths("/run/kvf")


def qemu(major: int, options: set[str]) -> QemuInfo:
    """What a probe of QEMU ``major``.0 says, as far as the command line needs it."""
    machines = {
        f"pc-i440fx-{major}.0": MachineType(f"pc-i440fx-{major}.0", "pc", True),
        f"pc-q35-{major}.0": MachineType(f"pc-q35-{major}.0", "q35"),
        "pc-i440fx-7.2": MachineType("pc-i440fx-7.2"),
    }
    return QemuInfo(
        binary="qemu-system-x86_64",
        version=(major, 0, 0),
        machines=machines,
        cpu_models={"qemu64": CpuModel("qemu64")},
        options=frozenset({"name", "machine", "D", *options}),
    )


QEMU_7 = qemu(7, {"runas", "chroot"})
QEMU_10 = qemu(10, {"run-with"})


def argv_for(spec: InstanceSpec | None = None, **hv: Any) -> list[str]:
    spec = spec or InstanceSpec("vm1", hvparams=HvParams(**hv))
    return build_argv(spec, PATHS, QEMU_7, default_accelerator="kvm")


def pairs(argv: list[str]) -> list[tuple[str, str]]:
    return [(a, b) for a, b in itertools.pairwise(argv) if a.startswith("-")]


def test_base_command_line() -> None:
    argv = argv_for(InstanceSpec("vm1", memory_mib=256, vcpus=2))
    assert argv[0] == "qemu-system-x86_64"
    p = pairs(argv)
    for expected in [
        ("-name", "vm1"),
        ("-m", "256"),
        ("-smp", "2"),
        ("-pidfile", "/run/kvf/pid/vm1"),
        ("-accel", "kvm"),
        ("-boot", "order=c"),
        ("-qmp", "unix:/run/kvf/ctrl/vm1.qmp,server=on,wait=off"),
        ("-monitor", "unix:/run/kvf/ctrl/vm1.monitor,server=on,wait=off"),
        ("-serial", "unix:/run/kvf/ctrl/vm1.serial,server=on,wait=off"),
        ("-display", "none"),
        ("-nic", "none"),
    ]:
        assert expected in p
    assert "-daemonize" in argv


@pytest.mark.parametrize(
    "old",
    ["-net", "-localtime", "-disable-kvm", "-enable-kvm", "-no-acpi", "-usbdevice", "-nographic"],
)
def test_no_spelling_that_qemu_7_2_rejects(old: str) -> None:
    spec = InstanceSpec(
        "vm1",
        disks=(Disk("/dev/vg/d0"),),
        nics=(Nic("52:54:00:00:00:01"),),
        hvparams=HvParams(
            acpi=False, use_localtime=True, kvm_flag=KvmFlag.DISABLED, usb_mouse=UsbMouse.MOUSE
        ),
    )
    argv = argv_for(spec)
    assert old not in argv
    assert not any("boot=on" in a or "vlan=" in a for a in argv)


def test_acpi_off_and_accelerators() -> None:
    assert ("-machine", "type=pc-i440fx-7.0,acpi=off") in pairs(argv_for(acpi=False))
    assert ("-accel", "kvm") in pairs(argv_for(kvm_flag=KvmFlag.ENABLED))
    assert ("-accel", "tcg") in pairs(argv_for(kvm_flag=KvmFlag.DISABLED))
    spec = InstanceSpec("vm1")
    assert ("-accel", "tcg") in pairs(build_argv(spec, PATHS, QEMU_7, default_accelerator="tcg"))


@pytest.mark.parametrize(
    ("wanted", "qemu_info", "pinned"),
    [
        (None, QEMU_7, "pc-i440fx-7.0"),
        (None, QEMU_10, "pc-i440fx-10.0"),
        ("q35", QEMU_10, "pc-q35-10.0"),
        ("pc-i440fx-7.2", QEMU_10, "pc-i440fx-7.2"),
    ],
)
def test_machine_alias_is_pinned_to_this_qemus_versioned_type(
    wanted: str | None, qemu_info: QemuInfo, pinned: str
) -> None:
    """The saved argv names a concrete machine type, so that every restart and every
    migration target gets the hardware of the first start."""
    spec = InstanceSpec("vm1", hvparams=HvParams(machine_version=wanted))
    argv = build_argv(spec, PATHS, qemu_info)
    assert ("-machine", f"type={pinned}") in pairs(argv)
    assert machine_of(argv) == pinned


def test_unknown_machine_and_cpu_are_refused_together() -> None:
    spec = InstanceSpec("vm1", hvparams=HvParams(machine_version="pc-i440fx-10.0", cpu_type="Zen9"))
    with pytest.raises(ValidationError) as caught:
        build_argv(spec, PATHS, QEMU_7)
    text = str(caught.value)
    assert "machine_version" in text
    assert "it has pc-i440fx-7.2, pc-i440fx-7.0" in text
    assert "cpu_type" in text
    assert "Zen9" in text


def test_cpu_type() -> None:
    assert ("-cpu", "qemu64") in pairs(argv_for(cpu_type="qemu64"))
    assert "-cpu" not in argv_for()


def test_hvparams_names_refuse_metacharacters() -> None:
    from kvmflow.kvm.validation import spec_problems

    spec = InstanceSpec("vm1", hvparams=HvParams(machine_version="pc;rm", cpu_type="host,+vmx"))
    problems, _ = spec_problems(spec)
    assert {p.field for p in problems} == {"machine_version", "cpu_type"}


def test_portable_argv_takes_this_nodes_binary_and_drops_per_start_options() -> None:
    saved = ["/usr/bin/qemu-system-x86_64", "-name", "vm1", "-chroot", "/c", "-m", "64"]
    saved += ["-runas", "nobody", "-D", "/l", "-incoming", "defer"]
    assert portable_argv(saved, "/opt/qemu-10/bin/qemu-system-x86_64") == [
        "/opt/qemu-10/bin/qemu-system-x86_64",
        "-name",
        "vm1",
        "-m",
        "64",
    ]


def test_pin_machine_on_runtimes_saved_unpinned() -> None:
    assert pin_machine(["q", "-m", "64"], "pc-i440fx-7.2") == [
        "q",
        "-machine",
        "type=pc-i440fx-7.2",
        "-m",
        "64",
    ]
    assert pin_machine(["q", "-machine", "acpi=off"], "pc-q35-7.2") == [
        "q",
        "-machine",
        "type=pc-q35-7.2,acpi=off",
    ]
    assert machine_of(["q", "-machine", "acpi=off"]) is None


@pytest.mark.parametrize(("order", "device"), [("disk", "c"), ("network", "n"), ("cdrom", "d")])
def test_boot_order(order: str, device: str) -> None:
    hv: dict[str, Any] = {"boot_order": order}
    if order == "cdrom":
        hv["cdrom_image_path"] = "/iso/x.iso"
    assert ("-boot", f"order={device}") in pairs(argv_for(**hv))


@pytest.mark.parametrize(
    ("disk_type", "expected"),
    [
        ("paravirtual", "file=/d/0,format=raw,if=virtio"),
        ("ide", "file=/d/0,format=raw,if=ide"),
        ("pflash", "file=/d/0,format=raw,if=pflash"),
    ],
)
def test_disk_interfaces(disk_type: str, expected: str) -> None:
    spec = InstanceSpec(
        "vm1", disks=(Disk("/d/0"),), hvparams=HvParams(disk_type=DiskType(disk_type))
    )
    assert ("-drive", expected) in pairs(argv_for(spec))


def test_scsi_disks_use_a_virtio_scsi_controller_and_cache() -> None:
    spec = InstanceSpec(
        "vm1",
        disks=(Disk("/d/0"), Disk("/d/1")),
        hvparams=HvParams(disk_type=DiskType.SCSI, disk_cache=DiskCache.NONE),
    )
    p = pairs(argv_for(spec))
    assert ("-device", "virtio-scsi-pci,id=scsi0") in p
    assert ("-drive", "file=/d/1,format=raw,if=none,id=disk1,cache=none") in p
    assert ("-device", "scsi-hd,drive=disk1,bus=scsi0.0") in p


@pytest.mark.parametrize("cache", ["none", "writethrough", "writeback"])
def test_disk_cache(cache: str) -> None:
    spec = InstanceSpec(
        "vm1", disks=(Disk("/d/0"),), hvparams=HvParams(disk_cache=DiskCache(cache))
    )
    assert ("-drive", f"file=/d/0,format=raw,if=virtio,cache={cache}") in pairs(argv_for(spec))


def test_cdrom_kernel_initrd_append() -> None:
    p = pairs(
        argv_for(
            cdrom_image_path="/iso/a.iso",
            kernel_path="/k",
            initrd_path="/i",
            root_path="/dev/vda1",
            kernel_args="ro quiet",
        )
    )
    assert ("-drive", "file=/iso/a.iso,format=raw,media=cdrom,if=ide,readonly=on") in p
    assert ("-kernel", "/k") in p
    assert ("-initrd", "/i") in p
    assert ("-append", "root=/dev/vda1 ro quiet console=ttyS0,38400") in p
    p = pairs(argv_for(kernel_path="/k", root_path="/dev/sda", serial_console=False))
    assert ("-append", "root=/dev/sda") in p
    assert ("-serial", "none") in p


def test_kernel_args_stay_one_argument() -> None:
    argv = argv_for(kernel_path="/k", root_path="/dev/vda; reboot", kernel_args="$(id) `x`")
    assert "root=/dev/vda; reboot $(id) `x` console=ttyS0,38400" in argv


@pytest.mark.parametrize("mouse", ["mouse", "tablet"])
def test_usb_mouse(mouse: str) -> None:
    argv = argv_for(usb_mouse=mouse)
    assert "-usb" in argv
    assert ("-device", f"usb-{mouse}") in pairs(argv)


@pytest.mark.parametrize(
    ("address", "port", "display"),
    [
        ("0.0.0.0", 5900, "0.0.0.0:0"),
        ("127.0.0.1", 5911, "127.0.0.1:11"),
        ("::", 5901, "[::]:1"),
        ("::1", 5902, "[::1]:2"),
    ],
)
def test_vnc_on_ip(address: str, port: int, display: str) -> None:
    spec = InstanceSpec("vm1", network_port=port, hvparams=HvParams(vnc_bind_address=address))
    assert ("-vnc", display) in pairs(argv_for(spec))


def test_vnc_port_below_5900_is_refused() -> None:
    spec = InstanceSpec("vm1", network_port=5899, hvparams=HvParams(vnc_bind_address="::1"))
    with pytest.raises(ValidationError, match="at least 5900"):
        argv_for(spec)


def test_vnc_unix_socket_tls_x509_password() -> None:
    p = pairs(argv_for(vnc_bind_address="/var/vnc"))
    assert ("-vnc", "unix:/var/vnc/vm1.vnc") in p
    spec = InstanceSpec(
        "vm1",
        network_port=5905,
        hvparams=HvParams(
            vnc_bind_address="127.0.0.1",
            vnc_tls=True,
            vnc_x509_path="/etc/x509",
            vnc_x509_verify=True,
            vnc_password_file="/etc/pw",
        ),
    )
    p = pairs(argv_for(spec))
    assert (
        "-object",
        "tls-creds-x509,id=vnctls0,endpoint=server,dir=/etc/x509,verify-peer=on",
    ) in p
    assert ("-vnc", "127.0.0.1:5,tls-creds=vnctls0,password=on") in p
    p = pairs(
        argv_for(
            InstanceSpec(
                "vm1",
                network_port=5905,
                hvparams=HvParams(vnc_bind_address="127.0.0.1", vnc_tls=True),
            )
        )
    )
    assert ("-object", "tls-creds-anon,id=vnctls0,endpoint=server") in p


def test_localtime_and_chroot_out_of_the_saved_argv() -> None:
    argv = argv_for(use_localtime=True, use_chroot=True)
    assert ("-rtc", "base=localtime") in pairs(argv)
    assert "-chroot" not in argv  # per start: its spelling depends on the node's QEMU


@pytest.mark.parametrize(
    ("nic_type", "model"),
    [
        ("paravirtual", "virtio-net-pci"),
        ("e1000", "e1000"),
        ("rtl8139", "rtl8139"),
        ("ne2k_pci", "ne2k_pci"),
        ("ne2k_isa", "ne2k_isa"),
        ("i82551", "i82551"),
        ("i82557b", "i82557b"),
        ("i82559er", "i82559er"),
        ("pcnet", "pcnet"),
    ],
)
def test_nics_as_netdev_tap(nic_type: str, model: str) -> None:
    spec = InstanceSpec(
        "vm1",
        nics=(Nic("52:54:00:00:00:01"), Nic("52:54:00:00:00:02")),
        hvparams=HvParams(nic_type=NicType(nic_type)),
    )
    p = pairs(argv_for(spec))
    assert ("-netdev", "tap,id=nic1,script=/run/kvf/nic/vm1-1.up,downscript=no") in p
    assert ("-device", f"{model},netdev=nic1,mac=52:54:00:00:00:02") in p


def test_vhost_net() -> None:
    spec = InstanceSpec("vm1", nics=(Nic("52:54:00:00:00:01"),), hvparams=HvParams(vhost_net=True))
    assert ("-netdev", "tap,id=nic0,script=/run/kvf/nic/vm1-0.up,downscript=no,vhost=on") in pairs(
        argv_for(spec)
    )


LOG = ["-D", "/run/kvf/log/vm1.log"]


def test_execution_args_on_qemu_7() -> None:
    assert execution_args(InstanceSpec("vm1"), PATHS, QEMU_7) == LOG
    user = InstanceSpec(
        "vm1", hvparams=HvParams(security_model=SecurityModel.USER, security_domain="nobody")
    )
    assert execution_args(user, PATHS, QEMU_7) == ["-runas", "nobody", *LOG]
    pool = InstanceSpec(
        "vm1", hvparams=HvParams(security_model=SecurityModel.POOL, use_chroot=True)
    )
    assert execution_args(pool, PATHS, QEMU_7, uid=5003, incoming="defer") == [
        "-runas",
        "5003:5003",
        "-chroot",
        "/run/kvf/chroot/vm1",
        *LOG,
        "-incoming",
        "defer",
    ]
    with pytest.raises(ValidationError, match="uid pool"):
        execution_args(pool, PATHS, QEMU_7)


def test_execution_args_on_qemu_10_use_run_with() -> None:
    pool = InstanceSpec(
        "vm1", hvparams=HvParams(security_model=SecurityModel.POOL, use_chroot=True)
    )
    assert execution_args(pool, PATHS, QEMU_10, uid=5003) == [
        "-run-with",
        "user=5003:5003,chroot=/run/kvf/chroot/vm1",
        *LOG,
    ]
    chroot_only = InstanceSpec("vm1", hvparams=HvParams(use_chroot=True))
    assert execution_args(chroot_only, PATHS, QEMU_10)[:2] == [
        "-run-with",
        "chroot=/run/kvf/chroot/vm1",
    ]
    assert execution_args(InstanceSpec("vm1"), PATHS, QEMU_10) == LOG


def test_runtime_root_rules(tmp_path: Path) -> None:
    for bad in ("relative", "/a,b", "/" + "x" * 70):
        with pytest.raises(ValidationError, match="runtime_root"):
            RuntimePaths(bad)
