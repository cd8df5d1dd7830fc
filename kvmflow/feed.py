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
        self._wakeup: anyio.Event | None = None
        self._event_class: type[anyio.Event] | None = None
        self._closed = False

    def push(self, item: T) -> None:
        """Add an item (dropping the oldest if full); ignored once closed."""
        if self._closed:
            return
        queue = self._queue
        if len(queue) == queue.maxlen:
            self.dropped += 1
        queue.append(item)
        if self._wakeup is not None:
            self._wakeup.set()

    __call__ = push  # a feed can be passed wherever a callback is expected

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
            if self._event_class is None:
                self._event_class = type(anyio.Event())  # the backend's class, looked up once
            self._wakeup = self._event_class()
            await self._wakeup.wait()
        return self._queue.popleft()

    async def wait_ready(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for an item (or the end); True if one is there.

        On asyncio this arms a loop timer instead of a cancel scope: a watcher that wakes
        twice a second per migration would otherwise pay for a cancellation every time.
        """
        if self._queue or self._closed:
            return True
        if self._event_class is None:
            self._event_class = type(anyio.Event())
        wakeup = self._wakeup = self._event_class()
        loop = _running_asyncio_loop()
        if loop is None:
            with anyio.move_on_after(timeout):
                await wakeup.wait()
        else:
            timer = loop.call_later(timeout, wakeup.set)
            try:
                await wakeup.wait()
            finally:
                timer.cancel()
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
            if self._wakeup is not None:
                self._wakeup.set()

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
