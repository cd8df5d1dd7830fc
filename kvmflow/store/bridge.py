"""An asyncio event loop in a thread of its own, for a client library that runs on asyncio
only (the etcd client), called from any anyio backend (asyncio or trio).

The client, its gRPC channel and its background tasks live on that loop for the store's
whole life; a call hands a coroutine over and waits for its future without blocking the
caller's loop (``asyncio.wrap_future`` on asyncio; a done-callback through the trio token
on trio). A cancelled caller cancels the call on the other side too.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
import sniffio

T = TypeVar("T")


class LoopThread:
    """One asyncio loop run by a daemon thread; :meth:`call` runs coroutines on it."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, factory: Callable[[], Awaitable[T]]) -> concurrent.futures.Future[T]:
        """Start ``factory()`` on the loop; the future it returns is thread-safe."""

        async def run() -> T:
            return await factory()

        return asyncio.run_coroutine_threadsafe(run(), self.loop)

    async def call(self, factory: Callable[[], Awaitable[T]]) -> T:
        """Run ``factory()`` on the loop and wait for its result here."""
        future = self.submit(factory)
        try:
            return await _wait(future)
        except BaseException:
            future.cancel()
            raise

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the loop (after cancelling what still runs on it) and join the thread."""
        if not self.loop.is_running():
            return

        async def cancel_all() -> None:
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        done = asyncio.run_coroutine_threadsafe(cancel_all(), self.loop)
        with contextlib.suppress(
            concurrent.futures.TimeoutError, concurrent.futures.CancelledError
        ):
            done.result(timeout)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self.loop.close()


async def _wait(future: concurrent.futures.Future[T]) -> T:
    if sniffio.current_async_library() == "asyncio":
        return await asyncio.wrap_future(future)
    import trio  # the caller runs on trio, so trio is there

    token = trio.lowlevel.current_trio_token()
    done = anyio.Event()

    def wake(_: Any) -> None:
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(done.set)

    future.add_done_callback(wake)
    await done.wait()
    return future.result()
