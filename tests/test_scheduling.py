"""The engine's pure decisions, with numbers alone: who starts next, shares, evacuation."""

from __future__ import annotations

from collections import Counter

import pytest

from kvmflow.engine.evacuation import Capacity, plan_moves
from kvmflow.engine.scheduling import link_share, pick_next
from kvmflow.engine.tickets import Limits, MigrationTicket, TicketState
from kvmflow.errors import MisuseError
from kvmflow.instance import Instance
from kvmflow.kvm import InstanceSpec, KvmHypervisor, RuntimePaths
from kvmflow.node import LocalNode

HV = {n: KvmHypervisor(LocalNode(n), RuntimePaths(f"/tmp/kvf-sched/{n}")) for n in "abc"}


def ticket(n: int, source: str, target: str, priority: int = 0) -> MigrationTicket:
    instance = Instance(InstanceSpec(f"vm{n}"), HV[source])
    return MigrationTicket(n, instance, target, priority, None, True, lambda t: None)


def no_fixed_port(t: MigrationTicket) -> tuple[str, int] | None:
    return None


def test_limits_per_source_target_and_total() -> None:
    running = [ticket(1, "a", "b"), ticket(2, "a", "c")]
    for t in running:
        t.move_to(TicketState.ACTIVE)
    waiting = ticket(3, "a", "b")
    other = ticket(4, "c", "b")
    tickets = [*running, waiting, other]
    limits = Limits(max_outbound=2, max_inbound=2)
    assert pick_next(tickets, limits, Counter(), no_fixed_port) is other  # a is full
    other.move_to(TicketState.ACTIVE)
    assert pick_next(tickets, limits, Counter(), no_fixed_port) is None  # b is full too
    assert pick_next(tickets, Limits(5, 5, max_total=3), Counter(), no_fixed_port) is None


def test_priority_then_fairness_then_first_come() -> None:
    first, second, urgent = ticket(1, "a", "c"), ticket(2, "b", "c"), ticket(3, "a", "c", 9)
    limits = Limits(5, 5)
    assert pick_next([first, second, urgent], limits, Counter(), no_fixed_port) is urgent
    assert pick_next([first, second], limits, Counter(), no_fixed_port) is first
    assert pick_next([first, second], limits, Counter({"a": 1}), no_fixed_port) is second


def test_one_fixed_port_serves_one_migration_at_a_time() -> None:
    running, waiting = ticket(1, "a", "b"), ticket(2, "c", "b")
    running.move_to(TicketState.ACTIVE)

    def port_8102(t: MigrationTicket) -> tuple[str, int] | None:
        return ("192.0.2.2", 8102)

    assert pick_next([running, waiting], Limits(5, 5), Counter(), port_8102) is None
    assert pick_next([running, waiting], Limits(5, 5), Counter(), no_fixed_port) is waiting


def test_ticket_lifecycle_is_a_table() -> None:
    t = ticket(1, "a", "b")
    with pytest.raises(MisuseError, match="queued cannot become completed"):
        t.move_to(TicketState.COMPLETED)
    t.move_to(TicketState.ACTIVE)
    t.move_to(TicketState.FAILED)
    assert t.done
    with pytest.raises(MisuseError, match="failed cannot become active"):
        t.move_to(TicketState.ACTIVE)


def test_link_share() -> None:
    assert link_share(None, 3) is None
    assert link_share(300, 3) == 100
    assert link_share(300, 0) == 300
    assert link_share(2, 5) == 1  # never zero: QEMU would read 0 as unlimited


def test_evacuation_places_the_largest_first_on_the_least_loaded() -> None:
    capacity = {"b": Capacity(free_mib=3000, instances=0), "c": Capacity(4000, 1)}
    plan = plan_moves("a", {"small": 512, "big": 2048, "huge": 8192, "mid": 1024}, capacity)
    assert plan.moves == [("big", "b", 2048), ("mid", "c", 1024), ("small", "b", 512)]
    assert [name for name, _ in plan.unplaceable] == ["huge"]
    assert "needs 8192 MiB; no target has it free (b: 3000, c: 4000)" in plan.unplaceable[0][1]
    assert plan.capacity == {
        "b": {"free_mib": 3000, "instances": 0},
        "c": {"free_mib": 4000, "instances": 1},
    }
