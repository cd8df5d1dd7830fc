"""A tiny guest that keeps memory dirty, built from source with the machine's gcc.

Tests, benchmarks and the demo need a guest whose memory load they control. This one is a
32-bit multiboot ELF (``dirty.c``) that QEMU boots with ``-kernel``; its command line says
how many MiB to dirty per sweep and how long to pause between sweeps. It is compiled once
per source version into a cache directory.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

import anyio

from kvmflow.errors import GuestBuildError, MalformedReplyError
from kvmflow.kvm.hvparams import DiskType, HvParams
from kvmflow.kvm.hypervisor import KvmHypervisor
from kvmflow.kvm.spec import Disk, InstanceSpec
from kvmflow.monitor.hmp import HMPClient

#: Physical address where the guest counts completed sweeps (HMP ``xp /1wx 0x7000``).
SWEEP_COUNTER_ADDRESS = 0x7000


def _source(name: str) -> bytes:
    return resources.files("kvmflow.guest").joinpath(name).read_bytes()


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kvmflow"


def build_dirty_guest(cache_dir: Path | None = None) -> Path:
    """Compile the dirtying guest (if not cached yet) and return the ELF's path."""
    source, script = _source("dirty.c"), _source("dirty.ld")
    digest = hashlib.sha256(source + b"\0" + script).hexdigest()[:16]
    directory = cache_dir or default_cache_dir()
    target = directory / f"dirty-{digest}.elf"
    if target.exists():
        return target
    for tool in ("gcc", "ld"):
        if shutil.which(tool) is None:
            raise GuestBuildError(
                f"{tool} is needed to build the test guest; install it with: apt-get install -y gcc"
            )
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kvmflow-guest-") as work:
        c_file, ld_file = Path(work, "dirty.c"), Path(work, "dirty.ld")
        c_file.write_bytes(source)
        ld_file.write_bytes(script)
        obj, elf = Path(work, "dirty.o"), Path(work, "dirty.elf")
        steps = [
            [
                "gcc",
                "-m32",
                "-ffreestanding",
                "-nostdlib",
                "-fno-pic",
                "-fno-pie",
                "-fno-stack-protector",
                "-fno-asynchronous-unwind-tables",
                "-O2",
                "-c",
                str(c_file),
                "-o",
                str(obj),
            ],
            ["ld", "-m", "elf_i386", "-T", str(ld_file), "-o", str(elf), str(obj)],
        ]
        for argv in steps:
            result = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120)
            if result.returncode != 0:
                raise GuestBuildError(
                    f"{argv[0]} failed building the test guest: "
                    f"{result.stderr.strip() or result.stdout.strip()}"
                )
        temp_target = directory / f".{target.name}.{os.getpid()}"
        shutil.copyfile(elf, temp_target)
        os.replace(temp_target, target)
    return target


#: The pattern a guest started with ``marked=True`` keeps in its memory (see dirty.c).
MARKER = b"KVMFLOW-GUEST-MEMORY-MARKER-7f3a9c"


def guest_command_line(
    mib: int, pause: int = 0, *, marked: bool = False, disk_sectors: int = 0
) -> str:
    """The ``-append`` text that makes the guest dirty ``mib`` MiB per sweep (and, marked,
    fill those pages with :data:`MARKER` first; with ``disk_sectors``, write one sector of
    its first IDE disk per sweep, see :func:`expected_sector`)."""
    text = f"mib={mib} pause={pause}" + (" mark=1" if marked else "")
    return text + (f" disk={disk_sectors}" if disk_sectors else "")


def sector_bytes(sector: int, sweep: int) -> bytes:
    """The 512 bytes the guest writes to ``sector`` in sweep ``sweep`` (as dirty.c does)."""
    words = [0x5346564B, sector, sweep]
    words += [(sweep * 0x9E3779B1 + sector * 0x85EBCA6B + i) & 0xFFFFFFFF for i in range(3, 128)]
    return b"".join(word.to_bytes(4, "little") for word in words)


def expected_sector(sector: int, sectors: int, sweeps: int) -> set[bytes]:
    """What ``sector`` may hold once the guest has counted ``sweeps`` sweeps writing
    ``sectors`` sectors round robin: the last counted write to it (or zeroes), or the next
    sweep's, which may have been written but not yet counted when the guest stopped."""
    last = max((g for g in range(sector, sweeps, sectors)), default=None)
    allowed = {sector_bytes(sector, last) if last is not None else bytes(512)}
    if sweeps % sectors == sector:
        allowed.add(sector_bytes(sector, sweeps))
    return allowed


async def sweep_count(hypervisor: KvmHypervisor, name: str) -> int:
    """How many sweeps the dirtying guest ``name`` has done (read over HMP, on any node)."""
    connector = hypervisor.node.monitor_connector(hypervisor.paths.hmp_socket(name))
    async with HMPClient(connector, command_timeout=10) as hmp:
        line = await hmp.run(f"xp /1wx {SWEEP_COUNTER_ADDRESS:#x}")
    try:
        return int(line.split(":")[1].strip(), 16)
    except (IndexError, ValueError) as exc:
        raise MalformedReplyError(
            f"no sweep counter of {name} in the answer to xp",
            line.encode(),
            monitor=connector.description,
        ) from exc


async def wait_for_sweeps(
    hypervisor: KvmHypervisor, name: str, minimum: int = 2, timeout: float = 60.0
) -> None:
    """Wait until the guest has booted and dirtied its memory ``minimum`` times (SeaBIOS
    takes seconds to reach the kernel under nested KVM)."""
    with anyio.fail_after(timeout):
        # The guest's memory can only be polled; it signals nothing.
        while await sweep_count(hypervisor, name) < minimum:  # noqa: ASYNC110
            await anyio.sleep(0.2)


def dirty_guest_spec(
    name: str,
    elf: Path,
    *,
    migration_port: int,
    mib: int = 48,
    pause: int = 0,
    memory_mib: int = 128,
    marked: bool = False,
    disks: tuple[Disk, ...] = (),
    disk_sectors: int = 0,
) -> InstanceSpec:
    """An instance that boots the dirtying guest: ``mib`` MiB dirtied per sweep (holding
    :data:`MARKER` when ``marked``), with ``disks`` on IDE and one of ``disk_sectors``
    sectors of the first written per sweep."""
    return InstanceSpec(
        name,
        memory_mib=memory_mib,
        hvparams=HvParams(
            migration_port=migration_port,
            kernel_path=str(elf),
            root_path="/dev/null",
            kernel_args=guest_command_line(mib, pause, marked=marked, disk_sectors=disk_sectors),
            serial_console=False,
            disk_type=DiskType.IDE if disks else DiskType.PARAVIRTUAL,
        ),
        disks=disks,
    )
