"""The store of record in one SQLite file, shared by every kvmflow process on a host.

The file is in WAL mode (readers never block the writer) with ``synchronous=FULL``: the
journal is written *before* kvmflow acts, to stop two copies of a guest after a crash, so a
committed write must survive a power loss too, and NORMAL can lose the last commits then.
Every write first proves the writer's lease (fencing) in its own transaction, or its own
savepoint of a group commit (:mod:`kvmflow.store.commit`: one worker thread, many writes per
``fsync``). The schema is versioned and migrated on open (:mod:`kvmflow.store.schema`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import anyio.to_thread

from kvmflow.errors import InstanceBusyError, LeaseLostError, NothingToAbortError, StoreError
from kvmflow.store.base import (
    Fence,
    JournalEntry,
    Lease,
    Owner,
    Placement,
    PlacementChange,
    busy_message,
)
from kvmflow.store.commit import GroupCommitter
from kvmflow.store.schema import DEFAULT_PATH, connect, translated


class SQLiteStore(GroupCommitter):
    """A :class:`~kvmflow.store.base.Store` in the SQLite file at ``path``; use
    ``async with await SQLiteStore.open(path) as store:``."""

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    async def open(cls, path: str | os.PathLike[str] = DEFAULT_PATH) -> SQLiteStore:
        """Open (creating, or migrating to the current schema) the store at ``path``."""
        text = os.fspath(path)
        connection = await anyio.to_thread.run_sync(connect, text)
        return cls(text, connection)

    async def aclose(self) -> None:
        await self._run(self._db.close)

    async def __aenter__(self) -> SQLiteStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @contextmanager
    def _fenced(self, lease: Lease) -> Iterator[sqlite3.Connection]:
        """A write transaction that first proves ``lease`` still holds (fencing)."""
        with self._write() as db:
            _prove(db, lease, self.path)
            yield db

    # --------------------------------------------------------------------- leases

    async def acquire(
        self, instance: str, owner: Owner, operation: str, ttl: float, *, take_over: bool = False
    ) -> Lease:
        def acquire() -> Lease:
            now = time.time()
            with self._write() as db:
                held = _lease_row(db, instance)
                if held is not None:
                    gone = held.expires_at <= now or held.owner.alive() is False
                    if not (take_over and gone):
                        raise InstanceBusyError(busy_message(held, now), holder=held)
                token = _next_token(db)
                lease = Lease(instance, owner, operation, token, now + ttl)
                db.execute(
                    "INSERT OR REPLACE INTO leases VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (instance, *_owner_row(owner), operation, token, lease.expires_at),
                )
                return lease

        return await self._batched(acquire)

    async def prove(self, lease: Lease) -> None:
        def prove() -> None:
            with translated(self.path):
                _prove(self._db, lease, self.path)

        await self._run(prove)

    async def renew(self, lease: Lease, ttl: float) -> Lease:
        def renew() -> Lease:
            with self._fenced(lease) as db:
                renewed = Lease(
                    lease.instance, lease.owner, lease.operation, lease.token, time.time() + ttl
                )
                db.execute(
                    "UPDATE leases SET expires_at = ? WHERE instance = ? AND token = ?",
                    (renewed.expires_at, lease.instance, lease.token),
                )
                return renewed

        return await self._batched(renew)

    async def renew_all(
        self, leases: list[Lease], ttl: float
    ) -> tuple[list[Lease], list[tuple[Lease, LeaseLostError]]]:
        def renew() -> tuple[list[Lease], list[tuple[Lease, LeaseLostError]]]:
            renewed, lost = [], []
            expires_at = time.time() + ttl
            with self._write() as db:
                for lease in leases:
                    try:
                        _prove(db, lease, self.path)
                    except LeaseLostError as exc:
                        lost.append((lease, exc))
                        continue
                    db.execute(
                        "UPDATE leases SET expires_at = ? WHERE instance = ? AND token = ?",
                        (expires_at, lease.instance, lease.token),
                    )
                    renewed.append(dataclasses.replace(lease, expires_at=expires_at))
            return renewed, lost

        return await self._batched(renew)

    async def abandon(self, lease: Lease) -> None:
        def abandon() -> None:
            with self._write() as db:
                db.execute(
                    "UPDATE leases SET expires_at = ? WHERE instance = ? AND token = ?",
                    (time.time(), lease.instance, lease.token),
                )

        await self._batched(abandon)

    async def release(self, lease: Lease) -> None:
        def release() -> None:
            with self._write() as db:
                _release(db, lease)

        await self._batched(release)

    async def request_cancel(self, instance: str, requested_by: str) -> Lease:
        def request() -> Lease:
            with self._write() as db:
                held = _lease_row(db, instance)
                if held is None:
                    raise NothingToAbortError(
                        f"no operation holds {instance} now: there is nothing to abort"
                    )
                db.execute(
                    "INSERT OR REPLACE INTO cancel_requests VALUES (?, ?, ?, ?)",
                    (instance, held.token, requested_by, time.time()),
                )
                return held

        return await self._batched(request)

    async def cancel_requests(self) -> dict[tuple[str, int], str]:
        rows = await self._query("SELECT instance, token, requested_by FROM cancel_requests")
        return {(row[0], row[1]): str(row[2]) for row in rows}

    async def record_fence(self, node: str, by: str, how: str) -> Fence:
        def record() -> Fence:
            fence = Fence(node, time.time(), by, how)
            with self._write() as db:
                db.execute(
                    "INSERT OR REPLACE INTO fences VALUES (?, ?, ?, ?)",
                    (node, fence.at, by, how),
                )
            return fence

        return await self._batched(record)

    async def fence(self, node: str) -> Fence | None:
        rows = await self._query("SELECT node, at, by, how FROM fences WHERE node = ?", (node,))
        return Fence(*rows[0]) if rows else None

    async def leases(self) -> list[Lease]:
        return [_lease(row) for row in await self._query(f"{_LEASES} ORDER BY instance")]

    async def holder(self, instance: str) -> Lease | None:
        rows = await self._query(f"{_LEASES} WHERE instance = ?", (instance,))
        return _lease(rows[0]) if rows else None

    # ------------------------------------------------------------------ placement

    async def placement(self, instance: str) -> Placement | None:
        rows = await self._query(f"{_PLACEMENTS} WHERE instance = ?", (instance,))
        return Placement(*rows[0]) if rows else None

    async def placements(self) -> list[Placement]:
        return [Placement(*row) for row in await self._query(f"{_PLACEMENTS} ORDER BY instance")]

    async def record_placement(self, lease: Lease, node: str) -> Placement:
        def record() -> Placement:
            with self._fenced(lease) as db:
                placement = Placement(lease.instance, node, lease.token, time.time())
                _place(db, lease, node, placement.updated_at)
                return placement

        return await self._batched(record)

    async def forget_placement(self, lease: Lease) -> None:
        def forget() -> None:
            with self._fenced(lease) as db:
                _place(db, lease, None, time.time())

        await self._batched(forget)

    # -------------------------------------------------------------------- journal

    async def begin(self, lease: Lease, phase: str, details: dict[str, Any]) -> JournalEntry:
        def begin() -> JournalEntry:
            now = time.time()
            with self._fenced(lease) as db:
                cursor = db.execute(
                    "INSERT INTO journal (instance, operation, controller, host, pid,"
                    " pid_started, token, started_at, phase, details, updated_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        lease.instance,
                        lease.operation,
                        *_owner_row(lease.owner),
                        lease.token,
                        now,
                        phase,
                        _json(details),
                        now,
                    ),
                )
                entry_id = cursor.lastrowid
                assert entry_id is not None
                return JournalEntry(
                    entry_id,
                    lease.instance,
                    lease.operation,
                    lease.owner,
                    lease.token,
                    now,
                    phase,
                    dict(details),
                    now,
                )

        return await self._batched(begin)

    async def record_phase(
        self, lease: Lease, entry: JournalEntry, phase: str, details: dict[str, Any]
    ) -> JournalEntry:
        def record() -> JournalEntry:
            merged = {**entry.details, **details}
            now = time.time()
            with self._fenced(lease) as db:
                _update_open(
                    db,
                    entry,
                    self.path,
                    "phase = ?, details = ?, updated_at = ?",
                    (phase, _json(merged), now),
                )
            return _replace(entry, phase=phase, details=merged, updated_at=now)

        return await self._batched(record)

    async def finish(
        self,
        lease: Lease,
        entry: JournalEntry,
        outcome: str,
        *,
        placement: PlacementChange | None = None,
        release: bool = False,
    ) -> JournalEntry:
        def finish() -> JournalEntry:
            now = time.time()
            with self._fenced(lease) as db:
                _update_open(
                    db,
                    entry,
                    self.path,
                    "finished_at = ?, outcome = ?, updated_at = ?",
                    (now, outcome, now),
                )
                if placement is not None:
                    _place(db, lease, placement.node, now)
                if release:
                    _release(db, lease)
            return _replace(entry, finished_at=now, outcome=outcome, updated_at=now)

        return await self._batched(finish)

    async def record_progress(
        self, reports: list[tuple[Lease, JournalEntry, dict[str, Any]]]
    ) -> None:
        def record() -> None:
            rows = [
                (_json(progress), entry.id, lease.instance, lease.token, time.time())
                for lease, entry, progress in reports
            ]
            with self._write() as db:  # a report whose lease no longer holds is dropped
                db.executemany(
                    "UPDATE journal SET progress = ? WHERE id = ? AND finished_at IS NULL"
                    " AND EXISTS (SELECT 1 FROM leases WHERE instance = ? AND token = ?"
                    " AND expires_at > ?)",
                    rows,
                )

        await self._batched(record)

    async def unfinished(self) -> list[JournalEntry]:
        rows = await self._query("SELECT * FROM journal WHERE finished_at IS NULL ORDER BY id")
        return [_entry(row) for row in rows]

    async def history(self, instance: str, limit: int = 20) -> list[JournalEntry]:
        rows = await self._query(
            "SELECT * FROM journal WHERE instance = ? ORDER BY id DESC LIMIT ?", (instance, limit)
        )
        return [_entry(row) for row in reversed(rows)]


# ----------------------------------------------------------------------------- helpers


def _next_token(db: sqlite3.Connection) -> int:
    db.execute("UPDATE meta SET value = value + 1 WHERE key = 'fencing_token'")
    row = db.execute("SELECT value FROM meta WHERE key = 'fencing_token'").fetchone()
    return int(row[0])


def _owner_row(owner: Owner) -> tuple[str, str, int, float]:
    return (owner.controller, owner.host, owner.pid, owner.pid_started)


#: The columns a Lease or a Placement is made of, in order.
_LEASES = (
    "SELECT instance, controller, host, pid, pid_started, operation, token, expires_at FROM leases"
)
_PLACEMENTS = "SELECT instance, node, token, updated_at FROM placement"


def _lease(row: tuple[Any, ...]) -> Lease:
    return Lease(row[0], Owner(row[1], row[2], row[3], row[4]), row[5], row[6], row[7])


def _lease_row(db: sqlite3.Connection, instance: str) -> Lease | None:
    """The lease on ``instance`` inside a transaction of the caller."""
    row = db.execute(f"{_LEASES} WHERE instance = ?", (instance,)).fetchone()
    return _lease(row) if row else None


def _prove(db: sqlite3.Connection, lease: Lease, path: str) -> None:
    """Fencing: the lease must still be the instance's, with our token, and unexpired."""
    held = _lease_row(db, lease.instance)
    if held is None or held.token != lease.token:
        now_held = f"now held by {held.owner} (token {held.token})" if held else "released"
        raise LeaseLostError(
            f"the lease on {lease.instance} (token {lease.token}) was lost: {now_held}; "
            "nothing was written",
            path=path,
        )
    if held.expires_at <= time.time():
        raise LeaseLostError(
            f"the lease on {lease.instance} (token {lease.token}) expired; nothing was written",
            path=path,
        )


