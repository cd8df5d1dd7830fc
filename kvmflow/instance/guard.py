"""Operations held by a lease in the store of record, so that every process sharing the
store sees who acts on an instance, and a second one is refused.

``async with guard.hold(name, "migrate", details) as held:`` takes the instance's lease
(refused at once with :class:`~kvmflow.errors.InstanceBusyError` naming the owner), opens
a journal entry, and at the end closes the entry with its outcome and releases the lease,
shielded. Beside the body a keeper task takes part in the guard's rounds (every
:data:`CANCEL_POLL_SECONDS`, one round for all the operations the guard holds, done by
whichever keeper comes first, so that a controller holding a thousand operations makes a
few store calls a round, not a thousand):

- renews the lease at a third of its time to live. If the lease is lost (the store says
  another owner took it over), the body is cancelled and
  :class:`~kvmflow.errors.LeaseLostError` is raised: a controller that lost its lease must
  not send another command;
- looks for a cancel request (``kvmflow abort`` from any shell) every
  :data:`CANCEL_POLL_SECONDS`; one cancels the body, which cleans up as for Ctrl-C, and
  :class:`~kvmflow.errors.OperationAbortedError` is raised;
- writes the body's latest progress (:meth:`HeldOperation.report`) at most once per
  :data:`PROGRESS_EVERY_SECONDS`, so that other shells can show it without asking QEMU.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import structlog

from kvmflow._taskgroups import exit_task_group
from kvmflow.errors import InstanceBusyError, KvmflowError, LeaseLostError, OperationAbortedError
from kvmflow.store.base import JournalEntry, Lease, Owner, Placement, Store, busy_message

_log = structlog.get_logger("kvmflow.instance")

#: How often the keeper looks for a cancel request: an abort takes effect within this.
CANCEL_POLL_SECONDS = 0.5
#: The owner's progress reaches the store at most this often.
PROGRESS_EVERY_SECONDS = 1.0


@dataclass
class HeldOperation:
    """One operation under its lease: record phases and placement through it."""

    store: Store
    lease: Lease
    entry: JournalEntry
    outcome: str = "done"
    lost: LeaseLostError | None = field(default=None)
    aborted: OperationAbortedError | None = field(default=None)
    keep_open: bool = False  # recovery: leave the entry open and the lease in place
    _progress: dict[str, Any] | None = field(default=None, repr=False)
    _renewed_at: float = field(default_factory=time.monotonic, repr=False)
    _reported_at: float = field(default=0.0, repr=False)

    def report(self, progress: dict[str, Any]) -> None:
        """Keep ``progress`` as the latest; the keeper writes it at a bounded rate."""
        self._progress = progress

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
        self._held: dict[int, HeldOperation] = {}  # by lease token: what the rounds keep
        self._round_lock = anyio.Lock()
        self._last_round = 0.0

    async def check_free(self, instance: str) -> None:
        """Refuse at once (:class:`InstanceBusyError` naming the holder) if any process
        holds ``instance``: for callers that must open something before :meth:`hold`."""
        held = await self.store.holder(instance)
        if held is not None:
            raise InstanceBusyError(busy_message(held, time.time()), holder=held)

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
        async with self._kept(HeldOperation(self.store, lease, entry)) as held:
            yield held

    @contextlib.asynccontextmanager
    async def resume(self, entry: JournalEntry) -> AsyncIterator[HeldOperation]:
        """Recovery's hold: take over the lease of an entry whose owner is gone and carry
        on with that entry (its phases go on; it is closed with the outcome at the end).
        ``held.keep_open = True`` leaves the entry open and the lease in place (for the
        operator: something recovery must not touch)."""
        lease = await self.store.acquire(
            entry.instance, self.owner, entry.operation, self.ttl, take_over=True
        )
        async with self._kept(HeldOperation(self.store, lease, entry)) as held:
            yield held

    @contextlib.asynccontextmanager
    async def _kept(self, held: HeldOperation) -> AsyncIterator[HeldOperation]:
        """Run the body with the keeper beside it; close the entry and release the lease."""
        # The renewer runs beside the body in a task group entered by hand, so that the
        # body's own exception reaches the caller as it is (not in an ExceptionGroup).
        renewer = anyio.create_task_group()
        await renewer.__aenter__()
        renewer.start_soon(self._keep, held, renewer.cancel_scope)
        try:
            try:
                yield held
            except BaseException as exc:
                if held.aborted is not None:
                    held.outcome = f"aborted: requested by {held.aborted.requested_by}"
                elif held.outcome == "done":
                    held.outcome = f"failed: {exc!r}"
                renewer.cancel_scope.cancel()
                absorbed = await exit_task_group(renewer, type(exc), exc, exc.__traceback__)
                # The keeper cancelled the body: say why.
                if held.lost is not None:
                    raise held.lost from None
                if held.aborted is not None and isinstance(exc, anyio.get_cancelled_exc_class()):
                    raise held.aborted from None
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

    async def _keep(self, held: HeldOperation, body: anyio.CancelScope) -> None:
        """Take part in the rounds until one says the body must stop (see the module)."""
        poll = self._poll
        self._held[held.lease.token] = held
        try:
            while held.lost is None and held.aborted is None:
                await anyio.sleep(poll)
                try:
                    await self._round()
                except KvmflowError as exc:  # the store hiccuped: the next round tries again
                    _log.warning("lease keeper could not reach the store", error=str(exc))
            if held.lost is not None:
                _log.error("lease lost; stopping the operation", instance=held.lease.instance)
            else:
                _log.warning(
                    "cancel requested through the store",
                    instance=held.lease.instance,
                    requested_by=held.aborted.requested_by if held.aborted else None,
                )
            body.cancel()
        finally:
            self._held.pop(held.lease.token, None)

    @property
    def _poll(self) -> float:
        return min(self.ttl / 3, CANCEL_POLL_SECONDS)

    async def _round(self) -> None:
        """One round for every held operation: one read of the cancel requests, one write
        renewing the leases due, one write of the progress reported since."""
        async with self._round_lock:
            now = time.monotonic()
            if now - self._last_round < self._poll * 0.9:
                return  # another keeper did this round
            self._last_round = now
            held = list(self._held.values())
            requests = await self.store.cancel_requests()
            for op in held:
                requester = requests.get((op.lease.instance, op.lease.token))
                if requester is not None and op.aborted is None:
                    op.aborted = OperationAbortedError(
                        f"{op.lease.operation} of {op.lease.instance} was aborted on request "
                        f"by {requester}; it was cleaned up as for a cancel",
                        requested_by=requester,
                    )
            due = [op for op in held if now - op._renewed_at >= self.ttl / 3]
            if due:
                renewed, lost = await self.store.renew_all([op.lease for op in due], self.ttl)
                by_token = {op.lease.token: op for op in due}
                for lease in renewed:
                    by_token[lease.token].lease, by_token[lease.token]._renewed_at = lease, now
                for lease, exc in lost:
                    by_token[lease.token].lost = exc
            reports = [
                op
                for op in held
                if op._progress is not None and now - op._reported_at >= PROGRESS_EVERY_SECONDS
            ]
            if reports:
                batch = [(op.lease, op.entry, op._progress or {}) for op in reports]
                for op in reports:
                    op._progress, op._reported_at = None, now
                await self.store.record_progress(batch)

    async def _close(self, held: HeldOperation) -> None:
        if held.lost is not None:
            return  # not ours any more: the new owner (recovery) closes the entry
        if held.keep_open:
            return  # left for the operator; the lease (soon stale) still blocks others
        try:
            await self.store.finish(held.lease, held.entry, held.outcome)
            await self.store.release(held.lease)
        except KvmflowError as exc:
            _log.error("could not close the operation in the store", error=str(exc))
