"""Bounded, filtered event subscriptions for a monitor client.

A subscriber that reads slowly, or not at all, must not make memory grow: each subscription
keeps at most ``max_buffered`` events and drops the oldest when full, counting what it
dropped. The newest events are kept because they describe the current state.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from types import TracebackType

import anyio

from kvmflow.errors import DeadlineError, KvmflowError, MisuseError
from kvmflow.monitor.protocol import Event


class EventSubscription:
    """Events of the chosen names (all when none are named), oldest first."""

    def __init__(
        self,
        names: Iterable[str],
        max_buffered: int,
        on_close: Callable[[EventSubscription], None],
    ) -> None:
        if max_buffered < 1:
            raise MisuseError(f"max_buffered must be at least 1, got {max_buffered}")
        self.names = frozenset(names) or None
        self.dropped = 0
        self._queue: deque[Event] = deque(maxlen=max_buffered)
        self._wakeup: anyio.Event | None = None
        self._closed = False
        self._on_close = on_close

    def offer(self, event: Event) -> None:
        """Called by the client's reader for every event; never blocks."""
        if self._closed or (self.names is not None and event.name not in self.names):
            return
        queue = self._queue
        if len(queue) == queue.maxlen:
            self.dropped += 1
        queue.append(event)
        if self._wakeup is not None:
            self._wakeup.set()

    def pending(self) -> int:
        """How many events are buffered and not yet received."""
        return len(self._queue)

    async def receive(self, timeout: float | None = None) -> Event:
        """The next event; raises :class:`EndOfSubscription` once closed and drained."""
        with anyio.move_on_after(timeout) as scope:
            while not self._queue:
                if self._closed:
                    raise EndOfSubscription
                self._wakeup = anyio.Event()
                await self._wakeup.wait()
            return self._queue.popleft()
        if scope.cancelled_caught:
            raise DeadlineError(f"waiting for event {sorted(self.names or ['any'])}", timeout or 0)
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        """Stop receiving; buffered events can still be read."""
        if not self._closed:
            self._closed = True
            self._on_close(self)
            if self._wakeup is not None:
                self._wakeup.set()

    def __aiter__(self) -> EventSubscription:
        return self

    async def __anext__(self) -> Event:
        try:
            return await self.receive()
        except EndOfSubscription:
            raise StopAsyncIteration from None

    def __enter__(self) -> EventSubscription:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class EndOfSubscription(KvmflowError):
    """The subscription was closed (by its owner or because the client closed)."""
