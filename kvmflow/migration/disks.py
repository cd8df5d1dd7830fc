"""Local disks copied with the guest: NBD on the target, ``blockdev-mirror`` on the source.

An instance's local disks (``Disk(local=True)``) live on its node's own storage, so a live
migration must carry them. Per disk, in the order libvirt and Incus use:

==========  ==============================================================================
step        what happens (and what undoes it)
==========  ==============================================================================
images      the target node gets an empty raw image of the same size at the disk's path
            there, after a pre-check (no file there yet, enough free space) (removed)
export      the target QEMU, listening for the migration, serves each image over NBD
            (``nbd-server-start`` + writable ``block-export-add``) (the target is killed)
mirror      the source mirrors each disk into its export while the guest runs (an NBD
            client node, ``blockdev-mirror``, ``sync=full``, ``copy-mode=write-blocking``:
            through TLS when the migration is encrypted; once a job is
            ready every guest write reaches both disks before it completes); zero blocks
            are sent as zeroes, not data (the jobs are cancelled)
ready       every job is ready; only then does RAM migrate, under the same bandwidth
finish      the source has stopped (migration completed): each job is cancelled, which
            leaves the target a point-in-time copy of that moment, and the NBD server stops;
            then the target's vCPUs start
==========  ==============================================================================

After success the source's copies are removed unless a disk says ``keep_source``. Every
exit before ``finish`` cancels the jobs, kills the target and removes the images it created,
so that the source runs on its own disks and the target keeps nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio

from kvmflow._logging import get_logger
from kvmflow.errors import CommandError, KvmflowError, MigrationError
from kvmflow.kvm.hypervisor import KvmHypervisor
from kvmflow.kvm.spec import InstanceSpec
from kvmflow.migration.compat import Incompatibility
from kvmflow.monitor.queries import CommandRunner

_log = get_logger("kvmflow.migration")
JOB_PREFIX = "kvmflow-mirror-"
NBD_NODE_PREFIX = "kvmflow-nbd-"
NBD_PORTS = (49152, 60999)  # where the target's NBD server listens (a free one, by trying)


@dataclass(frozen=True)
class LocalDisk:
    """One local disk of one migration: its QEMU device, path on each side, size."""

    device: str  # the BlockBackend name QEMU gave the -drive (virtio0, ide0-hd0, disk0)
    source_path: str
    target_path: str
    size: int
    keep_source: bool

    @property
    def job(self) -> str:
        return JOB_PREFIX + self.device

    @property
    def nbd_node(self) -> str:
        """The source's block node that writes into the target's export."""
        return NBD_NODE_PREFIX + self.device

    def as_record(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> LocalDisk:
        return cls(
            str(record["device"]),
            str(record["source_path"]),
            str(record["target_path"]),
            int(record["size"]),
            bool(record["keep_source"]),
        )


@dataclass
class DiskCopy:
    """The local disks of one migration from ``source`` to ``target``, and how far their
    copy got (for progress, the journal, and undoing)."""

    name: str  # the instance's
    source: KvmHypervisor
    target: KvmHypervisor
    disks: list[LocalDisk] = field(default_factory=list)
    created: list[str] = field(default_factory=list)  # images made on the target
    nbd_host: str = ""
    nbd_port: int = 0

    @property
    def wanted(self) -> bool:
        return bool(self.disks)

    async def plan(self, spec: InstanceSpec, qmp: CommandRunner) -> None:
        """Find each local disk's device and size in the running source."""
        blocks = {}
        for block in await qmp.execute("query-block"):
            image = (block.get("inserted") or {}).get("image") or {}
            blocks[image.get("filename")] = (block["device"], int(image.get("virtual-size", 0)))
        for disk in spec.disks:
            if not disk.local:
                continue
            source_path = disk.path_on(self.source.node.name)
            if source_path not in blocks:
                raise MigrationError(
                    self.name,
                    f"its local disk {source_path} is not open in its QEMU",
                    runs_on=self.source.node.name,
                )
            device, size = blocks[source_path]
            self.disks.append(
                LocalDisk(
                    device, source_path, disk.path_on(self.target.node.name), size, disk.keep_source
                )
            )

    async def problems(self) -> list[Incompatibility]:
        """What stops the target from taking the images: a file already at a path, or too
        little free space in a directory for the images bound there."""
        found: list[Incompatibility] = []
        node = self.target.node
        needs: dict[str, int] = {}
        for disk in self.disks:
            if await node.path_kind(disk.target_path) is not None:
                found.append(
                    Incompatibility(
                        f"{node.name} already has {disk.target_path}",
                        "remove it there (a leftover copy?) or give the disk another path",
                    )
                )
            directory = os.path.dirname(disk.target_path)
            needs[directory] = needs.get(directory, 0) + disk.size
        for directory, size in needs.items():
            free = await _free_bytes(self.target, directory)
            if free is None:
                found.append(
                    Incompatibility(
                        f"{node.name} has no directory {directory} for its local disks",
                        f"create {directory} on {node.name}",
                    )
                )
            elif free < size:
                found.append(
                    Incompatibility(
                        f"{node.name} has {free >> 20} MiB free in {directory}, the local "
                        f"disks need {size >> 20} MiB",
                        f"free space on {node.name} or migrate elsewhere",
                    )
                )
        return found

    async def create_images(self) -> None:
        """An empty (sparse) raw image of each disk's size on the target."""
        for disk in self.disks:
            result = await self.target.node.run(
                ["truncate", "-s", str(disk.size), disk.target_path]
            )
            if not result.ok:
                raise MigrationError(
                    self.name,
                    f"cannot create {disk.target_path} on {self.target.node.name}: "
                    f"{result.error_text()}",
                    runs_on=self.source.node.name,
                )
            self.created.append(disk.target_path)

    async def remove_images(self) -> None:
        """Undo :meth:`create_images` (the target QEMU is gone by then)."""
        for path in reversed(self.created):
            try:
                await self.target.node.remove(path)
            except KvmflowError as exc:
                _log.error("partial image left on the target", path=path, error=str(exc))
        self.created.clear()

    async def export(
        self, target_qmp: CommandRunner, address: str, *, tls_creds: str | None = None
    ) -> None:
        """Serve every image from the target QEMU over NBD on ``address`` (a free port),
        through TLS with the target's credentials object ``tls_creds``."""
        low, high = NBD_PORTS
        for port in random.sample(range(low, high), 20):
            server: dict[str, object] = {
                "addr": {"type": "inet", "data": {"host": address, "port": str(port)}}
            }
            if tls_creds is not None:
                server["tls-creds"] = tls_creds
            try:
                await target_qmp.execute("nbd-server-start", server)
            except CommandError as exc:
                if "in use" in str(exc).lower():
                    continue
                raise
            self.nbd_host, self.nbd_port = address, port
            break
        else:
            raise MigrationError(
                self.name,
                f"no free port for NBD on {self.target.node.name}",
                runs_on=self.source.node.name,
            )
        blocks = await target_qmp.execute("query-block")
        nodes = {b["device"]: b["inserted"]["node-name"] for b in blocks if b.get("inserted")}
        for disk in self.disks:
            await target_qmp.execute(
                "block-export-add",
                {
                    "type": "nbd",
                    "id": disk.job,
                    "node-name": nodes[disk.device],
                    "name": disk.device,
                    "writable": True,
                },
            )

    async def mirror(
        self,
        qmp: CommandRunner,
        speed: int | None,
        timeout: float,
        on_progress: Callable[[int, int], None] | None = None,
        *,
        tls_creds: str | None = None,
        tls_hostname: str | None = None,
    ) -> None:
        """Mirror every disk into the target's export (at most ``speed`` bytes/s each),
        through TLS with the source's credentials object ``tls_creds`` checking the target's
        certificate for ``tls_hostname``; return once all are ready, telling
        ``on_progress`` (copied, total) meanwhile."""
        for disk in self.disks:
            node: dict[str, object] = {
                "driver": "nbd",
                "node-name": disk.nbd_node,
                "server": {"type": "inet", "host": self.nbd_host, "port": str(self.nbd_port)},
                "export": disk.device,
            }
            if tls_creds is not None:
                node["tls-creds"] = tls_creds
                if tls_hostname is not None:
                    node["tls-hostname"] = tls_hostname
            await qmp.execute("blockdev-add", node)
            arguments: dict[str, object] = {
                "job-id": disk.job,
                "device": disk.device,
                "target": disk.nbd_node,
                "sync": "full",
                "copy-mode": "write-blocking",
            }
            if speed:
                arguments["speed"] = speed
            await qmp.execute("blockdev-mirror", arguments)
        with anyio.fail_after(timeout):
            while True:
                jobs = {j["device"]: j for j in await qmp.execute("query-block-jobs")}
                for disk in self.disks:
                    job = jobs.get(disk.job)
                    if job is None or job.get("status") in ("aborting", "concluded", "null"):
                        raise MigrationError(
                            self.name,
                            f"the copy of {disk.source_path} ended before it was ready"
                            + (f": {job.get('error')}" if job and job.get("error") else ""),
                            runs_on=self.source.node.name,
                        )
                if on_progress is not None:
                    figures = self.progress(list(jobs.values()))
                    on_progress(figures["disk_copied"], figures["disk_total"])
                if all(jobs[d.job].get("ready") for d in self.disks):
                    return
                await anyio.sleep(0.1)

    async def cancel(self, qmp: CommandRunner) -> None:
        """Stop every mirror job (an abort: the source keeps its own disks)."""
        for disk in self.disks:
            try:
                await qmp.execute("block-job-cancel", {"device": disk.job, "force": True})
            except KvmflowError:
                continue  # it had ended already
        await self._wait_gone(qmp, 30)
        await self._drop_nbd_nodes(qmp)

    async def finish(self, qmp: CommandRunner, target_qmp: CommandRunner) -> None:
        """The source has stopped: end each job (the target's copy is now that moment's,
        written through), then stop serving the images. A job or export already gone (an
        adopted migration whose first controller got that far) is no error."""
        running = {j["device"] for j in await qmp.execute("query-block-jobs")}
        for disk in self.disks:
            if disk.job in running:
                await qmp.execute("block-job-cancel", {"device": disk.job})
        await self._wait_gone(qmp, 60)
        await self._drop_nbd_nodes(qmp)
        for disk in self.disks:
            with contextlib.suppress(CommandError):
                await target_qmp.execute("block-export-del", {"id": disk.job})
        with contextlib.suppress(CommandError):
            await target_qmp.execute("nbd-server-stop")

    async def remove_source_copies(self) -> list[str]:
        """After the move, the source's copies (unless kept); returns what could not go."""
        problems = []
        for disk in self.disks:
            if not disk.keep_source:
                try:
                    await self.source.node.remove(disk.source_path)
                except KvmflowError as exc:
                    problems.append(f"the source's copy {disk.source_path} stays: {exc}")
        return problems

    async def _drop_nbd_nodes(self, qmp: CommandRunner) -> None:
        """The source's NBD client nodes, once no job writes through them."""
        for disk in self.disks:
            with contextlib.suppress(CommandError):  # never added, or gone already
                await qmp.execute("blockdev-del", {"node-name": disk.nbd_node})

    async def _wait_gone(self, qmp: CommandRunner, timeout: float) -> None:
        ours = {d.job for d in self.disks}
        with anyio.fail_after(timeout):
            # QEMU's job events would do, but the source monitor may be HMP: poll.
            while ours & {j["device"] for j in await qmp.execute("query-block-jobs")}:  # noqa: ASYNC110
                await anyio.sleep(0.05)

    def progress(self, jobs: list[dict[str, object]]) -> dict[str, int]:
        """Disk bytes copied and to copy, from a ``query-block-jobs`` answer."""
        ours = [j for j in jobs if str(j.get("device", "")).startswith(JOB_PREFIX)]
        return {
            "disk_copied": sum(int(str(j.get("offset", 0))) for j in ours),
            "disk_total": sum(int(str(j.get("len", 0))) for j in ours),
        }


