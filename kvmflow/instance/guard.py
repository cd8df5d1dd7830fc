"""Operations held by a lease in the store of record, so that every process sharing the
store sees who acts on an instance, and a second one is refused.

``async with guard.hold(name, "migrate", details) as held:`` takes the instance's lease
(refused at once with :class:`~kvmflow.errors.InstanceBusyError` naming the owner), opens
a journal entry, renews the lease in the background at a third of its time to live, and at
the end closes the entry with its outcome and releases the lease, shielded. If the lease is
lost while the body runs (the store says another owner took it over), the body is
cancelled and :class:`~kvmflow.errors.LeaseLostError` is raised: a controller that lost its
lease must not send another command.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import structlog

from kvmflow._taskgroups import exit_task_group
from kvmflow.errors import KvmflowError, LeaseLostError
from kvmflow.store.base import JournalEntry, Lease, Owner, Placement, Store

_log = structlog.get_logger("kvmflow.instance")


@dataclass
class HeldOperation:
    """One operation under its lease: record phases and placement through it."""

    store: Store
    lease: Lease
    entry: JournalEntry
    outcome: str = "done"
    lost: LeaseLostError | None = field(default=None)

    async def phase(self, phase: str, details: dict[str, Any] | None = None) -> None:
        self.entry = await self.store.record_phase(self.lease, self.entry, phase, details or {})

    async def place(self, node: str | None) -> Placement | None:
        """Record where the instance runs now (``None``: nowhere, it stopped)."""
        if node is None:
            await self.store.forget_placement(self.lease)
            return None
        return await self.store.record_placement(self.lease, node)


class OperationGuard:
    """Takes leases for one controller (``owner``) in ``store``."""

    def __init__(self, store: Store, owner: Owner, *, ttl: float = 30.0) -> None:
        self.store = store
        self.owner = owner
        self.ttl = ttl

    @contextlib.asynccontextmanager
    async def hold(
        self,
        instance: str,
        operation: str,
        details: dict[str, Any] | None = None,
        *,
        take_over: bool = False,
    ) -> AsyncIterator[HeldOperation]:
        lease = await self.store.acquire(
            instance, self.owner, operation, self.ttl, take_over=take_over
        )
        try:
            entry = await self.store.begin(lease, "intent", details or {})
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.store.release(lease)
            raise
        held = HeldOperation(self.store, lease, entry)
        # The renewer runs beside the body in a task group entered by hand, so that the
        # body's own exception reaches the caller as it is (not in an ExceptionGroup).
        renewer = anyio.create_task_group()
        await renewer.__aenter__()
        renewer.start_soon(self._renew, held, renewer.cancel_scope)
        try:
            try:
                yield held
            except BaseException as exc:
                held.outcome = f"failed: {exc!r}" if held.outcome == "done" else held.outcome
                renewer.cancel_scope.cancel()
                absorbed = await exit_task_group(renewer, type(exc), exc, exc.__traceback__)
                if held.lost is not None:
                    raise held.lost from None  # the renewer cancelled the body: say why
                if not absorbed:
                    raise
            else:
                renewer.cancel_scope.cancel()
                await exit_task_group(renewer, None, None, None)
        finally:
            with anyio.CancelScope(shield=True):
                await self._close(held)
        if held.lost is not None:
            raise held.lost

    async def _renew(self, held: HeldOperation, body: anyio.CancelScope) -> None:
        while True:
            await anyio.sleep(self.ttl / 3)
            try:
                held.lease = await self.store.renew(held.lease, self.ttl)
            except LeaseLostError as exc:
                _log.error("lease lost; stopping the operation", instance=held.lease.instance)
                held.lost = exc
                body.cancel()
                return

    async def _close(self, held: HeldOperation) -> None:
        if held.lost is not None:
            return  # not ours any more: the new owner (recovery) closes the entry
        try:
            await self.store.finish(held.lease, held.entry, held.outcome)
            await self.store.release(held.lease)
        except KvmflowError as exc:
            _log.error("could not close the operation in the store", error=str(exc))
