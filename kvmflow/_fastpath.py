"""The asyncio fast paths kvmflow's hot loops share (httpcore's ``_synchronization`` is the
model): on asyncio a bare loop future is the cheapest wake-up there is, and a busy
controller wakes thousands of waiters a second; on any other backend (trio) anyio's Event.
"""

from __future__ import annotations

import asyncio

import anyio


def running_asyncio_loop() -> asyncio.AbstractEventLoop | None:
    """The running asyncio loop, or ``None`` on another backend (or outside a loop)."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def resolve(future: asyncio.Future[None]) -> None:
    """Complete ``future`` unless a waiter that gave up already cancelled it."""
    if not future.done():
        future.set_result(None)


class Wakeup:
    """A one-shot wake-up for one waiter: ``set()`` from anywhere in the loop's thread,
    ``await wait()`` in the waiter. ``loop`` is :func:`running_asyncio_loop`'s answer and
    ``event_class`` the backend's Event type, both looked up once by the owner."""

    __slots__ = ("_event", "_future")

    def __init__(
        self, loop: asyncio.AbstractEventLoop | None, event_class: type[anyio.Event]
    ) -> None:
        self._future = loop.create_future() if loop is not None else None
        self._event = event_class() if loop is None else None

    def set(self) -> None:
        if self._future is not None:
            resolve(self._future)
        else:
            assert self._event is not None
            self._event.set()

    async def wait(self) -> None:
        if self._future is not None:
            await self._future
        else:
            assert self._event is not None
            await self._event.wait()
