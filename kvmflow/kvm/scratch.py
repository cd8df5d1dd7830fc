"""A throwaway paused QEMU with QMP and HMP sockets, for probes, tests and benchmarks.

It runs no guest (``-S -nodefaults``), so it starts in milliseconds and needs no disk. It is
a child of the calling process, never daemonized, so that it can always be reaped.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kvmflow.errors import DeadlineError, QemuStartError

QEMU_BINARY = "qemu-system-x86_64"


def kvm_usable() -> bool:
    """Whether ``/dev/kvm`` opens for reading and writing on this machine."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def default_accelerator() -> str:
    """``kvm`` when it is usable here, ``tcg`` otherwise."""
    return "kvm" if kvm_usable() else "tcg"


def unix_sockets_listening(paths: set[str]) -> bool:
    """Whether every path is a unix socket in the listening state (from ``/proc/net/unix``).

    A socket file exists between ``bind`` and ``listen``, so its presence is not enough; and
    connecting to probe would take the monitor's only client slot for a moment.
    """
    listening = set()
    with open("/proc/net/unix", encoding="utf-8", errors="replace") as table:
        next(table, None)
        for row in table:
            fields = row.split(None, 7)
            if len(fields) == 8 and int(fields[3], 16) & _SO_ACCEPTCON:
                listening.add(fields[7].rstrip("\n"))
    return paths <= listening


_SO_ACCEPTCON = 0x10000


@dataclass
class ScratchQemu:
    """A running scratch QEMU and where its monitors listen."""

    workdir: Path
    accelerator: str
    process: subprocess.Popen[bytes]
    qmp_path: Path
    hmp_path: Path
    _own_workdir: bool = field(default=False, repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, timeout: float = 5.0) -> None:
        """Kill QEMU, reap it and remove the work directory if it was made for it."""
        if self.process.poll() is None:
            self.process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout)
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def start_scratch_qemu(
    workdir: Path | None = None,
    *,
    accelerator: str | None = None,
    memory_mib: int = 64,
    extra_args: Sequence[str] = (),
    binary: str = QEMU_BINARY,
    timeout: float = 10.0,
) -> ScratchQemu:
    """Start a paused QEMU and wait until both monitor sockets exist."""
    own = workdir is None
    path = Path(tempfile.mkdtemp(prefix="kvmflow-scratch-")) if workdir is None else workdir
    accel = accelerator or default_accelerator()
    qmp_path, hmp_path = path / "qmp.sock", path / "hmp.sock"
    argv = [
        binary,
        "-name",
        "kvmflow-scratch",
        "-accel",
        accel,
        "-S",
        "-nodefaults",
        "-display",
        "none",
        "-m",
        str(memory_mib),
        "-qmp",
        f"unix:{qmp_path},server=on,wait=off",
        "-monitor",
        f"unix:{hmp_path},server=on,wait=off",
    ]
    argv += list(extra_args)
    log_path = path / "qemu.log"
    try:
        with open(log_path, "wb") as log:
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    except OSError as exc:
        if own:
            shutil.rmtree(path, ignore_errors=True)
        raise QemuStartError(f"cannot run {binary}: {exc.strerror or exc}") from exc
    qemu = ScratchQemu(path, accel, process, qmp_path, hmp_path, own)
    deadline = time.monotonic() + timeout
    while not unix_sockets_listening({str(qmp_path), str(hmp_path)}):
        if process.poll() is not None:
            message = log_path.read_text(errors="replace").strip()
            qemu.stop()
            raise QemuStartError(f"QEMU exited with status {process.returncode}: {message}")
        if time.monotonic() > deadline:
            qemu.stop()
            raise DeadlineError("starting the scratch QEMU", timeout, where=str(path))
        time.sleep(0.005)
    return qemu


@contextlib.contextmanager
def scratch_qemu(
    workdir: Path | None = None,
    *,
    accelerator: str | None = None,
    memory_mib: int = 64,
    extra_args: Sequence[str] = (),
) -> Iterator[ScratchQemu]:
    """``with scratch_qemu() as qemu:`` -- start a scratch QEMU and always stop it."""
    qemu = start_scratch_qemu(
        workdir, accelerator=accelerator, memory_mib=memory_mib, extra_args=extra_args
    )
    try:
        yield qemu
    finally:
        qemu.stop()
