"""Bounded feeds: a producer pushes without ever blocking, a consumer awaits or iterates.

A consumer that reads slowly, or not at all, must not make memory grow: a feed keeps at
most ``max_buffered`` items and drops the oldest when full, counting what it dropped. The
newest items are kept because they describe the current state. Monitor event subscriptions
and migration progress both use it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from dataclasses import dataclass
from typing import Generic, TypeVar

import anyio

from kvmflow._fastpath import resolve, running_asyncio_loop
from kvmflow.errors import DeadlineError, EndOfSubscription, MisuseError

T = TypeVar("T")


@dataclass(frozen=True)
class FeedStatistics:
    """A feed's load, named after anyio's memory stream statistics."""

    current_buffer_used: int
    max_buffer_size: int
    dropped: int
    tasks_waiting_receive: int
    closed: bool


class BoundedFeed(Generic[T]):
    """Items oldest first; ``push`` never blocks; ``async for`` reads until closed.

    Any number of tasks may wait on one feed: every push wakes them all, and each takes an
    item if one is left (so no waiter sleeps while an item sits queued).
    """

    def __init__(self, max_buffered: int = 1000) -> None:
        if max_buffered < 1:
            raise MisuseError(f"max_buffered must be at least 1, got {max_buffered}")
        self.dropped = 0
        self._queue: deque[T] = deque(maxlen=max_buffered)
        # The waiters' wake-ups: bare futures on asyncio (cheapest), else backend Events.
        self._waiters: list[asyncio.Future[None] | anyio.Event] = []
        self._closed = False

    def push(self, item: T) -> None:
        """Add an item (dropping the oldest if full); ignored once closed."""
        if self._closed:
            return
        queue = self._queue
        if len(queue) == queue.maxlen:
            self.dropped += 1
        queue.append(item)
        self._wake()

    __call__ = push  # a feed can be passed wherever a callback is expected

    def _wake(self) -> None:
        if not self._waiters:
            return
        waiters, self._waiters = self._waiters, []
        for wakeup in waiters:
            if isinstance(wakeup, asyncio.Future):
                if not wakeup.done():
                    wakeup.set_result(None)
            else:
                wakeup.set()

    async def _sleep(self, timeout: float | None) -> None:
        """Wait for the next push (or close), at most ``timeout`` seconds if given."""
        loop = running_asyncio_loop()
        if loop is None:
            event = anyio.Event()
            self._waiters.append(event)
            try:
                with anyio.move_on_after(timeout):
                    await event.wait()
            finally:
                self._forget(event)
            return
        future: asyncio.Future[None] = loop.create_future()
        self._waiters.append(future)
        # A loop timer, not a cancel scope: a watcher that wakes twice a second per
        # migration would otherwise pay for a cancellation every time.
        timer = loop.call_later(timeout, resolve, future) if timeout is not None else None
        try:
            await future
        finally:
            if timer is not None:
                timer.cancel()
            self._forget(future)

    def _forget(self, wakeup: asyncio.Future[None] | anyio.Event) -> None:
        """Drop a waiter that woke by timeout or cancellation (a push already dropped the
        others)."""
        with contextlib.suppress(ValueError):
            self._waiters.remove(wakeup)

    def pending(self) -> int:
        """How many items are buffered and not yet received."""
        return len(self._queue)

    async def receive(self, timeout: float | None = None) -> T:
        """The next item; raises :class:`EndOfSubscription` once closed and drained."""
        if timeout is None:  # the common case needs no cancel scope
            return await self._next()
        with anyio.move_on_after(timeout):
            return await self._next()
        raise DeadlineError(f"waiting for {self.describe()}", timeout)

    async def _next(self) -> T:
        while not self._queue:
            if self._closed:
                raise EndOfSubscription
            await self._sleep(None)
        return self._queue.popleft()

    async def wait_ready(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for an item (or the end); True if one is there."""
        if not (self._queue or self._closed):
            await self._sleep(timeout)
        return bool(self._queue) or self._closed

    def receive_nowait(self) -> T:
        """The next item if one is buffered; raises ``anyio.WouldBlock`` if none is, and
        :class:`EndOfSubscription` once closed and drained."""
        if self._queue:
            return self._queue.popleft()
        if self._closed:
            raise EndOfSubscription
        raise anyio.WouldBlock

    def statistics(self) -> FeedStatistics:
        return FeedStatistics(
            len(self._queue),
            self._queue.maxlen or 0,
            self.dropped,
            len(self._waiters),
            self._closed,
        )

    def drain(self) -> list[T]:
        """Take every buffered item at once."""
        items = list(self._queue)
        self._queue.clear()
        return items

    def describe(self) -> str:
        return "the next item"

    def close(self) -> None:
        """Stop taking items; what is buffered can still be read."""
        if not self._closed:
            self._closed = True
            self._wake()

    @property
    def closed(self) -> bool:
        return self._closed

    def __aiter__(self) -> BoundedFeed[T]:
        return self

    async def __anext__(self) -> T:
        try:
            return await self.receive()
        except EndOfSubscription:
            raise StopAsyncIteration from None
