"""Process control of KVM instances on one node: start, inspect, stop, reboot, clean up.

:class:`KvmHypervisor` is the ancestor's hypervisor class for one node, async and in
QEMU 7.2 syntax. Everything it does goes through a :class:`~kvmflow.node.base.Node`, so the
same code drives this machine and, over SSH, any other. A start either ends with a live,
verified instance and its saved runtime, or it leaves nothing behind (files, uid, process).
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import os
import signal
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import anyio

from kvmflow._logging import get_logger
from kvmflow.errors import (
    InstanceNotRunningError,
    InstanceRunningError,
    KvmflowError,
    MisuseError,
    QemuStartError,
    StopError,
)
from kvmflow.fencing import before_change
from kvmflow.kvm.argv import QEMU_BINARY, build_argv, execution_args, portable_argv
from kvmflow.kvm.console import console_command
from kvmflow.kvm.hvparams import SecurityModel
from kvmflow.kvm.nicscript import SITE_SCRIPT, render_up_script
from kvmflow.kvm.qemu_info import QemuInfo, probe_qemu
from kvmflow.kvm.runtime import RuntimePaths, SavedRuntime, load_runtime, save_runtime
from kvmflow.kvm.spec import InstanceSpec
from kvmflow.kvm.tls import MigrationTLS
from kvmflow.kvm.uidpool import UidPool
from kvmflow.kvm.validation import validate_spec_on
from kvmflow.monitor.qmp import QMPClient
from kvmflow.monitor.transport import FirstReachable
from kvmflow.node.base import Node, NodeInfo
from kvmflow.node.ssh import SSHNode

_log = get_logger("kvmflow.kvm")

_TAKING_OVER: ContextVar[bool] = ContextVar("kvmflow_taking_over", default=False)


@contextlib.contextmanager
def taking_over() -> Iterator[None]:
    """Within this block (recovery), monitors are reached through their spare socket."""
    token = _TAKING_OVER.set(True)
    try:
        yield
    finally:
        _TAKING_OVER.reset(token)


@dataclass(frozen=True)
class InstanceInfo:
    """A running instance as its process shows it (read back from the command line)."""

    name: str
    pid: int
    memory_mib: int
    vcpus: int


def parse_cmdline_info(name: str, pid: int, cmdline: list[str]) -> InstanceInfo:
    """Memory and vCPUs from a QEMU command line (``-m`` and ``-smp``)."""
    memory = vcpus = 0
    for flag, value in itertools.pairwise(cmdline):
        if flag == "-m":
            memory = int(value.split(",")[0].rstrip("M") or 0)
        elif flag == "-smp":
            vcpus = int(value.split(",")[0] or 0)
    return InstanceInfo(name, pid, memory, vcpus)


def cmdline_names_instance(cmdline: list[str], name: str) -> bool:
    """Whether a process command line is QEMU's for ``name`` (``-name <name>``)."""
    return any(flag == "-name" and value == name for flag, value in itertools.pairwise(cmdline))


