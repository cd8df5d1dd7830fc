"""QMP commands in flight: matching answers to callers, and per-command deadlines.

QEMU answers in order, so an answer is matched by its id, and one that names no known
command belongs to the oldest one outstanding. A caller that gave up leaves a marker, so
that its late answer is recognised and dropped instead of being taken for someone else's.
"""

from __future__ import annotations

import asyncio
import heapq
import math
from collections.abc import Callable
from typing import Any

import anyio

from kvmflow._fastpath import Wakeup
from kvmflow.errors import ConnectionLostError, DeadlineError
from kvmflow.monitor.protocol import ErrorReply, Garbage, Reply

Answer = Reply | ErrorReply | Garbage


class Call:
    """One command in flight: what was sent and, once answered, its outcome."""

    __slots__ = ("_wakeup", "arguments", "command", "completed", "error", "value")

    def __init__(
        self,
        command: str,
        arguments: dict[str, Any] | None,
        loop: asyncio.AbstractEventLoop | None,
        event_class: type[anyio.Event],
    ) -> None:
        self.command = command
        self.arguments = arguments
        self.completed = False
        self.value: Any = None
        self.error: Exception | None = None
        self._wakeup = Wakeup(loop, event_class)

    def succeed(self, value: Any) -> None:
        self.value = value
        self.completed = True
        self._wakeup.set()

    def fail(self, error: Exception) -> None:
        self.error = error
        self.completed = True
        self._wakeup.set()

    async def wait(self) -> None:
        await self._wakeup.wait()


class PendingCalls:
    """The calls of one client by id, oldest first (ids only grow)."""

    def __init__(self, monitor: str) -> None:
        self.monitor = monitor
        # ``None`` marks a call whose caller gave up, so that its late reply is dropped.
        self.by_id: dict[int, Call | None] = {}
        self.quit_ids: set[int] = set()

    def add(self, call_id: int, call: Call) -> None:
        self.by_id[call_id] = call
        if call.command == "quit":
            self.quit_ids.add(call_id)

    def abandon(self, call_id: int) -> None:
        """The caller stopped waiting: drop the answer when it comes."""
        if call_id in self.by_id:
            self.by_id[call_id] = None

    def match(self, message: Answer) -> tuple[Call | None, Answer, str | None]:
        """The call an answer belongs to (``None``: drop it), the answer as that call should
        see it, and why it was dropped (a log line), if it was."""
        pending = self.by_id
        message_id = message.id
        if type(message_id) is int and message_id in pending:
            return pending.pop(message_id), message, None
        if not pending:
            return None, message, "monitor answer with no command pending"
        oldest = next(iter(pending))
        if type(message_id) is int and message_id < oldest:
            # Answered already: pinning it on a waiting command would fail that command.
            return None, message, "late duplicate monitor answer dropped"
        call = pending.pop(oldest)
        if message_id is not None and call is not None:
            message = Garbage(
                f"answer carries id {message_id!r}, which no command has",
                repr(message).encode(),
                message_id,
            )
        return call, message, None

    def fail_all(self, reason: str) -> int:
        """The connection ended: every caller gets its error (``quit`` its success, since
        QEMU may close the socket before answering it). Returns how many failed."""
        pending, self.by_id = self.by_id, {}
        quit_ids, self.quit_ids = self.quit_ids, set()
        failed = 0
        for call_id, call in pending.items():
            if call is None:
                continue
            if call_id in quit_ids:
                call.succeed({})
            else:
                failed += 1
                call.fail(
                    ConnectionLostError(
                        f"{call.command!r} got no answer: {reason}", monitor=self.monitor
                    )
                )
        return failed


class Deadlines:
    """Per-command deadlines, served by one watcher task from a heap, so that a command
    costs no cancel scope of its own (the common case, an answer well before the deadline,
    costs one heap push)."""

    def __init__(self, monitor: str, on_expired: Callable[[int], None]) -> None:
        self.monitor = monitor
        self._on_expired = on_expired  # told the id of a call that ran out of time
        self._heap: list[tuple[float, int, Call, float]] = []
        self._wakeup: anyio.Event | None = None
        self._target = math.inf  # when the watcher wakes up next
        self.clock: Callable[[], float] = anyio.current_time

    def add(self, call_id: int, call: Call, timeout: float) -> None:
        deadline = self.clock() + timeout
        heapq.heappush(self._heap, (deadline, call_id, call, timeout))
        if deadline < self._target and self._wakeup is not None:
            self._target = deadline
            self._wakeup.set()

    async def watch(self) -> None:
        """Fail each call whose deadline passed; runs until cancelled."""
        heap = self._heap
        while True:
            now = anyio.current_time()
            while heap and (heap[0][0] <= now or heap[0][2].completed):
                _, call_id, call, timeout = heapq.heappop(heap)
                if not call.completed:
                    self._on_expired(call_id)
                    call.fail(
                        DeadlineError(f"QMP command {call.command!r}", timeout, where=self.monitor)
                    )
            self._wakeup = anyio.Event()
            self._target = heap[0][0] if heap else math.inf
            with anyio.move_on_after(heap[0][0] - now if heap else None):
                await self._wakeup.wait()
