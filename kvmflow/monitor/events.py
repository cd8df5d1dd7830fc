"""Event subscriptions of a monitor client: bounded feeds filtered by event name."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from types import TracebackType

from kvmflow.errors import EndOfSubscription
from kvmflow.feed import BoundedFeed
from kvmflow.monitor.protocol import Event

__all__ = ["EndOfSubscription", "EventSubscription"]


class EventSubscription(BoundedFeed[Event]):
    """Events of the chosen names (all when none are named), oldest first."""

    def __init__(
        self,
        names: Iterable[str],
        max_buffered: int,
        on_close: Callable[[EventSubscription], None],
    ) -> None:
        super().__init__(max_buffered)
        self.names = frozenset(names) or None
        self._on_close = on_close

    def offer(self, event: Event) -> None:
        """Called by the client's reader for every event; never blocks."""
        if self.names is None or event.name in self.names:
            self.push(event)

    def describe(self) -> str:
        return f"event {sorted(self.names or ['any'])}"

    def close(self) -> None:
        if not self.closed:
            super().close()
            self._on_close(self)

    def __enter__(self) -> EventSubscription:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