class KvmHypervisor:
    """Starts and controls the QEMU processes of instances on one node.

    ``default_accelerator`` is used when an instance leaves ``kvm_flag`` unset (``kvm``
    where ``/dev/kvm`` works, ``tcg`` elsewhere). ``qemu_binary`` is this node's QEMU: every
    start here uses it, also a migration target's and a restart's. ``qemu_info`` skips the
    probe of that binary (a fake node's). ``migration_tls`` are the node's credentials for
    encrypted migration streams. ``uid_pool`` is needed for the ``pool`` security
    model. ``site_script`` is what NIC up-scripts run when it exists.
    """

    #: The monitor client :meth:`qmp` opens; a subclass may add instrumentation.
    qmp_client_type: type[QMPClient] = QMPClient

    def __init__(
        self,
        node: Node,
        paths: RuntimePaths,
        *,
        default_accelerator: str = "kvm",
        qemu_binary: str = QEMU_BINARY,
        qemu_info: QemuInfo | None = None,
        migration_tls: MigrationTLS | None = None,
        uid_pool: UidPool | None = None,
        site_script: str = SITE_SCRIPT,
        start_timeout: float = 60.0,
    ) -> None:
        self.node = node
        self.paths = paths
        self.default_accelerator = default_accelerator
        self.qemu_binary = qemu_binary
        self._qemu_info = qemu_info
        self._probing = anyio.Lock()
        self.migration_tls = migration_tls
        self.uid_pool = uid_pool
        self.site_script = site_script
        self.start_timeout = start_timeout
        self._log = _log.bind(node=node.name)

    # ------------------------------------------------------------------ its QEMU

    async def qemu(self) -> QemuInfo:
        """What this node's QEMU binary is and can do, probed once and then remembered."""
        async with self._probing:
            if self._qemu_info is None:
                self._qemu_info = await probe_qemu(
                    self.node, self.qemu_binary, accelerator=self.default_accelerator
                )
                self._log.info(
                    "qemu probed", binary=self.qemu_binary, version=self._qemu_info.version_text
                )
            return self._qemu_info

    def forget_qemu(self) -> None:
        """Probe again on next use (the node's QEMU was upgraded)."""
        self._qemu_info = None

    async def qemu_log(self, name: str, *, limit: int = 4096) -> str:
        """The end of what ``name``'s QEMU wrote to stderr here (its reason for failing)."""
        data = await self.node.read_file(self.paths.log_file(name))
        return (data or b"")[-limit:].decode(errors="replace").strip()

    # ------------------------------------------------------------------ inspection

    async def find_pid(self, name: str) -> int | None:
        """The pid of ``name``'s QEMU if it runs: the pid file's process must be alive and
        carry ``-name <name>`` (a reused pid belonging to anything else is not it)."""
        data = await self.node.read_file(self.paths.pid_file(name))
        if data is None:
            return None
        try:
            pid = int(data.strip())
        except ValueError:
            return None
        cmdline = await self.node.process_cmdline(pid)
        if cmdline is None or not cmdline_names_instance(cmdline, name):
            return None
        return pid

    async def find_pids(self, name: str) -> list[int]:
        """Every live QEMU of ``name`` under this node's runtime root: the pid file's, or,
        when the pid file is gone (a removed runtime directory), the processes started with
        that pid file path and ``-name <name>``, so that none is left behind unseen."""
        pid = await self.find_pid(name)
        if pid is not None:
            return [pid]
        found = []
        for candidate in await self.node.find_processes(self.paths.pid_file(name)):
            cmdline = await self.node.process_cmdline(candidate)
            if cmdline is not None and cmdline_names_instance(cmdline, name):
                found.append(candidate)
        return found

    async def is_running(self, name: str) -> bool:
        return bool(await self.find_pids(name))

    async def info(self, name: str) -> InstanceInfo | None:
        """Name, pid, memory and vCPUs of a running instance, or ``None``."""
        pid = await self.find_pid(name)
        if pid is None:
            return None
        cmdline = await self.node.process_cmdline(pid)
        if cmdline is None:
            return None
        return parse_cmdline_info(name, pid, cmdline)

    async def list_instances(self) -> list[str]:
        """Names of the instances running on this node."""
        names = []
        for name in await self.node.list_dir(self.paths.dir("pid")):
            if not name.startswith(".") and await self.find_pid(name) is not None:
                names.append(name)
        return names

    async def node_info(self) -> NodeInfo:
        return await self.node.node_info()

    def console(self, spec: InstanceSpec, *, terminal: bool = True) -> list[str] | str:
        """The console command for ``spec`` on this node (see :mod:`kvmflow.kvm.console`)."""
        ssh = self.node.target if isinstance(self.node, SSHNode) else None
        return console_command(spec, self.paths, terminal=terminal, ssh=ssh)

    def qmp(
        self, name: str, *, connect_timeout: float = 5.0, command_timeout: float | None = None
    ) -> QMPClient:
        """A QMP client for the instance's monitor (not yet connected); within
        :func:`taking_over`, its spare monitor first (see
        :meth:`~kvmflow.kvm.runtime.RuntimePaths.takeover_socket`)."""
        connector = self.node.monitor_connector(self.paths.qmp_socket(name))
        if _TAKING_OVER.get():
            spare = self.node.monitor_connector(self.paths.takeover_socket(name))
            connector = FirstReachable((spare, connector))
        return self.qmp_client_type(
            connector,
            connect_timeout=connect_timeout,
            command_timeout=command_timeout,
        )

    # ----------------------------------------------------------------------- start

    async def start(
        self,
        spec: InstanceSpec,
        *,
        runtime: SavedRuntime | None = None,
        incoming: str | None = None,
    ) -> InstanceInfo:
        """Start ``spec``'s QEMU and verify it runs.

        With ``runtime`` (reboot, migration target) the saved argv, and so the NICs and
        hardware (the pinned machine type included), are reused with this node's QEMU
        binary; security and the VNC password come from ``spec``. With
        ``incoming`` QEMU waits for a migration stream and the runtime is saved only when
        the migration is finalized (:meth:`save_runtime`).
        """
        await validate_spec_on(spec, self.node)  # files and users as that node has them
        if runtime is not None and runtime.spec.name != spec.name:
            raise MisuseError(f"runtime of {runtime.spec.name} cannot start {spec.name}")
        name = spec.name
        if await self.is_running(name):
            raise InstanceRunningError(f"instance {name} is already running on {self.node.name}")
        qemu = await self.qemu()
        await before_change(f"start QEMU {name} on {self.node.name}")
        await self.paths.ensure(self.node)
        if runtime is not None:
            base_argv = portable_argv(runtime.argv_for(self.paths), qemu.binary)
            nic_spec = runtime.spec
        else:
            base_argv = build_argv(
                spec,
                self.paths,
                qemu,
                default_accelerator=self.default_accelerator,
                node=self.node.name,
            )
            nic_spec = spec
        uid: int | None = None
        started = False
        try:
            # Stale files of an earlier run that died must not be mistaken for this one.
            for path in (
                self.paths.pid_file(name),
                self.paths.qmp_socket(name),
                self.paths.hmp_socket(name),
                self.paths.serial_socket(name),
                self.paths.log_file(name),
            ):
                await self.node.remove(path)
            if spec.hvparams.security_model is SecurityModel.POOL:
                if self.uid_pool is None:
                    raise MisuseError("security_model=pool needs a uid pool on the hypervisor")
                uid = await self.uid_pool.allocate(self.node, name)
                await self.node.write_file(self.paths.uid_file(name), f"{uid}\n".encode())
            await self._write_nic_scripts(nic_spec)
            if spec.hvparams.use_chroot:
                await self.node.make_dirs(self.paths.chroot_dir(name), 0o755)
            argv = base_argv + execution_args(spec, self.paths, qemu, uid=uid, incoming=incoming)
            self._log.info("starting instance", instance=name, incoming=incoming)
            result = await self.node.run(argv, timeout=self.start_timeout)
            if not result.ok:
                # After -D, what QEMU says before it daemonizes goes to its log file.
                output = (result.stderr or result.stdout).strip()
                said = result.error_text() if output else await self.qemu_log(name)
                if not said:
                    # QEMU says why it refuses; silence means it was killed or died first.
                    raise QemuStartError(
                        f"QEMU for {name} ended during its start on {self.node.name} "
                        f"(exit status {result.returncode}) without a word: it was killed "
                        "or died before it could report why"
                    )
                raise QemuStartError(f"QEMU refused to start {name} on {self.node.name}: {said}")
            pid = await self.find_pid(name)
            if pid is None:
                raise QemuStartError(
                    f"QEMU for {name} exited right after starting on {self.node.name}"
                )
            started = True
            if spec.hvparams.vnc_password_file:
                await self._set_vnc_password(spec)
            if incoming is None:
                await save_runtime(
                    self.node,
                    self.paths,
                    SavedRuntime(tuple(base_argv), spec, uid, self.paths.root),
                )
            info = await self.info(name)
            if info is None:
                raise QemuStartError(f"instance {name} died right after starting")
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._undo_start(name, uid, killed=started)
            raise
        finally:
            with anyio.CancelScope(shield=True):
                await self._remove_nic_scripts(nic_spec)
        return info

    async def save_runtime(self, spec: InstanceSpec, source: SavedRuntime) -> None:
        """Record the runtime of an instance started with ``incoming`` from ``source``'s
        runtime, relocated to this node's paths."""
        uid = None
        data = await self.node.read_file(self.paths.uid_file(spec.name))
        if data is not None:
            uid = int(data.strip())
        argv = tuple(portable_argv(source.argv_for(self.paths), self.qemu_binary))
        await save_runtime(self.node, self.paths, SavedRuntime(argv, spec, uid, self.paths.root))

    async def load_runtime(self, name: str) -> SavedRuntime | None:
        return await load_runtime(self.node, self.paths, name)

    async def _write_nic_scripts(self, spec: InstanceSpec) -> None:
        for index, nic in enumerate(spec.nics):
            script = render_up_script(spec, nic, self.site_script)
            await self.node.write_file(
                self.paths.nic_script(spec.name, index), script.encode(), 0o700
            )

    async def _remove_nic_scripts(self, spec: InstanceSpec) -> None:
        for index in range(len(spec.nics)):
            await self.node.remove(self.paths.nic_script(spec.name, index))

    async def _set_vnc_password(self, spec: InstanceSpec) -> None:
        assert spec.hvparams.vnc_password_file is not None
        data = await self.node.read_file(spec.hvparams.vnc_password_file)
        if data is None:
            raise MisuseError(f"VNC password file {spec.hvparams.vnc_password_file} is gone")
        password = data.decode(errors="strict").splitlines()[0] if data.strip() else ""
        if not password:
            raise MisuseError(f"VNC password file {spec.hvparams.vnc_password_file} is empty")
        async with self.qmp(spec.name, command_timeout=10) as qmp:
            await qmp.execute("change-vnc-password", {"password": password})
        self._log.info("vnc password set", instance=spec.name)

    async def _undo_start(self, name: str, uid: int | None, *, killed: bool) -> None:
        for pid in await self.find_pids(name):
            await self._kill_and_wait(name, pid)
        await self._remove_files(name)
        if uid is not None and self.uid_pool is not None:
            await self.uid_pool.release(self.node, uid)
        if killed:
            self._log.warning("start undone", instance=name)

    # ------------------------------------------------------------------------ stop

    async def stop(
        self,
        name: str,
        *,
        force: bool = False,
        timeout: float = 30.0,
        acpi: bool = True,
        qmp: QMPClient | None = None,
    ) -> None:
        """Stop ``name`` and clean up after it.

        Without ``force`` and with ACPI, the guest gets ``system_powerdown`` and up to
        ``timeout`` seconds to power off; then (or with ``force``) QEMU is killed. Pass the
        caller's open ``qmp`` client when it holds the monitor (a monitor serves one client).
        """
        pid = await self.find_pid(name)
        if pid is not None and acpi and not force:
            await self._powerdown(name, pid, timeout, qmp)
        for pid in await self.find_pids(name):
            await self._kill_and_wait(name, pid)
        await self._clean_up_after(name)  # the process is known to be gone here

    async def _powerdown(self, name: str, pid: int, timeout: float, qmp: QMPClient | None) -> None:
        try:
            if qmp is not None:
                await qmp.execute("system_powerdown", timeout=5)
            else:
                async with self.qmp(name, connect_timeout=5, command_timeout=5) as own:
                    await own.execute("system_powerdown")
        except KvmflowError as exc:
            self._log.warning("powerdown request failed", instance=name, error=str(exc))
            return
        self._log.info("powerdown requested", instance=name, timeout=timeout)
        if not await self._wait_gone(pid, timeout):
            self._log.warning("guest ignored powerdown; killing", instance=name)

    async def _kill_and_wait(self, name: str, pid: int) -> None:
        await self.node.signal_process(pid, signal.SIGKILL)
        if not await self._wait_gone(pid, 10):
            raise StopError(f"QEMU process {pid} of {name} survived SIGKILL on {self.node.name}")
        self._log.info("instance process ended", instance=name, pid=pid)

    async def _wait_gone(self, pid: int, timeout: float) -> bool:
        with anyio.move_on_after(timeout):
            # A process on another node offers nothing to await but polling.
            while await self.node.process_cmdline(pid) is not None:  # noqa: ASYNC110
                await anyio.sleep(0.05)
            return True
        return False

    async def reboot(
        self, spec: InstanceSpec, *, force: bool = False, timeout: float = 30.0
    ) -> InstanceInfo:
        """Stop (an ACPI power-off for up to ``timeout`` seconds, then a kill) and start again
        from the saved runtime (same hardware, current security)."""
        runtime = await self.load_runtime(spec.name)
        if runtime is None:
            raise InstanceNotRunningError(f"instance {spec.name} has no saved runtime to reboot")
        await self.stop(spec.name, force=force, acpi=spec.hvparams.acpi, timeout=timeout)
        return await self.start(spec, runtime=runtime)

    # --------------------------------------------------------------------- cleanup

    async def cleanup(self, name: str) -> None:
        """Remove everything a stopped instance left: files, uid, chroot (quarantined when
        not empty). Refuses a live instance."""
        if await self.is_running(name):
            raise InstanceRunningError(f"instance {name} is running; stop it before cleanup")
        await self._clean_up_after(name)

    async def _clean_up_after(self, name: str) -> None:
        uid_data = await self.node.read_file(self.paths.uid_file(name))
        await self._remove_files(name)
        if uid_data is not None and self.uid_pool is not None:
            try:
                await self.uid_pool.release(self.node, int(uid_data.strip()))
            except ValueError:
                self._log.warning("unreadable uid file", instance=name)
        await self._clean_chroot(name)

    async def _remove_files(self, name: str) -> None:
        for path in self.paths.instance_files(name):
            await self.node.remove(path)

    async def _clean_chroot(self, name: str) -> None:
        chroot = self.paths.chroot_dir(name)
        entries = await self.node.list_dir(chroot)
        if not entries:
            await self.node.remove_tree(chroot)
            return
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        target = os.path.join(self.paths.quarantine_dir(), f"{name}-{stamp}")
        await self.node.make_dirs(self.paths.quarantine_dir(), 0o700)
        await self.node.rename(chroot, target)
        self._log.warning(
            "non-empty chroot moved to quarantine; inspect it, it may be a security incident",
            instance=name,
            entries=entries[:10],
            quarantine=target,
        )
