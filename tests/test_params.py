"""Every hypervisor parameter and cross-field rule, good and bad values."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from kvmflow.errors import FieldProblem, ValidationError
from kvmflow.kvm import (
    Disk,
    DiskMode,
    HvParams,
    InstanceSpec,
    Nic,
    NicMode,
    check_instance_name,
    validate_spec,
)
from kvmflow.kvm.hvparams import (
    BootOrder,
    DiskCache,
    DiskType,
    KvmFlag,
    NicType,
    SecurityModel,
    UsbMouse,
)
from kvmflow.kvm.validation import is_ipv4, is_ipv6, validate_spec_on
from kvmflow.node import LocalNode


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    paths = {}
    for name in ("kernel", "initrd", "password", "cdrom.iso", "disk.img"):
        (tmp_path / name).write_bytes(b"x")
        paths[name] = str(tmp_path / name)
    (tmp_path / "x509").mkdir()
    paths["x509"] = str(tmp_path / "x509")
    paths["dir"] = str(tmp_path)
    return paths


def problems_of(spec: InstanceSpec) -> dict[str, FieldProblem]:
    with pytest.raises(ValidationError) as info:
        validate_spec(spec)
    return {p.field: p for p in info.value.problems}


def spec_with(**hv: Any) -> InstanceSpec:
    return InstanceSpec("vm1", hvparams=HvParams(**hv))


@pytest.mark.parametrize("name", ["a", "web-1", "db_2.example", "X" * 63, "9lives"])
def test_good_names(name: str) -> None:
    assert check_instance_name(name) == name
    assert InstanceSpec(name).name == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "../etc",
        "a/b",
        "a b",
        "a;rm -rf /",
        "$(reboot)",
        "`id`",
        "-rf",
        ".hidden",
        "x" * 64,
        "naïve",
        "a\nb",
        None,
        5,
    ],
)
def test_bad_names_refused_on_construction(name: Any) -> None:
    with pytest.raises(ValidationError) as info:
        InstanceSpec(name)
    [problem] = info.value.problems
    assert problem.field == "name"
    assert "no slashes, spaces or shell characters" in problem.allowed


def test_defaults_are_valid() -> None:
    validate_spec(InstanceSpec("vm1"))


def test_good_values_everywhere(files: dict[str, str]) -> None:
    spec = InstanceSpec(
        "vm1",
        memory_mib=512,
        vcpus=2,
        network_port=5901,
        disks=(Disk(files["disk.img"]),),
        nics=(
            Nic("52:54:00:12:34:56", "192.0.2.10", NicMode.ROUTED, "100"),
            Nic("52:54:00:12:34:57", None, NicMode.BRIDGED, "br0"),
        ),
        tags=("web", "prod"),
        hvparams=HvParams(
            kernel_path=files["kernel"],
            initrd_path=files["initrd"],
            root_path="/dev/vda1",
            kernel_args="ro quiet",
            vnc_bind_address="0.0.0.0",
            vnc_tls=True,
            vnc_x509_path=files["x509"],
            vnc_x509_verify=True,
            vnc_password_file=files["password"],
            cdrom_image_path=files["cdrom.iso"],
            boot_order=BootOrder.CDROM,
            nic_type=NicType.E1000,
            disk_type=DiskType.SCSI,
            usb_mouse=UsbMouse.TABLET,
            migration_port=8102,
            migration_bandwidth=100,
            migration_downtime=50,
            use_localtime=True,
            disk_cache=DiskCache.WRITEBACK,
            security_model=SecurityModel.USER,
            security_domain="nobody",
            kvm_flag=KvmFlag.ENABLED,
            vhost_net=True,
            use_chroot=True,
        ),
    )
    validate_spec(spec)


@pytest.mark.parametrize(
    "field", ["kernel_path", "initrd_path", "vnc_password_file", "cdrom_image_path"]
)
def test_file_parameters(field: str, files: dict[str, str]) -> None:
    extra = {"root_path": "/dev/vda"} if field == "kernel_path" else {}
    validate_spec(spec_with(**{field: files["kernel"]}, **extra))
    assert "absolute" in problems_of(spec_with(**{field: "kernel"}, **extra))[field].allowed
    missing = problems_of(spec_with(**{field: files["dir"] + "/missing"}, **extra))
    assert "existing" in missing[field].allowed
    assert field in problems_of(spec_with(**{field: files["dir"]}, **extra))  # a directory


def test_kernel_needs_root_path(files: dict[str, str]) -> None:
    found = problems_of(spec_with(kernel_path=files["kernel"]))
    assert found["root_path"].allowed == "must be set when kernel_path is set"


@pytest.mark.parametrize("address", ["0.0.0.0", "127.0.0.1", "::", "::1", "2001:db8::5"])
def test_vnc_bind_addresses(address: str) -> None:
    validate_spec(
        InstanceSpec("vm1", network_port=5905, hvparams=HvParams(vnc_bind_address=address))
    )


def test_vnc_bind_directory_and_bad_values(files: dict[str, str]) -> None:
    validate_spec(spec_with(vnc_bind_address=files["dir"]))
    for bad in ("300.1.1.1", "localhost", "relative/dir", "1.2.3"):
        assert "vnc_bind_address" in problems_of(spec_with(vnc_bind_address=bad))
    assert (
        "existing directory"
        in problems_of(spec_with(vnc_bind_address=files["dir"] + "/nope"))[
            "vnc_bind_address"
        ].allowed
    )


def test_ip_checks_are_family_specific() -> None:
    assert is_ipv4("192.0.2.1")
    assert not is_ipv4("::1")
    assert is_ipv6("::1")
    assert not is_ipv6("192.0.2.1")
    assert not is_ipv4("192.0.2.1/24")
    assert not is_ipv6("fe80::1%eth0x/")


def test_vnc_port_rules() -> None:
    for port in (None, 5899, 80, 70000):
        spec = InstanceSpec(
            "vm1", network_port=port, hvparams=HvParams(vnc_bind_address="127.0.0.1")
        )
        assert "network_port" in problems_of(spec)


def test_x509(files: dict[str, str]) -> None:
    assert problems_of(spec_with(vnc_x509_verify=True))["vnc_x509_verify"].allowed == (
        "needs vnc_x509_path"
    )
    assert "vnc_x509_path" in problems_of(spec_with(vnc_x509_path=files["kernel"]))
    validate_spec(spec_with(vnc_x509_path=files["x509"], vnc_x509_verify=True))


def test_cdrom_boot_needs_iso(files: dict[str, str]) -> None:
    assert problems_of(spec_with(boot_order=BootOrder.CDROM))["boot_order"].allowed == (
        "needs cdrom_image_path"
    )
    validate_spec(spec_with(boot_order=BootOrder.CDROM, cdrom_image_path=files["cdrom.iso"]))


@pytest.mark.parametrize(
    ("field", "good", "bad"),
    [
        ("boot_order", ["disk", "network"], ["floppy", "", None]),
        (
            "nic_type",
            [
                "rtl8139",
                "ne2k_pci",
                "ne2k_isa",
                "i82551",
                "i82557b",
                "i82559er",
                "pcnet",
                "e1000",
                "paravirtual",
            ],
            ["virtio", "e1000e "],
        ),
        ("disk_type", ["ide", "scsi", "pflash", "paravirtual"], ["sata", "virtio"]),
        ("usb_mouse", ["mouse", "tablet", None], ["keyboard"]),
        ("disk_cache", ["default", "none", "writethrough", "writeback"], ["unsafe"]),
        ("security_model", ["none", "pool"], ["root"]),
        ("kvm_flag", ["enabled", "disabled", None], ["yes", True]),
        ("acpi", [True, False], ["yes", 1, None]),
        ("migration_port", [0, 1, 8102, 65535], ["8102", 1.5, True]),
    ],
)
def test_choices_from_config(field: str, good: list[Any], bad: list[Any]) -> None:
    for value in good:
        validate_spec(InstanceSpec("vm1", hvparams=HvParams.from_dict({field: value})))
    for value in bad:
        with pytest.raises(ValidationError) as info:
            HvParams.from_dict({field: value})
        [problem] = info.value.problems
        assert problem.field == field
        assert problem.value == value


def test_from_dict_reports_every_bad_field_at_once() -> None:
    with pytest.raises(ValidationError) as info:
        HvParams.from_dict(
            {"acpi": "maybe", "nic_type": "virtio", "bogus": 1, "migration_port": "x"}
        )
    fields = {p.field for p in info.value.problems}
    assert fields == {"acpi", "nic_type", "bogus", "migration_port"}
    assert "must be one of rtl8139" in str(info.value)


@pytest.mark.parametrize("disk_type", ["sd", "mtd"])
def test_disk_types_x86_cannot_run_are_refused(disk_type: str) -> None:
    assert "no such controller" in problems_of(spec_with(disk_type=disk_type))["disk_type"].allowed


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("migration_port", -1),
        ("migration_port", 65536),
        ("migration_bandwidth", 0),
        ("migration_bandwidth", -5),
        ("migration_downtime", 0),
    ],
)
def test_migration_numbers(field: str, value: int) -> None:
    assert field in problems_of(spec_with(**{field: value}))


def test_migration_port_zero_means_any_free_port() -> None:
    validate_spec(spec_with(migration_port=0))
    allowed = problems_of(spec_with(migration_port=70000))["migration_port"].allowed
    assert "0 to let the target pick" in allowed


def test_security_models() -> None:
    validate_spec(spec_with(security_model=SecurityModel.USER, security_domain="nobody"))
    assert "security_domain" in problems_of(spec_with(security_model=SecurityModel.USER))
    assert (
        problems_of(spec_with(security_model=SecurityModel.USER, security_domain="no-such-user-x"))[
            "security_domain"
        ].allowed
        == "must name an existing user"
    )
    for model in ("none", "pool"):
        found = problems_of(spec_with(security_model=model, security_domain="nobody"))
        assert found["security_domain"].allowed == f"must be unset with security_model={model}"


def test_disks_nics_tags_and_sizes(files: dict[str, str]) -> None:
    spec = InstanceSpec(
        "vm1",
        memory_mib=4,
        vcpus=0,
        disks=(
            Disk(files["disk.img"], DiskMode.READ_ONLY),
            Disk("relative.img"),
            Disk(files["dir"] + "/missing.img"),
            Disk(files["dir"] + "/a,b.img"),
        ),
        nics=(
            Nic("52:54:00:12:34:5"),
            Nic("52:54:00:12:34:56", "not-an-ip"),
            Nic("52:54:00:12:34:57", mode=NicMode.ROUTED),
        ),
        tags=("ok", "", "two\nlines"),
    )
    found = problems_of(spec)
    assert set(found) == {
        "memory_mib",
        "vcpus",
        "disks[0].mode",
        "disks[1].path",
        "disks[2].path",
        "disks[3].path",
        "nics[0].mac",
        "nics[1].ip",
        "nics[2].ip",
        "tags[1]",
        "tags[2]",
    }
    assert "read-only disks are not supported" in found["disks[0].mode"].allowed
    assert found["nics[2].ip"].allowed == "a routed NIC needs an IP"


def test_validation_writes_nothing(files: dict[str, str]) -> None:
    before = sorted(os.listdir(files["dir"]))
    problems_of(spec_with(kernel_path="/nonexistent", boot_order=BootOrder.CDROM, acpi=True))
    assert sorted(os.listdir(files["dir"])) == before


def test_spec_round_trips_through_dict(files: dict[str, str]) -> None:
    spec = InstanceSpec(
        "vm1",
        memory_mib=256,
        disks=(Disk(files["disk.img"]),),
        nics=(Nic("52:54:00:00:00:01", "192.0.2.1", NicMode.ROUTED),),
        tags=("a",),
        hvparams=HvParams(usb_mouse=UsbMouse.TABLET, kvm_flag=KvmFlag.DISABLED),
    )
    assert InstanceSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValidationError, match="malformed"):
        InstanceSpec.from_dict({"memory_mib": 5})


class NodeWithItsOwnKernel(LocalNode):
    """A node that has files this machine has not (as a remote node would)."""

    async def path_kind(self, path: str) -> str | None:
        if path == "/srv/node-only/vmlinuz":
            return "file"
        return await super().path_kind(path)

    async def user_exists(self, name: str) -> bool:
        return name == "qemu-node-user" or await super().user_exists(name)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_environment_is_checked_on_the_node_the_instance_goes_to(
    anyio_backend: str,
) -> None:
    spec = spec_with(
        kernel_path="/srv/node-only/vmlinuz",
        root_path="/dev/vda1",
        security_model=SecurityModel.USER,
        security_domain="qemu-node-user",
    )
    with pytest.raises(ValidationError) as here:
        validate_spec(spec)  # this machine has neither the kernel nor the user
    assert {p.field for p in here.value.problems} == {"kernel_path", "security_domain"}
    await validate_spec_on(spec, NodeWithItsOwnKernel("remote"))  # the node has both
    with pytest.raises(ValidationError) as there:
        await validate_spec_on(spec.with_hvparams(initrd_path="/srv/none"), LocalNode("x"))
    assert {p.field for p in there.value.problems} == {
        "kernel_path",
        "initrd_path",
        "security_domain",
    }
