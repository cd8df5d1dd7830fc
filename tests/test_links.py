"""Migrations between hosts that behave like hosts: network namespaces on a bridge, each with
its own address in 198.18.0.0/15 and its own sshd, links shaped with tc; captures at the
switch show what crosses the link."""

from __future__ import annotations

import ipaddress
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmflow.guest import MARKER, dirty_guest_spec, wait_for_sweeps
from kvmflow.guest import sweep_count as sweeps
from kvmflow.instance import Instance, InstanceState
from kvmflow.kvm import Disk, KvmHypervisor
from kvmflow.migration import MigrationPolicy, migrate
from kvmflow.migration.disks import NBD_PORTS
from kvmflow.testing.netns import ONE_GBIT, LinkShape, NetnsLab, leftovers, netns_lab
from tests.tls import give_credentials

pytestmark = pytest.mark.anyio
PORT = 8102  # each host has a port space of its own: no collisions
# QEMU caps a stream at 128 MiB/s unless told otherwise: 4 GiB/s leaves the link as the limit.
UNLIMITED = MigrationPolicy.fixed(bandwidth_mib=4096, downtime_ms=300, poll_interval=0.1)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def lab() -> Iterator[NetnsLab]:
    with netns_lab(2, ONE_GBIT) as made:
        yield made
    assert leftovers() == []  # the lab removed everything it made


@pytest.fixture
def hosts(lab: NetnsLab, runtime_root: Path) -> tuple[KvmHypervisor, KvmHypervisor]:
    source, target = lab.hypervisors(runtime_root)
    return source, target


async def test_lab_hosts_are_reached_over_ssh_and_have_no_route_out(
    lab: NetnsLab, hosts: tuple[KvmHypervisor, KvmHypervisor]
) -> None:
    for host, hv in zip(lab.hosts, hosts, strict=True):
        routes = await hv.node.run(["ip", "-4", "route"])
        assert routes.stdout.decode().strip() == (
            f"{lab.subnet} dev eth0 proto kernel scope link src {host.address}"
        )
        addresses = (await hv.node.run(["ip", "-o", "-4", "addr"])).stdout.decode()
        assert host.address in addresses
        assert "198.18" not in addresses.replace(host.address, "")
        qdisc = (await hv.node.run(["tc", "qdisc", "show", "dev", "eth0"])).stdout.decode()
        assert "rate 1Gbit" in qdisc
    assert lab.subnet.subnet_of(ipaddress.IPv4Network("198.18.0.0/15"))


def test_delay_and_loss_need_netem_and_say_so_where_it_is_missing(lab: NetnsLab) -> None:
    probe = subprocess.run(
        ["tc", "-n", lab.hosts[0].namespace, "qdisc", "replace", "dev", "eth0", "root", "netem"],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode == 0:
        lab.shape(LinkShape(rate_mbit=1000, delay_ms=0.25), lab.hosts[0])
        return  # this kernel has netem: the delay was applied
    with pytest.raises(RuntimeError, match="no netem qdisc"):
        lab.shape(LinkShape(rate_mbit=1000, delay_ms=0.25), lab.hosts[0])


async def test_a_migration_over_the_shaped_link_is_held_to_its_rate(
    lab: NetnsLab, hosts: tuple[KvmHypervisor, KvmHypervisor], dirty_guest: Path
) -> None:
    source, target = hosts
    spec = dirty_guest_spec("link-1g", dirty_guest, migration_port=PORT, mib=32, pause=50)
    instance = Instance(spec, source)
    await instance.start()
    await wait_for_sweeps(source, "link-1g")
    address = lab.hosts[1].address
    result = await migrate(instance, target, target_address=address, policy=UNLIMITED)
    assert result.target_uri == f"tcp:{address}:{PORT}"
    assert instance.machine.state is InstanceState.RUNNING
    assert not await source.is_running("link-1g")
    first = await sweeps(target, "link-1g")
    await wait_for_sweeps(target, "link-1g", minimum=first + 1)
    # Not held by QEMU (4 GiB/s), the stream is held by the link: 1 Gbit/s, and framing.
    assert 0 < result.final.throughput_mbps < 1000 * 1.1, result.final.throughput_mbps
    await instance.stop(force=True)


async def there_plain_back_encrypted(
    lab: NetnsLab,
    instance: Instance,
    hosts: tuple[KvmHypervisor, KvmHypervisor],
    *,
    port: int | None = None,
    ports: tuple[int, int] | None = None,
) -> tuple[bytes, bytes]:
    """Migrate host0 -> host1 in the clear, then back with TLS, capturing host0's link
    each time (on ``port`` or the range ``ports``); returns both captures."""
    source, target = hosts
    captures = []
    for to, address, policy in (
        (target, lab.hosts[1].address, UNLIMITED),
        (source, lab.hosts[0].address, UNLIMITED.with_changes(tls=True)),
    ):
        with lab.capture(lab.hosts[0], port, ports=ports) as pcap:
            await migrate(instance, to, target_address=address, policy=policy)
        captures.append(pcap.read_bytes())
    return captures[0], captures[1]


async def test_the_stream_shows_guest_memory_in_the_clear_and_never_through_tls(
    lab: NetnsLab,
    hosts: tuple[KvmHypervisor, KvmHypervisor],
    dirty_guest: Path,
    tmp_path: Path,
) -> None:
    source = hosts[0]
    give_credentials(hosts, tmp_path / "tls")
    spec = dirty_guest_spec("marked", dirty_guest, migration_port=PORT, mib=8, marked=True)
    instance = Instance(spec, source)
    await instance.start()
    await wait_for_sweeps(source, "marked")
    plain, captured = await there_plain_back_encrypted(lab, instance, hosts, port=PORT)
    assert MARKER in plain  # the capture sees guest memory in the clear
    assert len(captured) > 8 << 20  # the whole stream was captured ...
    assert MARKER not in captured  # ... and none of it is readable
    assert MARKER[:12] not in captured
    assert instance.machine.node == source.node.name
    await instance.stop(force=True)


async def test_a_local_disk_crosses_the_link_in_the_clear_only_without_tls(
    lab: NetnsLab,
    hosts: tuple[KvmHypervisor, KvmHypervisor],
    dirty_guest: Path,
    tmp_path: Path,
) -> None:
    """The disk copy (NBD, on a port of its range) shows the disk's bytes on the link
    without TLS, and none of them with it."""
    source = hosts[0]
    give_credentials(hosts, tmp_path / "tls")
    for host in lab.hosts:
        (tmp_path / host.name).mkdir()
    (tmp_path / "host0" / "disk.img").write_bytes(MARKER * ((4 << 20) // len(MARKER) + 1))
    disk = Disk(str(tmp_path / "{node}" / "disk.img"), local=True)
    spec = dirty_guest_spec("disk-cap", dirty_guest, migration_port=PORT, mib=4, disks=(disk,))
    instance = Instance(spec, source)
    await instance.start()
    await wait_for_sweeps(source, "disk-cap")
    plain, captured = await there_plain_back_encrypted(lab, instance, hosts, ports=NBD_PORTS)
    assert MARKER in plain
    assert len(captured) > 4 << 20  # the disk went over the link ...
    assert MARKER[:12] not in captured  # ... unreadable
    assert instance.machine.node == source.node.name
    await instance.stop(force=True)