def _place(db: sqlite3.Connection, lease: Lease, node: str | None, now: float) -> None:
    if node is None:
        db.execute("DELETE FROM placement WHERE instance = ?", (lease.instance,))
    else:
        db.execute(
            "INSERT OR REPLACE INTO placement VALUES (?, ?, ?, ?)",
            (lease.instance, node, lease.token, now),
        )


def _release(db: sqlite3.Connection, lease: Lease) -> None:
    """The lease goes (if still ours), and any cancel request made of it."""
    for table in ("leases", "cancel_requests"):
        db.execute(
            f"DELETE FROM {table} WHERE instance = ? AND token = ?", (lease.instance, lease.token)
        )


def _update_open(
    db: sqlite3.Connection, entry: JournalEntry, path: str, columns: str, values: tuple[Any, ...]
) -> None:
    cursor = db.execute(
        f"UPDATE journal SET {columns} WHERE id = ? AND finished_at IS NULL",
        (*values, entry.id),
    )
    if cursor.rowcount != 1:
        raise StoreError(f"journal entry {entry.id} is not open", path=path)


def _json(details: dict[str, Any]) -> str:
    return json.dumps(details, sort_keys=True, default=str)


def _entry(row: tuple[Any, ...]) -> JournalEntry:
    (
        entry_id,
        instance,
        operation,
        controller,
        host,
        pid,
        pid_started,
        token,
        started_at,
        phase,
        details,
        updated_at,
        finished_at,
        outcome,
        progress,
    ) = row
    return JournalEntry(
        entry_id,
        instance,
        operation,
        Owner(controller, host, pid, pid_started),
        token,
        started_at,
        phase,
        json.loads(details),
        updated_at,
        finished_at,
        outcome,
        json.loads(progress) if progress else None,
    )


def _replace(entry: JournalEntry, **changes: Any) -> JournalEntry:
    return dataclasses.replace(entry, **changes)