async def _free_bytes(hv: KvmHypervisor, directory: str) -> int | None:
    result = await hv.node.run(["df", "--output=avail", "-B1", directory])
    lines = result.stdout.decode().split()
    if not result.ok or len(lines) < 2 or not lines[-1].isdigit():
        return None
    return int(lines[-1])


async def clean_after_crash(
    name: str, source: KvmHypervisor, target: KvmHypervisor, disks: list[LocalDisk]
) -> None:
    """Recovery's undo of a copy a dead controller left before the switch-over: the
    source's mirror jobs cancelled (if its QEMU still runs), the target's images removed
    (its QEMU is gone by then)."""
    copy = DiskCopy(name, source, target, list(disks), [d.target_path for d in disks])
    with contextlib.suppress(KvmflowError, TimeoutError):
        async with source.qmp(name, connect_timeout=3, command_timeout=10) as qmp:
            await copy.cancel(qmp)
    await copy.remove_images()


async def stop_serving(name: str, target: KvmHypervisor, disks: list[LocalDisk]) -> None:
    """Recovery's end of a copy whose guest runs on the target: no NBD export left open."""
    with contextlib.suppress(KvmflowError, TimeoutError):
        async with target.qmp(name, connect_timeout=3, command_timeout=10) as qmp:
            for disk in disks:
                with contextlib.suppress(KvmflowError):
                    await qmp.execute("block-export-del", {"id": disk.job})
            with contextlib.suppress(KvmflowError):
                await qmp.execute("nbd-server-stop")


async def set_copy_speed(qmp: CommandRunner, speed: int) -> None:
    """Hold every local-disk copy of the QEMU behind ``qmp`` to ``speed`` bytes/s (the
    engine's share of a link budget, which the RAM stream gets too)."""
    for job in await qmp.execute("query-block-jobs"):
        if str(job.get("device", "")).startswith(JOB_PREFIX):
            await qmp.execute("block-job-set-speed", {"device": job["device"], "speed": speed})
