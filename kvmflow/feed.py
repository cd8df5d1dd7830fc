"""Bounded feeds: a producer pushes without ever blocking, a consumer awaits or iterates.

A consumer that reads slowly, or not at all, must not make memory grow: a feed keeps at
most ``max_buffered`` items and drops the oldest when full, counting what it dropped. The
newest items are kept because they describe the current state. Monitor event subscriptions
and migration progress both use it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Generic, TypeVar

import anyio

from kvmflow.errors import DeadlineError, KvmflowError, MisuseError

T = TypeVar("T")


class EndOfSubscription(KvmflowError):
    """The feed was closed and everything in it has been read."""


class BoundedFeed(Generic[T]):
    """Items oldest first; ``push`` never blocks; ``async for`` reads until closed."""

    def __init__(self, max_buffered: int = 1000) -> None:
        if max_buffered < 1:
            raise MisuseError(f"max_buffered must be at least 1, got {max_buffered}")
        self.dropped = 0
        self._queue: deque[T] = deque(maxlen=max_buffered)
        # The reader's wake-up: a bare future on asyncio (cheapest), else a backend Event.
        self._wakeup: asyncio.Future[None] | anyio.Event | None = None
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
        wakeup, self._wakeup = self._wakeup, None
        if wakeup is None:
            return
        if isinstance(wakeup, asyncio.Future):
            if not wakeup.done():
                wakeup.set_result(None)
        else:
            wakeup.set()

    async def _sleep(self, timeout: float | None) -> None:
        """Wait for the next push (or close), at most ``timeout`` seconds if given."""
        loop = _running_asyncio_loop()
        if loop is None:
            event = self._wakeup = anyio.Event()
            with anyio.move_on_after(timeout):
                await event.wait()
            return
        future: asyncio.Future[None] = loop.create_future()
        self._wakeup = future
        # A loop timer, not a cancel scope: a watcher that wakes twice a second per
        # migration would otherwise pay for a cancellation every time.
        timer = loop.call_later(timeout, _resolve, future) if timeout is not None else None
        try:
            await future
        finally:
            if timer is not None:
                timer.cancel()

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


def _running_asyncio_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
