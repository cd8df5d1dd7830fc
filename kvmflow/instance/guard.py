"""Operations held by a lease in the store of record, so that every process sharing the
store sees who acts on an instance, and a second one is refused.

``async with guard.hold(name, "migrate", details) as held:`` takes the instance's lease
(refused at once with :class:`~kvmflow.errors.InstanceBusyError` naming the owner), opens
a journal entry, and at the end closes the entry with its outcome and releases the lease,
shielded. Beside each body runs a keeper task; one keeper at a time (the leader; when it
leaves, the next follower takes over) runs the guard's rounds, every
:data:`CANCEL_POLL_SECONDS`, for all the operations the guard holds, so that a controller
holding a thousand operations makes a few store calls and one wake-up a round. A round:

- renews each lease at a third of its time to live, all in one write. If a lease is lost
  (the store says another owner took it over), its body is cancelled and
  :class:`~kvmflow.errors.LeaseLostError` is raised: a controller that lost its lease must
  not send another command;
- reads the cancel requests (``kvmflow abort`` from any shell); one cancels its body,
  which cleans up as for Ctrl-C, and :class:`~kvmflow.errors.OperationAbortedError` is
  raised;
- writes the bodies' latest progress (:meth:`HeldOperation.report`), each at most once per
  :data:`PROGRESS_EVERY_SECONDS` and at most :data:`PROGRESS_ROWS_PER_SECOND` in all, so
  that other shells can show it without asking QEMU.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio

from kvmflow._logging import get_logger
from kvmflow._taskgroups import exit_task_group
from kvmflow.errors import (
    InstanceBusyError,
    KvmflowError,
    LeaseLostError,
    OperationAbortedError,
    StoreUnavailableError,
)
from kvmflow.fencing import changes_proven_by
from kvmflow.store.base import (
    JournalEntry,
    Lease,
    Owner,
    PlacementChange,
    Store,
    busy_message,
)

_log = get_logger("kvmflow.instance")

#: How often the keeper looks for a cancel request: an abort takes effect within this.
CANCEL_POLL_SECONDS = 0.5
#: The owner's progress reaches the store at most this often per operation...
PROGRESS_EVERY_SECONDS = 1.0
#: ... and a guard writes at most this many progress reports a second in all (a thousand
#: operations in flight report every 5 s each).
PROGRESS_ROWS_PER_SECOND = 200


@dataclass
class HeldOperation:
    """One operation under its lease: record phases and placement through it."""

    store: Store
    lease: Lease
    entry: JournalEntry
    outcome: str = "done"
    lost: LeaseLostError | None = field(default=None)
    unproven: bool = False  # a proof failed for want of the store: later ones do not wait
    aborted: OperationAbortedError | None = field(default=None)
    keep_open: bool = False  # recovery: leave the entry open and the lease in place
    placement: PlacementChange | None = None  # where the close records the instance
    _progress: dict[str, Any] | None = field(default=None, repr=False)
    _renewed_at: float = field(default_factory=time.monotonic, repr=False)
    _reported_at: float = field(default=0.0, repr=False)
    _body: anyio.CancelScope | None = field(default=None, repr=False)

    def report(self, progress: dict[str, Any]) -> None:
        """Keep ``progress`` as the latest; the keeper writes it at a bounded rate."""
        self._progress = progress

    async def phase(self, phase: str, details: dict[str, Any] | None = None) -> None:
        self.entry = await self.store.record_phase(self.lease, self.entry, phase, details or {})

    def place(self, node: str | None) -> None:
        """Say where the instance runs now (``None``: nowhere, it stopped); recorded when
        the operation closes, in the same transaction as its outcome."""
        self.placement = PlacementChange(node)


class OperationGuard:
    """Takes leases for one controller (``owner``) in ``store``."""

    def __init__(self, store: Store, owner: Owner, *, ttl: float = 30.0) -> None:
        self.store = store
        self.owner = owner
        self.ttl = ttl
        self._held: dict[int, HeldOperation] = {}  # by lease token: what the rounds keep
        self._leader: HeldOperation | None = None  # whose keeper runs the rounds now
        self._followers: collections.deque[tuple[HeldOperation, anyio.Event]] = collections.deque()
        #: With a shard of nodes (a cluster of controllers): raises unless the node is ours.
        self.node_check: Callable[[str], None] | None = None
        #: Leases of operations that ended unproven while the store did not answer, to be
        #: left for recovery as soon as it answers again.
        self._unsettled: list[Lease] = []

    def _check_node(self, details: dict[str, Any]) -> None:
        node = details.get("node")
        if self.node_check is not None and isinstance(node, str):
            self.node_check(node)

    def held_operations(self) -> list[HeldOperation]:
        """The operations this guard holds now."""
        return list(self._held.values())

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
        self._check_node(details or {})
        await self._settle_unsettled()
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
        self._check_node(entry.details)
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
                with changes_proven_by(functools.partial(self._prove, held)):
                    yield held
            except BaseException as exc:
                if held.aborted is not None:
                    held.outcome = f"aborted: requested by {held.aborted.requested_by}"
                elif held.outcome == "done":
                    cancelled = isinstance(exc, anyio.get_cancelled_exc_class())
                    held.outcome = "cancelled" if cancelled else f"failed: {exc!r}"
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

    async def _prove(self, held: HeldOperation, step: str) -> None:
        """Fencing before ``step`` (one that changes a QEMU): the store proves the lease
        still holds. While the store does not answer (etcd without quorum), wait up to the
        lease's TTL for it (nobody else can take the lease over meanwhile); then refuse, and
        take later steps of this operation only with a prompt answer."""
        patience = 0.0 if held.unproven else self.ttl
        deadline = time.monotonic() + patience
        waited = False
        while True:
            if held.lost is not None:
                _log.error("fenced: not taking the step", step=step, reason=str(held.lost))
                raise held.lost
            try:
                await self.store.prove(held.lease)
            except StoreUnavailableError as exc:
                if time.monotonic() >= deadline:
                    held.unproven = True
                    _log.error("store unavailable: not taking the step", step=step, error=str(exc))
                    raise
                if not waited:
                    _log.warning("store unavailable: waiting for it before a step", step=step)
                    waited = True
                await anyio.sleep(0.25)
                continue
            except LeaseLostError as exc:
                held.lost = held.lost or exc
                self._stop(held)
                continue
            if waited:
                _log.warning("store answers again: taking the step", step=step)
            return

    async def _keep(self, held: HeldOperation, body: anyio.CancelScope) -> None:
        """Beside one body: lead the rounds while no other keeper does, else wait for a
        turn (no periodic wake-ups for the followers: a thousand operations in flight cost
        one wake-up a round). The leader's round cancels each body that must stop."""
        held._body = body
        self._held[held.lease.token] = held
        try:
            while True:
                if self._leader is None:
                    self._leader = held
                    try:
                        await self._lead()
                    finally:
                        self._leader = None
                        self._hand_over()
                turn = anyio.Event()
                self._followers.append((held, turn))
                await turn.wait()
        finally:
            self._held.pop(held.lease.token, None)

    async def _lead(self) -> None:
        while True:
            await anyio.sleep(self._poll)
            try:
                with anyio.CancelScope(shield=True):  # a round runs whole, even for its leader
                    await self._round()
            except KvmflowError as exc:  # the store hiccuped: the next round tries again
                _log.warning("lease keeper could not reach the store", error=str(exc))

    def _hand_over(self) -> None:
        """The leader is leaving: wake the next follower still held."""
        while self._followers:
            follower, turn = self._followers.popleft()
            if follower.lease.token in self._held and follower is not self._leader:
                turn.set()
                return

    def _stop(self, op: HeldOperation) -> None:
        """Cancel the body of ``op`` (its lease was lost, or a cancel was asked)."""
        if op.lost is not None:
            _log.error("lease lost; stopping the operation", instance=op.lease.instance)
        elif op.aborted is not None:
            _log.warning(
                "cancel requested through the store",
                instance=op.lease.instance,
                requested_by=op.aborted.requested_by,
            )
        if op._body is not None:
            op._body.cancel()

    @property
    def _poll(self) -> float:
        return min(self.ttl / 3, CANCEL_POLL_SECONDS)

    async def _round(self) -> None:
        """One round for every held operation: one read of the cancel requests, one write
        renewing the leases due, one write of the progress reported since."""
        now = time.monotonic()
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
                self._stop(op)
        due = [op for op in held if now - op._renewed_at >= self.ttl / 3]
        if due:
            renewed, lost = await self.store.renew_all([op.lease for op in due], self.ttl)
            by_token = {op.lease.token: op for op in due}
            for lease in renewed:
                by_token[lease.token].lease, by_token[lease.token]._renewed_at = lease, now
            for lease, exc in lost:
                if lease.token not in self._held:
                    continue  # it ended (and released its lease) while the store answered
                by_token[lease.token].lost = exc
                self._stop(by_token[lease.token])
        every = max(PROGRESS_EVERY_SECONDS, len(held) / PROGRESS_ROWS_PER_SECOND)
        reports = [op for op in held if op._progress is not None and now - op._reported_at >= every]
        if reports:
            batch = [(op.lease, op.entry, op._progress or {}) for op in reports]
            for op in reports:
                op._progress, op._reported_at = None, now
            await self.store.record_progress(batch)

    async def _settle_unsettled(self) -> None:
        """Leave for recovery the operations that ended while the store did not answer."""
        while self._unsettled:
            await self.store.abandon(self._unsettled[0])
            self._unsettled.pop(0)

    async def _close(self, held: HeldOperation) -> None:
        if held.lost is not None:
            return  # not ours any more: the new owner (recovery) closes the entry
        if held.unproven:  # a step was refused for want of the store: what it would have
            held.keep_open = True  # undone may still be there, so recovery must judge it
        if held.keep_open:  # left for recovery or the operator: the entry stays open, and
            try:  # the lease stays too, but expired, so that only recovery takes it over
                await self.store.abandon(held.lease)
            except KvmflowError as exc:
                _log.error("could not leave the lease for recovery", error=str(exc))
                if held.unproven:
                    self._unsettled.append(held.lease)
            return
        try:
            await self.store.finish(
                held.lease, held.entry, held.outcome, placement=held.placement, release=True
            )
        except KvmflowError as exc:
            _log.error("could not close the operation in the store", error=str(exc))
