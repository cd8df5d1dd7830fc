"""A second QEMU beside the system's, from Debian's packages, for tests of mixed fleets.

Rolling upgrades mean migrations between QEMU releases, and testing them needs two releases
on one machine without touching the system's. :func:`debian_qemu` fetches Debian's QEMU
packages of another suite (by default Debian 12's ``bookworm-backports``, which carries QEMU
10.0) with a private apt configuration and ``apt-get download``, unpacks them with
``dpkg -x`` under a cache directory, and writes a wrapper ``bin/qemu-system-x86_64``.

The wrapper is needed because a QEMU loads its modules and firmware from the paths it was
built with, where the system's QEMU keeps its own ("Only modules from the same build can be
loaded"). It runs the binary in a private mount namespace (``unshare --mount``, root only)
with the unpacked module, data and SeaBIOS directories bind-mounted over the system's, and
keeps the caller's ``argv[0]``, so that ``/proc/PID/cmdline`` reads as for any QEMU.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

PACKAGES = ("qemu-system-x86", "qemu-system-common", "qemu-system-data", "seabios")
DEFAULT_SUITE = "bookworm-backports"
DEFAULT_CACHE = Path("/var/cache/kvmflow/qemu")
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
#: Directories a QEMU build reads at run time, relative to its prefix.
BOUND = ("usr/lib/x86_64-linux-gnu/qemu", "usr/share/qemu", "usr/share/seabios")

WRAPPER = """#!/bin/bash
# Written by kvmflow.testing.qemu_builds: QEMU from {suite} with its own modules and firmware.
exec unshare --mount --propagation private -- /bin/bash -c '
prefix=$1; shift; name=$1; shift
for dir in {bound}; do mount --bind "$prefix/$dir" "/$dir" || exit 125; done
exec -a "$name" "$prefix/usr/bin/qemu-system-x86_64" "$@"' qemu {prefix} "$0" "$@"
"""


class QemuBuildError(Exception):
    """The second QEMU could not be fetched or does not run; says which step failed."""


@dataclass(frozen=True)
class QemuBuild:
    """A QEMU binary to test with: its name in test ids, the path to run, its version."""

    label: str
    binary: str
    version: str


def system_qemu() -> QemuBuild:
    binary = shutil.which("qemu-system-x86_64") or "qemu-system-x86_64"
    return QemuBuild("system", "qemu-system-x86_64", _version_of(binary))


def debian_qemu(suite: str = DEFAULT_SUITE, cache: Path = DEFAULT_CACHE) -> QemuBuild:
    """The QEMU of Debian ``suite``, fetched and unpacked once under ``cache/suite``."""
    home = cache / suite
    wrapper = home / "bin" / "qemu-system-x86_64"
    if not wrapper.exists():
        _fetch(suite, home)
    return QemuBuild(suite, str(wrapper), _version_of(str(wrapper)))


def _fetch(suite: str, home: Path) -> None:
    home.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{suite}-", dir=home.parent))
    try:
        (work / "lists" / "partial").mkdir(parents=True)
        (work / "cache" / "archives" / "partial").mkdir(parents=True)
        sources = work / "sources.list"
        sources.write_text(f"deb [signed-by={KEYRING}] http://deb.debian.org/debian {suite} main\n")
        apt = [
            f"-oDir::Etc::SourceList={sources}",
            "-oDir::Etc::SourceParts=/dev/null",
            f"-oDir::State::Lists={work / 'lists'}",
            f"-oDir::Cache={work / 'cache'}",
            "-oAPT::Sandbox::User=root",
        ]
        _run(["apt-get", *apt, "update"], "apt-get update", work)
        debs = work / "debs"
        debs.mkdir()
        _run(
            ["apt-get", *apt, "download", *(f"{p}/{suite}" for p in PACKAGES)],
            "apt-get download",
            debs,
        )
        prefix = work / "prefix"
        for deb in sorted(debs.glob("*.deb")):
            _run(["dpkg", "-x", str(deb), str(prefix)], f"dpkg -x {deb.name}", work)
        shutil.rmtree(debs)
        shutil.rmtree(work / "cache")
        (work / "bin").mkdir()
        final_prefix = home / "prefix"
        script = work / "bin" / "qemu-system-x86_64"
        script.write_text(WRAPPER.format(suite=suite, bound=" ".join(BOUND), prefix=final_prefix))
        script.chmod(0o755)
        try:
            os.rename(work, home)  # whole or not at all: a half-fetched build is never used
        except OSError:
            if not (home / "bin" / "qemu-system-x86_64").exists():
                raise
            shutil.rmtree(work)  # another process fetched it meanwhile
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def _run(argv: list[str], step: str, cwd: Path) -> None:
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise QemuBuildError(f"{step} failed: {(result.stderr or result.stdout).strip()[-800:]}")


def _version_of(binary: str) -> str:
    result = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    words = result.stdout.split()
    if result.returncode != 0 or len(words) < 4:
        said = (result.stderr or result.stdout)[-400:]
        raise QemuBuildError(f"{binary} --version failed: {said}")
    return words[3]  # "QEMU emulator version 10.0.2 (Debian ...)"
