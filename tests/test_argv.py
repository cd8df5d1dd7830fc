"""The QEMU command line for each parameter (modern spellings only)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest

from kvmflow.errors import ValidationError
from kvmflow.kvm import Disk, HvParams, InstanceSpec, Nic, RuntimePaths, build_argv
from kvmflow.kvm.argv import execution_args
from kvmflow.kvm.hvparams import DiskCache, DiskType, KvmFlag, NicType, SecurityModel, UsbMouse

PATHS = RuntimePaths("/run/kvf")


def argv_for(spec: InstanceSpec | None = None, **hv: Any) -> list[str]:
    spec = spec or InstanceSpec("vm1", hvparams=HvParams(**hv))
    return build_argv(spec, PATHS, default_accelerator="kvm")


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
    assert ("-machine", "acpi=off") in pairs(argv_for(acpi=False))
    assert "-machine" not in argv_for()
    assert ("-accel", "kvm") in pairs(argv_for(kvm_flag=KvmFlag.ENABLED))
    assert ("-accel", "tcg") in pairs(argv_for(kvm_flag=KvmFlag.DISABLED))
    spec = InstanceSpec("vm1")
    assert ("-accel", "tcg") in pairs(build_argv(spec, PATHS, default_accelerator="tcg"))


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


def test_localtime_chroot() -> None:
    p = pairs(argv_for(use_localtime=True, use_chroot=True))
    assert ("-rtc", "base=localtime") in p
    assert ("-chroot", "/run/kvf/chroot/vm1") in p


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


def test_execution_args() -> None:
    assert execution_args(InstanceSpec("vm1")) == []
    user = InstanceSpec(
        "vm1", hvparams=HvParams(security_model=SecurityModel.USER, security_domain="nobody")
    )
    assert execution_args(user) == ["-runas", "nobody"]
    pool = InstanceSpec("vm1", hvparams=HvParams(security_model=SecurityModel.POOL))
    assert execution_args(pool, uid=5003, incoming="defer") == [
        "-runas",
        "5003:5003",
        "-incoming",
        "defer",
    ]
    with pytest.raises(ValidationError, match="uid pool"):
        execution_args(pool)


def test_runtime_root_rules(tmp_path: Path) -> None:
    for bad in ("relative", "/a,b", "/" + "x" * 70):
        with pytest.raises(ValidationError, match="runtime_root"):
            RuntimePaths(bad)
