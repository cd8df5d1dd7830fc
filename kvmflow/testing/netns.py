"""Test hosts that behave like hosts: network namespaces on one bridge, shaped links, sshd.

:func:`netns_lab` makes N "hosts", each a network namespace with one interface on a
bridge (in a namespace of its own, the switch), its own address and its own ``sshd``, so
that kvmflow reaches every host over SSH at that address exactly as in production, and
whatever it starts there (QEMU, its migration listener) runs inside that namespace. Each
host's link is shaped with ``tc netem`` (rate, delay, loss) on its way out, so that a
migration crosses a link with a bandwidth and a round-trip time, not loopback.

Addresses come from 198.18.0.0/15, the range RFC 2544 sets aside for benchmarking, one /24
per lab; no namespace has a route beyond it, and this machine reaches the lab only through
one interface of its own (``.254``). Everything a lab creates (namespaces, links,
processes in them, capture files) is removed when the ``with`` block ends, also when it
fails; :func:`leftovers` lists what a lab that was killed left behind. Needs root, iproute2
and, for :meth:`NetnsLab.capture`, tcpdump.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from kvmflow.kvm.argv import QEMU_BINARY
from kvmflow.kvm.hypervisor import KvmHypervisor
from kvmflow.kvm.runtime import RuntimePaths
from kvmflow.kvm.scratch import default_accelerator
from kvmflow.node.ssh import SSHNode, SSHTarget
from kvmflow.testing.sshd import SSHFleet, ssh_fleet

PREFIX = "kvflab"
BENCHMARK_RANGE = ipaddress.IPv4Network("198.18.0.0/15")
_labs = itertools.count()


@dataclass(frozen=True)
class LinkShape:
    """What a host's link does to what it sends: a rate (Mbit/s; ``None``: as fast as the
    machine goes), a one-way delay and a loss rate. A rate alone is a token bucket
    (``tbf``); delay and loss need ``netem``, which a kernel without that module lacks
    (:meth:`qdisc` then says so)."""

    rate_mbit: float | None = None
    delay_ms: float = 0.0
    loss_percent: float = 0.0

    def qdisc(self) -> list[str]:
        """``tc qdisc replace dev eth0 root ...`` arguments for this shape."""
        if self.delay_ms or self.loss_percent:
            args = ["netem", "limit", "200000"]
            if self.delay_ms:
                args += ["delay", f"{self.delay_ms}ms"]
            if self.rate_mbit is not None:
                args += ["rate", f"{self.rate_mbit}mbit"]
            if self.loss_percent:
                args += ["loss", f"{self.loss_percent}%"]
            return args
        if self.rate_mbit is None:
            return ["pfifo_fast"]
        # A bucket of 4 ms at the rate (at least 256 KiB: GSO sends 64 KiB at once).
        burst = max(256 * 1024, int(self.rate_mbit * 1e6 / 8 / 250))
        return ["tbf", "rate", f"{self.rate_mbit}mbit", "burst", str(burst), "latency", "20ms"]


ONE_GBIT = LinkShape(rate_mbit=1000)
TEN_GBIT = LinkShape(rate_mbit=10000)


@dataclass(frozen=True)
class LabHost:
    """One host: its namespace, address, sshd, and the switch port its link ends on."""

    name: str
    namespace: str
    address: str
    switch_port: str


@dataclass
class NetnsLab:
    """A running lab: its hosts, the SSH credentials that reach them, the switch."""

    lab: str
    switch: str
    subnet: ipaddress.IPv4Network
    hosts: list[LabHost] = field(default_factory=list)
    fleet: SSHFleet | None = None
    workdir: Path = Path()

    @property
    def controller_address(self) -> str:
        return str(self.subnet.network_address + 254)

    def ssh_target(self, host: LabHost) -> SSHTarget:
        assert self.fleet is not None
        return SSHTarget(
            host.address,
            22,
            client_keys=(str(self.fleet.client_key),),
            known_hosts=str(self.fleet.known_hosts),
        )

    def hypervisors(self, root: Path, *, qemu_binary: str | None = None) -> list[KvmHypervisor]:
        """One hypervisor per host, reached over SSH, rooted at ``root/<host name>``."""
        return [
            KvmHypervisor(
                SSHNode(host.name, self.ssh_target(host)),
                RuntimePaths(str(root / host.name)),
                default_accelerator=default_accelerator(),
                qemu_binary=qemu_binary or QEMU_BINARY,
            )
            for host in self.hosts
        ]

    def shape(self, shape: LinkShape, *hosts: LabHost) -> None:
        """Shape the links of ``hosts`` (all by default) from now on."""
        for host in hosts or tuple(self.hosts):
            _ip("-n", host.namespace, "link", "set", "eth0", "up")
            argv = ["tc", "-n", host.namespace, "qdisc", "replace", "dev", "eth0", "root"]
            try:
                _run(argv + shape.qdisc())
            except RuntimeError as exc:
                if "netem" in shape.qdisc() and "unknown" in str(exc):
                    raise RuntimeError(
                        "this kernel has no netem qdisc (sch_netem): a link can get a rate "
                        "here (tbf) but no delay or loss"
                    ) from exc
                raise

    @contextlib.contextmanager
    def capture(
        self, host: LabHost, port: int | None = None, *, ports: tuple[int, int] | None = None
    ) -> Iterator[Path]:
        """Record the TCP traffic of ``host``'s link to or from ``port`` (or any port of the
        range ``ports``; a capture filter, at the switch) while the block runs; yields the
        pcap file, complete after it."""
        if (port is None) == (ports is None):
            raise ValueError("capture wants a port or a range of ports")
        if port is not None:
            bpf, label = f"tcp port {port}", str(port)
        else:
            assert ports is not None
            bpf, label = f"tcp portrange {ports[0]}-{ports[1]}", f"{ports[0]}-{ports[1]}"
        pcap = self.workdir / f"{host.name}-{label}.pcap"
        process = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                self.switch,
                "tcpdump",
                "-i",
                host.switch_port,
                "-U",
                "-s",
                "0",
                "-w",
                str(pcap),
                bpf,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            _wait_for(
                lambda: pcap.exists() and pcap.stat().st_size > 0, "tcpdump to start", process
            )
            yield pcap
        finally:
            process.send_signal(signal.SIGINT)  # tcpdump flushes its file on SIGINT
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@contextlib.contextmanager
def netns_lab(count: int, shape: LinkShape | None = None) -> Iterator[NetnsLab]:
    """``count`` hosts on one bridge, each link shaped by ``shape``; removed afterwards."""
    lab = f"{_lab_id_prefix()}{next(_labs) % 10}"
    subnet = _free_subnet()
    switch = f"{PREFIX}-{lab}-sw"
    uplink = f"kv{lab}c"
    state = NetnsLab(lab, switch, subnet, workdir=Path(tempfile.mkdtemp(prefix="kvf-lab-")))
    made: list[str] = []
    try:
        _ip("netns", "add", switch)
        made.append(switch)
        _ip("-n", switch, "link", "set", "lo", "up")
        _ip("-n", switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", switch, "link", "set", "br0", "up")
        _ip("link", "add", uplink, "type", "veth", "peer", "name", f"kv{lab}u")
        _ip("link", "set", f"kv{lab}u", "netns", switch, "name", "uplink")
        _ip("-n", switch, "link", "set", "dev", "uplink", "master", "br0", "up")
        _ip("addr", "add", f"{state.controller_address}/24", "dev", uplink)
        _ip("link", "set", uplink, "up")
        for index in range(count):
            host = LabHost(
                f"host{index}",
                f"{PREFIX}-{lab}-h{index}",
                str(subnet.network_address + index + 1),
                f"p{index}",
            )
            _ip("netns", "add", host.namespace)
            made.append(host.namespace)
            _ip("-n", host.namespace, "link", "set", "lo", "up")
            temporary = f"kv{lab}h{index}"
            _ip("link", "add", temporary, "type", "veth", "peer", "name", f"kv{lab}p{index}")
            _ip("link", "set", temporary, "netns", host.namespace, "name", "eth0")
            _ip("link", "set", f"kv{lab}p{index}", "netns", switch, "name", host.switch_port)
            _ip("-n", switch, "link", "set", "dev", host.switch_port, "master", "br0", "up")
            _ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", "eth0")
            _ip("-n", host.namespace, "link", "set", "eth0", "up")
            state.hosts.append(host)
        if shape is not None:
            state.shape(shape)
        with ssh_fleet(
            [h.address for h in state.hosts], namespaces=[h.namespace for h in state.hosts]
        ) as fleet:
            state.fleet = fleet
            try:
                yield state
            finally:
                for namespace in made:
                    _kill_everything_in(namespace)
    finally:
        for namespace in made:
            _kill_everything_in(namespace)
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, check=False)
        subprocess.run(["ip", "link", "del", uplink], capture_output=True, check=False)
        shutil.rmtree(state.workdir, ignore_errors=True)


def leftovers(*, of_any_process: bool = False) -> list[str]:
    """Namespaces of this process's labs that still exist (with ``of_any_process``, of
    every process's: a killed run leaves those)."""
    mine = f"{PREFIX}-{_lab_id_prefix()}"
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    names = [line.split()[0] for line in listed.stdout.splitlines() if line.startswith(PREFIX)]
    return names if of_any_process else [name for name in names if name.startswith(mine)]


def _lab_id_prefix() -> str:
    return f"{os.getpid() % 100000:05d}"


def _kill_everything_in(namespace: str) -> None:
    """Kill every process in ``namespace`` (sshd sessions, QEMUs started over them)."""
    listed = subprocess.run(
        ["ip", "netns", "pids", namespace], capture_output=True, text=True, check=False
    )
    for pid in listed.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 of 198.18.0.0/15 that no interface of this machine has an address in."""
    used = subprocess.run(
        ["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, check=True
    ).stdout
    start = os.getpid() % 250
    for offset in range(250):
        subnet = ipaddress.IPv4Network(f"198.18.{(start + offset) % 250 + 1}.0/24")
        if f" {subnet.network_address + 254}/" not in used:
            assert subnet.subnet_of(BENCHMARK_RANGE)
            return subnet
    raise RuntimeError("every /24 of 198.18.1.0 to 198.18.250.0 is in use here")


def _ip(*args: str) -> None:
    _run(["ip", *args])


def _run(argv: list[str]) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {result.stderr.strip()}")


def _wait_for(condition: Callable[[], bool], what: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        if process.poll() is not None:
            said = process.stderr.read().decode() if process.stderr else ""
            raise RuntimeError(f"{what} failed: {said.strip()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)
