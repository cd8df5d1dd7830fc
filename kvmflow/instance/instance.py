"""An instance: its description, where it runs, and its state machine."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import anyio

from kvmflow.errors import InstanceRunningError, KvmflowError, MisuseError
from kvmflow.instance.guard import HeldOperation, OperationGuard
from kvmflow.instance.machine import InstanceMachine
from kvmflow.instance.states import InstanceEvent, InstanceState
from kvmflow.kvm.hypervisor import InstanceInfo, KvmHypervisor
from kvmflow.kvm.spec import InstanceSpec
from kvmflow.monitor.queries import RunState, query_status


class Instance:
    """One instance bound to the hypervisor (node) it runs on.

    Lifecycle operations go through the state machine and take the instance's single
    operation slot, so two operations never interleave. With a ``guard`` they also hold the
    instance's lease in the store of record (refused when any process sharing the store
    operates on it), journal their intent and outcome, and record the placement.
    """

    def __init__(
        self,
        spec: InstanceSpec,
        hypervisor: KvmHypervisor,
        state: InstanceState = InstanceState.DEFINED,
        *,
        guard: OperationGuard | None = None,
    ) -> None:
        self.spec = spec
        self.hypervisor = hypervisor
        self.machine = InstanceMachine(spec.name, hypervisor.node.name, state)
        self.guard = guard

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

    @contextlib.asynccontextmanager
    async def operation(
        self, name: str, details: dict[str, Any] | None = None, *, take_over: bool = False
    ) -> AsyncIterator[HeldOperation | None]:
        """Own the instance for one operation: its in-process slot and, with a guard, its
        lease in the store (the held operation journals and places; None without a guard).
        ``take_over`` is for recovery: it replaces a lease whose owner is gone."""
        async with self.machine.operation_scope(name):
            if self.guard is None:
                yield None
                return
            async with self.guard.hold(
                self.name, name, {"node": self.node_name, **(details or {})}, take_over=take_over
            ) as held:
                yield held

    async def start(self, *, peers: Sequence[KvmHypervisor] = ()) -> InstanceInfo:
        """Start the instance on its node. Refused (nothing started) when a QEMU of it
        runs on any of ``peers`` (every other node known: reality first) or, with a guard,
        when the store records it on another node."""
        async with self.operation("start") as held:
            for peer in peers:
                pid = await peer.find_pid(self.name)
                if pid is not None and peer is not self.hypervisor:
                    raise InstanceRunningError(
                        f"instance {self.name} already runs on {peer.node.name} (pid {pid}); "
                        f"a second copy is not started on {self.node_name}"
                    )
            if held is not None:
                placed = await held.store.placement(self.name)
                if placed is not None and placed.node != self.node_name:
                    raise InstanceRunningError(
                        f"instance {self.name} runs on {placed.node} by the store's record "
                        f"(token {placed.token}); it is not started again on {self.node_name}"
                    )
            self.machine.fire(InstanceEvent.START)
            try:
                info = await self.hypervisor.start(self.spec)
            except BaseException:
                self.machine.fire(InstanceEvent.START_FAILED)
                raise
            self.machine.fire(InstanceEvent.STARTED)
            if held is not None:
                held.place(self.node_name)
            return info

    async def reboot(self, *, force: bool = False, timeout: float = 30.0) -> InstanceInfo:
        """Stop the instance and start it again with the same hardware, on the same node,
        as one operation (so that nothing can come in between)."""
        async with self.operation("reboot") as held:
            self.machine.fire(InstanceEvent.STOP)
            try:
                info = await self.hypervisor.reboot(self.spec, force=force, timeout=timeout)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    running = await self.hypervisor.is_running(self.name)
                    if running:
                        self.machine.fire(InstanceEvent.STOP_FAILED)
                    else:
                        self.machine.fire(InstanceEvent.STOPPED)
                        if held is not None:
                            held.place(None)
                raise
            for event in (InstanceEvent.STOPPED, InstanceEvent.START, InstanceEvent.STARTED):
                self.machine.fire(event)
            if held is not None:
                held.place(self.node_name)
            return info

    async def stop(self, *, force: bool = False, timeout: float = 30.0) -> None:
        async with self.operation("stop") as held:
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
                    if held is not None:
                        held.place(None)
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
        async with self.operation(event.value):
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
        async with self.operation("recover", take_over=True):
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
