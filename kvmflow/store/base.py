"""The store of record: where each instance runs, who acts on it, and what was done.

Three kinds of record, behind one small interface (:class:`Store`) so that a cluster of
controllers can keep them in etcd and one host in SQLite:

- a **lease** per instance being operated on: its owner (controller, host, pid), the
  operation, an expiry the owner renews, and a **fencing token** that only grows. Every
  write below proves the writer's lease still holds (same token, not expired) in the same
  transaction, so a controller that lost its lease (a long pause, a partition) changes
  nothing any more (:class:`~kvmflow.errors.LeaseLostError`);
- the **placement** of each instance (the node it runs on);
- the **journal**: one entry per operation, its intent written before acting and every
  phase after it, closed with its outcome; recovery reads the entries left open.

A lease whose owner is gone (expired, or its process dead on the same host) blocks plain
operations all the same: only recovery (``take_over=True``) may take it over.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import psutil

if TYPE_CHECKING:
    from kvmflow.errors import LeaseLostError


@dataclass(frozen=True)
class Owner:
    """Who holds a lease: a controller's id, the host and the process (with its start time,
    so that a reused pid is not mistaken for the owner)."""

    controller: str
    host: str
    pid: int
    pid_started: float

    @classmethod
    def this_process(cls, controller: str = "kvmflow") -> Owner:
        me = psutil.Process(os.getpid())
        return cls(controller, socket.gethostname(), me.pid, me.create_time())

    def alive(self) -> bool | None:
        """Whether the owner process still runs; ``None`` when it is on another host (only
        its lease's expiry can tell then)."""
        if self.host != socket.gethostname():
            return None
        try:
            return bool(abs(psutil.Process(self.pid).create_time() - self.pid_started) < 1.0)
        except psutil.NoSuchProcess:
            return False

    def __str__(self) -> str:
        return f"{self.controller} (pid {self.pid} on {self.host})"


@dataclass(frozen=True)
class Lease:
    """The right to operate on one instance, until ``expires_at`` (seconds since the epoch)."""

    instance: str
    owner: Owner
    operation: str
    token: int
    expires_at: float


@dataclass(frozen=True)
class Placement:
    """Where the store says an instance runs, written under the lease ``token``."""

    instance: str
    node: str
    token: int
    updated_at: float


@dataclass(frozen=True)
class Fence:
    """A node made certainly down at ``at`` (time.time()): power-cycled, or stated down by an
    operator; failover trusts it for placements older than that."""

    node: str
    at: float
    by: str
    how: str  # "powercycle" or "stated-down"


@dataclass(frozen=True)
class PlacementChange:
    """Where an operation leaves its instance, recorded as it closes: on ``node``, or
    nowhere (``None``: it stopped)."""

    node: str | None


@dataclass(frozen=True)
class JournalEntry:
    """One operation: what it meant to do, how far it got, how it ended."""

    id: int
    instance: str
    operation: str
    owner: Owner
    token: int
    started_at: float
    phase: str
    details: dict[str, Any] = field(default_factory=dict)
    updated_at: float = 0.0
    finished_at: float | None = None
    outcome: str | None = None
    progress: dict[str, Any] | None = None  # the owner's latest report, at a bounded rate

    @property
    def open(self) -> bool:
        return self.finished_at is None


def busy_message(held: Lease, now: float) -> str:
    """Why an operation on ``held.instance`` is refused: who holds it, and for how long."""
    gone = held.expires_at <= now or held.owner.alive() is False
    if not gone:
        state = f"its lease runs {held.expires_at - now:.0f} s more"
    elif held.expires_at <= now:
        state = (
            f"its lease expired {now - held.expires_at:.0f} s ago; only recovery may take it over"
        )
    else:
        state = "its owner process is gone; only recovery may take it over"
    return (
        f"instance {held.instance} is busy with {held.operation!r} by {held.owner} "
        f"(token {held.token}): {state}"
    )


class Store(Protocol):
    """What kvmflow needs of a store of record (SQLite here; etcd for a cluster)."""

    async def acquire(
        self,
        instance: str,
        owner: Owner,
        operation: str,
        ttl: float,
        *,
        take_over: bool = False,
    ) -> Lease:
        """A lease on ``instance``, or :class:`~kvmflow.errors.InstanceBusyError` naming
        whoever holds it. ``take_over`` (recovery only) replaces a lease whose owner is
        gone."""
        ...

    async def prove(self, lease: Lease) -> None:
        """Fencing before a step that changes a QEMU: ``lease`` still holds (our token,
        not expired), or :class:`~kvmflow.errors.LeaseLostError`; nothing is written."""
        ...

    async def renew(self, lease: Lease, ttl: float) -> Lease:
        """Extend ``lease``; :class:`~kvmflow.errors.LeaseLostError` if it is no longer ours."""
        ...

    async def renew_all(
        self, leases: list[Lease], ttl: float
    ) -> tuple[list[Lease], list[tuple[Lease, LeaseLostError]]]:
        """Extend many leases in one write: those renewed, and each other one with why it
        was lost (a controller holding a thousand operations renews them all at once)."""
        ...

    async def abandon(self, lease: Lease) -> None:
        """Leave ``lease`` for recovery: it stays (plain operations are refused) but expired
        now, so that any recovery, also one of this process, may take it over."""
        ...

    async def release(self, lease: Lease) -> None:
        """Give the lease up (nothing happens if it was already taken over)."""
        ...

    async def record_fence(self, node: str, by: str, how: str) -> Fence:
        """Note that ``node`` was fenced now (no lease: it concerns a node, not an instance)."""
        ...

    async def fence(self, node: str) -> Fence | None:
        """The latest fence of ``node``, if any."""
        ...

    async def leases(self) -> list[Lease]:
        """Every lease held now (expired or not), by instance name."""
        ...

    async def holder(self, instance: str) -> Lease | None:
        """The lease on ``instance`` now, if any (expired or not)."""
        ...

    async def placement(self, instance: str) -> Placement | None: ...

    async def placements(self) -> list[Placement]:
        """Every recorded placement, by instance name."""
        ...

    async def record_placement(self, lease: Lease, node: str) -> Placement:
        """Say that the lease's instance runs on ``node`` (fenced by the lease)."""
        ...

    async def forget_placement(self, lease: Lease) -> None:
        """The lease's instance runs nowhere (stopped), fenced by the lease."""
        ...

    async def begin(self, lease: Lease, phase: str, details: dict[str, Any]) -> JournalEntry:
        """Open a journal entry for the lease's operation, before anything is done."""
        ...

    async def record_phase(
        self, lease: Lease, entry: JournalEntry, phase: str, details: dict[str, Any]
    ) -> JournalEntry:
        """Move an open entry to ``phase`` (``details`` are merged in), fenced."""
        ...

    async def finish(
        self,
        lease: Lease,
        entry: JournalEntry,
        outcome: str,
        *,
        placement: PlacementChange | None = None,
        release: bool = False,
    ) -> JournalEntry:
        """Close an entry with its outcome, fenced; in the same transaction record the
        ``placement`` it leaves and, with ``release``, give the lease up (one commit where
        three would do, at the end of every operation)."""
        ...

    async def record_progress(
        self, reports: list[tuple[Lease, JournalEntry, dict[str, Any]]]
    ) -> None:
        """Replace each open entry's latest progress, all in one write (the owner writes at
        a bounded rate, so that ``kvmflow jobs`` in any shell can show it). A report whose
        lease no longer holds is dropped."""
        ...

    async def request_cancel(self, instance: str, requested_by: str) -> Lease:
        """Ask whoever holds ``instance``'s lease to cancel its operation (no lease needed:
        any shell may ask); returns the lease asked. :class:`~kvmflow.errors.NothingToAbortError`
        when no operation holds it."""
        ...

    async def cancel_requests(self) -> dict[tuple[str, int], str]:
        """Every cancel request standing: (instance, lease token) -> who asked."""
        ...

    async def unfinished(self) -> list[JournalEntry]:
        """Every entry still open, oldest first (what recovery must look at)."""
        ...

    async def history(self, instance: str, limit: int = 20) -> list[JournalEntry]:
        """The newest ``limit`` entries of ``instance``, oldest first."""
        ...

    async def aclose(self) -> None: ...
