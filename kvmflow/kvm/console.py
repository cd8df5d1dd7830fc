"""The command that attaches a terminal to an instance's serial console.

QEMU's serial socket serves one client at a time (a second one connects and sees nothing),
so the command holds ``flock`` on a lock file beside the socket and ends at once with
:data:`BUSY_EXIT` when another console holds it. On an SSH node the same command runs
there, through ``ssh -t`` with the node's key and known hosts.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from functools import lru_cache

from kvmflow.kvm.runtime import RuntimePaths
from kvmflow.kvm.spec import InstanceSpec
from kvmflow.node.ssh import SSHTarget

#: Ctrl-] ends the session, as with telnet.
ESCAPE_CODE = "0x1d"
#: The console command's exit status when another console is attached.
BUSY_EXIT = 75


@lru_cache(maxsize=1)
def socat_supports_escape(socat: str = "socat") -> bool:
    """Whether the installed socat knows the ``escape`` option (1.7.3 and later)."""
    path = shutil.which(socat)
    if path is None:
        return False
    try:
        listing = subprocess.run(
            [path, "-hh"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return any(line.split()[:1] == ["escape"] for line in listing.splitlines())


def console_command(
    spec: InstanceSpec,
    paths: RuntimePaths,
    *,
    terminal: bool = True,
    ssh: SSHTarget | None = None,
) -> list[str] | str:
    """The argv that connects to the serial console, or a message saying there is none.
    ``terminal``: stdin is a terminal (put it in raw mode; Ctrl-] detaches)."""
    if not spec.hvparams.serial_console:
        return f"instance {spec.name} has no serial console (serial_console is off)"
    if terminal:
        mode = f"raw,echo=0,escape={ESCAPE_CODE}" if socat_supports_escape() else "echo=0,icanon=0"
        stdio = f"STDIO,{mode}"
    else:
        stdio = "STDIO"
    socket = paths.serial_socket(spec.name)
    command = [
        "flock", "-n", "-E", str(BUSY_EXIT), console_lock(paths, spec.name),
        "socat", stdio, f"UNIX-CONNECT:{socket}",
    ]  # fmt: skip
    if ssh is None:
        return command
    options = ["-p", str(ssh.port), "-o", "BatchMode=yes"]
    for key in ssh.client_keys:
        options += ["-i", os.path.expanduser(key)]
    if ssh.known_hosts is not None:
        options += ["-o", f"UserKnownHostsFile={os.path.expanduser(ssh.known_hosts)}"]
        options += ["-o", "StrictHostKeyChecking=yes"]
    remote = " ".join(shlex.quote(part) for part in command)
    return ["ssh", "-t" if terminal else "-T", *options, f"{ssh.username}@{ssh.host}", remote]


def console_lock(paths: RuntimePaths, name: str) -> str:
    """The lock file a console holds while attached (removed with the instance's files)."""
    return paths.serial_socket(name) + ".lock"
