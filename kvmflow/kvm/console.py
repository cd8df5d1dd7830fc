"""The command that attaches a terminal to an instance's serial console."""

from __future__ import annotations

import shutil
import subprocess
from functools import lru_cache

from kvmflow.kvm.runtime import RuntimePaths
from kvmflow.kvm.spec import InstanceSpec

#: Ctrl-] ends the session, as with telnet.
ESCAPE_CODE = "0x1d"


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


def console_command(spec: InstanceSpec, paths: RuntimePaths) -> list[str] | str:
    """The argv that connects to the serial console, or a message saying there is none."""
    if not spec.hvparams.serial_console:
        return f"instance {spec.name} has no serial console (serial_console is off)"
    tty = f"raw,echo=0,escape={ESCAPE_CODE}" if socat_supports_escape() else "echo=0,icanon=0"
    return ["socat", f"STDIO,{tty}", f"UNIX-CONNECT:{paths.serial_socket(spec.name)}"]
