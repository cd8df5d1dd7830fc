"""An instance: its description, where it runs, and its state machine."""

from __future__ import annotations

import anyio

from kvmflow.instance.machine import InstanceMachine
from kvmflow.instance.states import InstanceEvent, InstanceState
from kvmflow.kvm.hypervisor import InstanceInfo, KvmHypervisor
from kvmflow.kvm.params import InstanceSpec


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
        return cls(spec, hypervisor, InstanceState.RUNNING if running else InstanceState.STOPPED)

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
            self.machine.fire(InstanceEvent.STOP)
            try:
                await self.hypervisor.stop(
                    self.name, force=force, timeout=timeout, acpi=self.spec.hvparams.acpi
                )
            finally:
                with anyio.CancelScope(shield=True):
                    still_running = await self.hypervisor.is_running(self.name)
                self.machine.fire(
                    InstanceEvent.STOP_FAILED if still_running else InstanceEvent.STOPPED
                )
