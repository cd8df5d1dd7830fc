"""Which queued migration starts next, and each one's share of a link: pure functions.

A migration may start when its source has fewer than ``max_outbound`` active, its target
fewer than ``max_inbound``, the whole engine fewer than ``max_total``, its instance is not
busy with another operation, and no active migration listens on the same fixed address and
port. Among those: priority first, then the source node served least so far, then the one
submitted first.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable

from kvmflow.engine.tickets import Limits, MigrationTicket, TicketState

#: The address and fixed port a ticket's target will listen on (None for port 0).
ListenerOf = Callable[[MigrationTicket], tuple[str, int] | None]


def pick_next(
    tickets: Iterable[MigrationTicket],
    limits: Limits,
    served: Counter[str],
    listener_of: ListenerOf,
) -> MigrationTicket | None:
    """The queued ticket to start now, or None if the limits allow none."""
    out: Counter[str] = Counter()
    into: Counter[str] = Counter()
    listening: set[tuple[str, int]] = set()
    total = 0
    queued = []
    for ticket in tickets:
        if ticket.state is TicketState.ACTIVE:
            out[ticket.source] += 1
            into[ticket.target] += 1
            if (listener := listener_of(ticket)) is not None:
                listening.add(listener)
            total += 1
        elif ticket.state is TicketState.QUEUED:
            queued.append(ticket)
    if limits.max_total is not None and total >= limits.max_total:
        return None
    candidates = [
        t
        for t in queued
        if out[t.source] < limits.max_outbound
        and into[t.target] < limits.max_inbound
        and t.instance.machine.operation is None
        and listener_of(t) not in listening
    ]
    if not candidates:
        return None
    return max(candidates, key=lambda t: (t.priority, -served[t.source], -t.id))


def link_share(budget_mib: int | None, active: int) -> int | None:
    """Each of ``active`` migrations' share of a node's outbound budget (None: no budget)."""
    if budget_mib is None:
        return None
    return max(1, budget_mib // max(active, 1))
