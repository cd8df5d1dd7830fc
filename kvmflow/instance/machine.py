"""The per-instance state machine: legal transitions only, logged, observable, one owner.

Each instance is driven by one operation at a time. A second operation on a busy instance
is refused at once with :class:`InstanceBusyError` (naming the running operation) rather
than queued: a queued stop behind a migration, or a migration behind a stop, would act on a
world that changed under it. Callers that want queueing wrap their own retry around it.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

import anyio

from kvmflow._logging import get_logger
from kvmflow.errors import DeadlineError, IllegalTransitionError, InstanceBusyError
from kvmflow.instance.states import InstanceEvent, InstanceState, next_state

#: Transitions kept per instance (the newest): a long-lived controller must stay flat.
HISTORY_LENGTH = 100


@dataclass(frozen=True)
class Transition:
    """One change of state, as observers see it."""

    instance: str
    before: InstanceState
    event: InstanceEvent
    after: InstanceState
    node: str | None


class InstanceMachine:
    """The orchestration state of one instance and the node it runs on."""

    def __init__(
        self, name: str, node: str | None = None, state: InstanceState = InstanceState.DEFINED
    ) -> None:
        self.name = name
        self.node = node
        self.state = state
        self.operation: str | None = None
        self.history: deque[Transition] = deque(maxlen=HISTORY_LENGTH)
        # Created when someone waits, so that machines can be built outside an event loop.
        self._changed: anyio.Event | None = None
        self._log = get_logger("kvmflow.instance").bind(instance=name)

    def can(self, event: InstanceEvent) -> bool:
        return next_state(self.state, event) is not None

    def fire(self, event: InstanceEvent, *, node: str | None = None) -> InstanceState:
        """Apply ``event``; ``node`` moves the instance (after a migration, say)."""
        target = next_state(self.state, event)
        if target is None:
            raise IllegalTransitionError(self.name, self.state, event)
        before = self.state
        self.state = target
        if node is not None:
            self.node = node
        transition = Transition(self.name, before, event, target, self.node)
        self.history.append(transition)
        self._log.info(
            "instance state changed",
            node=self.node,
            before=before.value,
            trigger=event.value,
            after=target.value,
            operation=self.operation,
        )
        changed, self._changed = self._changed, None
        if changed is not None:
            changed.set()
        return target

    def _change_event(self) -> anyio.Event:
        if self._changed is None:
            self._changed = anyio.Event()
        return self._changed

    async def next_change(self, timeout: float | None = None) -> Transition:
        """Wait for the next transition and return it."""
        changed = self._change_event()
        with anyio.move_on_after(timeout):
            await changed.wait()
            return self.history[-1]
        raise DeadlineError(f"waiting for instance {self.name} to change state", timeout or 0)

    async def wait_for(self, *states: InstanceState, timeout: float | None = None) -> InstanceState:
        """Wait until the instance is in one of ``states``."""
        with anyio.move_on_after(timeout):
            while self.state not in states:
                await self._change_event().wait()
            return self.state
        wanted = ", ".join(s.value for s in states)
        raise DeadlineError(f"waiting for instance {self.name} to be {wanted}", timeout or 0)

    @contextlib.asynccontextmanager
    async def operation_scope(self, name: str) -> AsyncIterator[InstanceMachine]:
        """Own the instance for one operation; refuse if another one owns it."""
        if self.operation is not None:
            raise InstanceBusyError(
                f"instance {self.name} is busy with {self.operation!r}; {name!r} refused"
            )
        self.operation = name
        try:
            yield self
        finally:
            self.operation = None
