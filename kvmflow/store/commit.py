"""Group commit over one SQLite connection: every write queued while a commit is on disk
goes into the next transaction, each in a savepoint of its own, so that many operations in
flight share each ``fsync`` (``synchronous=FULL``) instead of queueing one each.

The connection is touched by one anyio worker thread at a time (reads too), so that
asyncio and trio both work and the event loop never waits on the disk.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

import anyio
import anyio.to_thread

from kvmflow.store.schema import translated

T = TypeVar("T")


@dataclass(eq=False)
class _Write(Generic[T]):
    """One write waiting for its group commit, and what came of it."""

    work: Callable[[], T]
    done: bool = False
    result: T | None = None
    error: BaseException | None = None


class GroupCommitter:
    """The connection ``db`` to the file at ``path``, with reads (:meth:`_run`) and group
    committed writes (:meth:`_batched`, :meth:`_write`)."""

    def __init__(self, path: str, connection: sqlite3.Connection) -> None:
        self.path = path
        self._db = connection
        self._limiter = anyio.CapacityLimiter(1)  # one thread touches the connection at a time
        self._queue: list[_Write[Any]] = []  # writes waiting for the next group commit
        self._committing = anyio.Lock()  # one group commit at a time
        self._in_batch = False  # the worker thread is inside a group commit
        self.commits = 0  # group commits made (each one fsync), for tests and benchmarks

    async def _run(self, work: Callable[[], T]) -> T:
        return await anyio.to_thread.run_sync(work, limiter=self._limiter)

    async def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """The rows of one read, its failures said as :class:`~kvmflow.errors.StoreError`."""

        def read() -> list[tuple[Any, ...]]:
            with translated(self.path):
                return self._db.execute(sql, params).fetchall()

        return await self._run(read)

    async def _batched(self, work: Callable[[], T]) -> T:
        """Run one write in the next group commit: every write queued while the previous
        commit was on disk goes into one transaction, each in its own savepoint (a write
        that fails is rolled back alone), so that many operations in flight share each
        ``fsync`` instead of queueing one ``fsync`` each behind the others."""
        item = _Write(work)
        self._queue.append(item)
        try:
            async with self._committing:
                if not item.done:
                    batch, self._queue = self._queue, []
                    await anyio.to_thread.run_sync(self._commit, batch, limiter=self._limiter)
        except BaseException:
            if not item.done and item in self._queue:  # cancelled before its batch began
                self._queue.remove(item)
            raise
        if item.error is not None:
            raise item.error
        return cast(T, item.result)

    def _commit(self, batch: list[_Write[Any]]) -> None:
        """One transaction for ``batch`` (in the worker thread). If the transaction itself
        fails (a full disk at the commit), every write of it fails with that error."""
        db = self._db
        try:
            with translated(self.path):
                db.execute("BEGIN IMMEDIATE")
            self._in_batch = True
            try:
                for item in batch:
                    try:
                        item.result = item.work()
                    except Exception as exc:  # this write's own failure: it alone fails
                        item.error = exc
            finally:
                self._in_batch = False
            with translated(self.path):
                db.execute("COMMIT")
            self.commits += 1
        except Exception as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            for item in batch:
                item.error, item.result = exc, None
        finally:
            for item in batch:
                item.done = True

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write, taken at once (``BEGIN IMMEDIATE``) so that checks and writes inside
        it see no other writer; inside a group commit, a savepoint of it. Any failure rolls
        all of the write back."""
        db = self._db
        begin, undo, end = (
            ("SAVEPOINT one_write", "ROLLBACK TO one_write", "RELEASE one_write")
            if self._in_batch
            else ("BEGIN IMMEDIATE", "ROLLBACK", "COMMIT")
        )
        with translated(self.path):
            db.execute(begin)
            try:
                yield db
            except BaseException:
                db.execute(undo)
                if self._in_batch:
                    db.execute(end)
                raise
            db.execute(end)
