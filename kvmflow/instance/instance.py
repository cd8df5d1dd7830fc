"""An instance: its description, where it runs, and its state machine."""

from __future__ import annotations

import anyio

from kvmflow.errors import InstanceRunningError, KvmflowError, MisuseError
from kvmflow.instance.machine import InstanceMachine
from kvmflow.instance.states import InstanceEvent, InstanceState
from kvmflow.kvm.hypervisor import InstanceInfo, KvmHypervisor
from kvmflow.kvm.spec import InstanceSpec
from kvmflow.monitor.queries import RunState, query_status


class Instance:
    """One instance bound to the hypervisor (node) it runs on.

    Lifecycle operations go through the state machine and take the instance's single
    operation slot, so two operations never interleave.
    """

    def __init__(
        self,
        spec: InstanceSpec,
        hypervisor: KvmHypervisor,
        state: InstanceState = InstanceState.DEFINED,
    ) -> None:
        self.spec = spec
        self.hypervisor = hypervisor
        self.machine = InstanceMachine(spec.name, hypervisor.node.name, state)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def node_name(self) -> str:
        return self.hypervisor.node.name

    def __repr__(self) -> str:
        return f"Instance({self.name!r}, node={self.node_name!r}, state={self.machine.state})"

    @classmethod
    async def attach(cls, spec: InstanceSpec, hypervisor: KvmHypervisor) -> Instance:
        """An instance object for ``spec`` whose state reflects what runs on the node now."""
        running = await hypervisor.is_running(spec.name)
        instance = cls(
            spec, hypervisor, InstanceState.RUNNING if running else InstanceState.STOPPED
        )
        if running:
            await instance.refresh()  # it may be paused
        return instance

    async def start(self) -> InstanceInfo:
        async with self.machine.operation_scope("start"):
            self.machine.fire(InstanceEvent.START)
            try:
                info = await self.hypervisor.start(self.spec)
            except BaseException:
                self.machine.fire(InstanceEvent.START_FAILED)
                raise
            self.machine.fire(InstanceEvent.STARTED)
            return info

    async def stop(self, *, force: bool = False, timeout: float = 30.0) -> None:
        async with self.machine.operation_scope("stop"):
            was_paused = self.machine.state is InstanceState.PAUSED
            self.machine.fire(InstanceEvent.STOP)
            try:
                await self.hypervisor.stop(
                    self.name, force=force, timeout=timeout, acpi=self.spec.hvparams.acpi
                )
            finally:
                with anyio.CancelScope(shield=True):
                    still_running = await self.hypervisor.is_running(self.name)
                if not still_running:
                    self.machine.fire(InstanceEvent.STOPPED)
                elif was_paused:
                    self.machine.fire(InstanceEvent.STOP_FAILED_PAUSED)
                else:
                    self.machine.fire(InstanceEvent.STOP_FAILED)

    async def pause(self) -> None:
        """Stop the guest's vCPUs (QMP ``stop``); the process and its memory stay."""
        await self._set_running(False)

    async def resume(self) -> None:
        """Start the guest's vCPUs again (QMP ``cont``)."""
        await self._set_running(True)

    async def _set_running(self, running: bool) -> None:
        event = InstanceEvent.RESUME if running else InstanceEvent.PAUSE
        async with self.machine.operation_scope(event.value):
            if not self.machine.can(event):
                raise MisuseError(
                    f"instance {self.name} is {self.machine.state.value}; "
                    f"{event.value} needs it {'paused' if running else 'running'}"
                )
            async with self.hypervisor.qmp(self.name, command_timeout=10) as qmp:
                await qmp.execute("cont" if running else "stop")
            self.machine.fire(event)

    async def refresh(self) -> InstanceState:
        """Bring the machine in line with QEMU (a guest paused or resumed through its own
        monitor, a process that died); returns the state now. Instances busy with an
        operation are left to it."""
        machine = self.machine
        if machine.operation is not None or machine.state not in (
            InstanceState.RUNNING,
            InstanceState.PAUSED,
        ):
            return machine.state
        if not await self.hypervisor.is_running(self.name):
            machine.fire(InstanceEvent.CRASHED)
            return machine.state
        try:
            async with self.hypervisor.qmp(self.name, command_timeout=10) as qmp:
                status = await query_status(qmp)
        except KvmflowError:
            return machine.state  # the monitor cannot tell now: keep what is known
        paused = status.state is not RunState.RUNNING
        if paused and machine.state is InstanceState.RUNNING:
            machine.fire(InstanceEvent.PAUSE)
        elif not paused and machine.state is InstanceState.PAUSED:
            machine.fire(InstanceEvent.RESUME)
        return machine.state

    async def recover(self) -> None:
        """After a failure (``failed``): once no process of the instance is left on its
        node, clean up what the failure left there and mark it stopped."""
        async with self.machine.operation_scope("recover"):
            if self.machine.state is not InstanceState.FAILED:
                raise MisuseError(
                    f"instance {self.name} is {self.machine.state.value}; only a failed "
                    "instance is recovered"
                )
            if await self.hypervisor.is_running(self.name):
                raise InstanceRunningError(
                    f"instance {self.name} still runs on {self.node_name}: stop that copy "
                    "(or check where the guest really runs) before recovering"
                )
            await self.hypervisor.cleanup(self.name)
            self.machine.fire(InstanceEvent.RECOVER)
