"""Real OpenSSH sshd servers on loopback addresses, one per pretend host, for tests and
benchmarks of SSH nodes (needs root for /run/sshd and an sshd binary)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


@dataclass
class SSHHost:
    """One running sshd: where it listens and the files a client needs."""

    host: str
    port: int
    process: subprocess.Popen[bytes]
    host_key_line: str  # the known_hosts line of this host

    def session_pids(self) -> list[int]:
        """Pids of the per-connection sshd processes (children of the listener)."""
        out = subprocess.run(
            ["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True, check=False
        ).stdout
        return [int(pid) for pid in out.split()]


@dataclass
class SSHFleet:
    """Running sshd servers with the client key that logs in, a key that does not, and the
    known-hosts file listing them."""

    hosts: list[SSHHost]
    client_key: Path
    known_hosts: Path
    other_key: Path
    workdir: Path


def _free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def _keygen(path: Path) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
        check=True,
        capture_output=True,
    )


@contextlib.contextmanager
def ssh_fleet(addresses: list[str], namespaces: list[str] | None = None) -> Iterator[SSHFleet]:
    """Start one sshd per address with fresh host keys, a client key that may log in as
    root, and a known-hosts file; stop them all afterwards. With ``namespaces``, sshd ``i``
    runs in network namespace ``namespaces[i]`` (port 22: each namespace has its own), so
    that whatever a client starts over it runs there too."""
    workdir = Path(tempfile.mkdtemp(prefix="kvf-sshd-"))
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
    hosts: list[SSHHost] = []
    try:
        client, other = workdir / "client", workdir / "other"
        _keygen(client)
        _keygen(other)
        (workdir / "authorized_keys").write_text((workdir / "client.pub").read_text())
        known_lines = []
        for index, address in enumerate(addresses):
            key = workdir / f"host{index}"
            _keygen(key)
            port = 22 if namespaces else _free_port(address)
            config = workdir / f"sshd{index}.conf"
            config.write_text(f"""
Port {port}
ListenAddress {address}
HostKey {key}
PidFile {workdir}/sshd{index}.pid
AuthorizedKeysFile {workdir}/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
AllowStreamLocalForwarding yes
AllowTcpForwarding yes
MaxSessions 200
MaxStartups 200
Subsystem sftp internal-sftp
LogLevel ERROR
""")
            inside = ["ip", "netns", "exec", namespaces[index]] if namespaces else []
            process = subprocess.Popen(
                [*inside, SSHD, "-D", "-e", "-f", str(config)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            public = (workdir / f"host{index}.pub").read_text().split()
            where = address if port == 22 else f"[{address}]:{port}"  # known_hosts' syntax
            line = f"{where} {public[0]} {public[1]}"
            known_lines.append(line)
            hosts.append(SSHHost(address, port, process, line))
        for host in hosts:
            deadline = time.monotonic() + 10
            while True:
                if host.process.poll() is not None:
                    raise RuntimeError(
                        f"sshd on {host.host} exited: "
                        f"{host.process.stderr.read().decode() if host.process.stderr else ''}"
                    )
                with socket.socket() as probe:
                    if probe.connect_ex((host.host, host.port)) == 0:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"sshd on {host.host}:{host.port} did not start")
                time.sleep(0.05)
        known = workdir / "known_hosts"
        known.write_text("\n".join(known_lines) + "\n")
        yield SSHFleet(hosts, client, known, other, workdir)
    finally:
        for host in hosts:
            for pid in host.session_pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 9)
            host.process.kill()
            host.process.wait()
        shutil.rmtree(workdir, ignore_errors=True)
