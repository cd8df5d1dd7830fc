"""A real etcd cluster on loopback addresses, for tests and benchmarks of the etcd store.

``with etcd_cluster(3) as cluster:`` starts Debian's ``etcd`` (package ``etcd-server``) as
three members on 127.0.0.21-23, each with its own data directory and free ports, waits for
the cluster to answer, and stops and removes everything on the way out, also when the body
fails. ``cluster.url("/prefix")`` is the store URL naming every member;
``cluster.stop(i)`` / ``cluster.start(i)`` kill and restart one member (its data kept), for
member loss and quorum loss.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ETCD = shutil.which("etcd") or "/usr/bin/etcd"

#: The loopback addresses members listen on (one each).
MEMBER_ADDRESSES = ("127.0.0.21", "127.0.0.22", "127.0.0.23", "127.0.0.24", "127.0.0.25")


class EtcdUnavailable(RuntimeError):
    """No etcd binary here, or a cluster that did not come up."""


@dataclass(frozen=True)
class EtcdTLS:
    """Server TLS for a test cluster: members serve clients over TLS with this certificate
    and require a client certificate of ``ca_file``'s CA."""

    ca_file: str
    cert_file: str
    key_file: str


@dataclass
class Member:
    """One etcd member: where it listens and its process while it runs."""

    name: str
    address: str
    client_port: int
    peer_port: int
    data_dir: Path
    log: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"{self.address}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.address}:{self.peer_port}"


@dataclass
class EtcdCluster:
    """A running cluster; see the module docstring."""

    members: list[Member]
    workdir: Path
    tls: EtcdTLS | None = None
    _initial: str = field(default="", repr=False)

    def url(self, prefix: str = "/kvmflow") -> str:
        """The store URL for every member, under ``prefix``."""
        return "etcd://" + ",".join(m.endpoint for m in self.members) + prefix

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def pids(self) -> list[int]:
        return [m.process.pid for m in self.members if m.process and m.process.poll() is None]

    def start(self, index: int, *, state: str = "new") -> None:
        """(Re)start member ``index`` with its data directory as it is."""
        member = self.members[index]
        if member.process is not None and member.process.poll() is None:
            return
        scheme = "https" if self.tls else "http"
        argv = [
            ETCD,
            "--name", member.name,
            "--data-dir", str(member.data_dir),
            "--listen-client-urls", f"{scheme}://{member.endpoint}",
            "--advertise-client-urls", f"{scheme}://{member.endpoint}",
            "--listen-peer-urls", member.peer_url,
            "--initial-advertise-peer-urls", member.peer_url,
            "--initial-cluster", self._initial,
            "--initial-cluster-state", state,
            "--initial-cluster-token", self.workdir.name,
            "--heartbeat-interval", "50",
            "--election-timeout", "500",
            "--logger", "zap",
            "--log-outputs", str(member.log),
        ]  # fmt: skip
        if self.tls is not None:
            argv += ["--cert-file", self.tls.cert_file, "--key-file", self.tls.key_file]
            argv += ["--client-cert-auth", "--trusted-ca-file", self.tls.ca_file]
        member.process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def stop(self, index: int) -> None:
        """Kill member ``index`` (SIGKILL: no goodbye to its peers)."""
        member = self.members[index]
        if member.process is not None and member.process.poll() is None:
            member.process.kill()
            member.process.wait(10)
        member.process = None

    def wait_healthy(self, timeout: float = 20.0, *, members: list[int] | None = None) -> None:
        """Until every running member (or ``members``) answers its health check."""
        chosen = [self.members[i] for i in members] if members else self.members
        deadline = time.monotonic() + timeout
        for member in chosen:
            while not (_listening(member) if self.tls else _healthy(member)):
                if member.process is not None and member.process.poll() is not None:
                    raise EtcdUnavailable(f"etcd {member.name} exited: {_tail(member.log)}")
                if time.monotonic() > deadline:
                    raise EtcdUnavailable(f"etcd {member.name} not healthy: {_tail(member.log)}")
                time.sleep(0.1)


def _healthy(member: Member) -> bool:
    try:
        with socket.create_connection((member.address, member.client_port), timeout=1) as sock:
            sock.sendall(f"GET /health HTTP/1.0\r\nHost: {member.endpoint}\r\n\r\n".encode())
            reply = sock.recv(4096)
    except OSError:
        return False
    return b'"health":"true"' in reply


def _listening(member: Member) -> bool:
    try:
        with socket.create_connection((member.address, member.client_port), timeout=1):
            return True
    except OSError:
        return False


def _tail(log: Path, lines: int = 5) -> str:
    try:
        return " | ".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _free_port(host: str, taken: set[int]) -> int:
    while True:
        with socket.socket() as probe:
            probe.bind((host, 0))
            port = int(probe.getsockname()[1])
        if port not in taken:
            taken.add(port)
            return port


@contextlib.contextmanager
def etcd_cluster(size: int = 3, *, tls: EtcdTLS | None = None) -> Iterator[EtcdCluster]:
    """Start a ``size``-member cluster (see the module docstring), serving clients over
    TLS with ``tls``; stop it on the way out."""
    if not shutil.which(ETCD) and not Path(ETCD).exists():
        raise EtcdUnavailable("no etcd binary: install Debian's etcd-server package")
    if not 1 <= size <= len(MEMBER_ADDRESSES):
        raise ValueError(f"a test cluster has 1 to {len(MEMBER_ADDRESSES)} members, not {size}")
    workdir = Path(tempfile.mkdtemp(prefix="kvmflow-etcd-"))
    taken: set[int] = set()
    members = [
        Member(
            f"m{i}",
            address,
            _free_port(address, taken),
            _free_port(address, taken),
            workdir / f"m{i}",
            workdir / f"m{i}.log",
        )
        for i, address in enumerate(MEMBER_ADDRESSES[:size])
    ]
    cluster = EtcdCluster(members, workdir, tls)
    cluster._initial = ",".join(f"{m.name}={m.peer_url}" for m in members)
    try:
        for index in range(size):
            cluster.start(index)
        cluster.wait_healthy()
        yield cluster
    finally:
        for index in range(size):
            with contextlib.suppress(Exception):
                cluster.stop(index)
        shutil.rmtree(workdir, ignore_errors=True)
