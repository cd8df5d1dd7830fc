"""Policy validation and the policy engine's decisions, from numbers alone."""

from __future__ import annotations

import pytest

from kvmflow.errors import ValidationError
from kvmflow.kvm import HvParams
from kvmflow.migration.decide import PolicyEngine, estimate
from kvmflow.migration.policy import (
    Action,
    Capabilities,
    DowntimeStep,
    MigrationPolicy,
    StallRule,
    linear_schedule,
    pass_schedule,
)
from kvmflow.migration.status import MigrationSnapshot, MigrationStatus

MIB = 1024 * 1024


def active(
    remaining: int, *, passes: int = 3, dirty_mib: float = 0.0, mbps: float = 167.8
) -> MigrationSnapshot:
    return MigrationSnapshot(
        MigrationStatus.ACTIVE,
        transferred=1,
        remaining=remaining,
        total=128 * MIB,
        throughput_mbps=mbps,
        dirty_pages_rate=int(dirty_mib * MIB / 4096),
        page_size=4096,
        dirty_sync_count=passes,
    )


def fields_of(error: ValidationError) -> set[str]:
    return {p.field for p in error.problems}


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"downtime_ms": -5}, "downtime_ms"),
        ({"downtime_ms": 500, "downtime_ceiling_ms": 100}, "downtime_ceiling_ms"),
        ({"bandwidth_mib": 0}, "bandwidth_mib"),
        ({"poll_interval": -1}, "poll_interval"),
        ({"retry_delay": 0}, "retry_delay"),
        ({"max_bad_answers": 0}, "max_bad_answers"),
        ({"seconds_per_gib": -150}, "seconds_per_gib"),
        ({"stall": StallRule(-3, 0.1)}, "stall.window_seconds"),
        ({"stall": StallRule(30, 1.5)}, "stall.min_progress"),
        ({"stall_actions": (Action.POSTCOPY,)}, "capabilities.postcopy_ram"),
        ({"deadline_actions": ("explode",)}, "deadline_actions"),
        ({"downtime_schedule": (DowntimeStep(100, after_seconds=-1),)}, "downtime_schedule[0]"),
        ({"downtime_schedule": (DowntimeStep(100),)}, "downtime_schedule[0]"),
        ({"downtime_schedule": (DowntimeStep(9999, after_passes=2),)}, "downtime_schedule[0]"),
        ({"capabilities": Capabilities(multifd=True, postcopy_ram=True)}, "capabilities.multifd"),
        ({"capabilities": Capabilities(throttle_initial=0)}, "capabilities.throttle_initial"),
    ],
)
def test_nonsense_is_refused_before_anything_starts(changes: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        MigrationPolicy(**changes)  # type: ignore[arg-type]
    assert field in fields_of(info.value)


def test_all_problems_are_reported_together() -> None:
    with pytest.raises(ValidationError) as info:
        MigrationPolicy(downtime_ms=0, poll_interval=0, stall_actions=(Action.POSTCOPY,))
    assert {"downtime_ms", "poll_interval", "capabilities.postcopy_ram"} <= fields_of(info.value)


def test_presets() -> None:
    ancestor = MigrationPolicy.ancestor(HvParams(migration_bandwidth=32, migration_downtime=30))
    assert (ancestor.bandwidth_mib, ancestor.downtime_ms, ancestor.poll_interval) == (32, 30, 2.0)
    assert ancestor.stall is None
    assert ancestor.stall_actions == ()
    assert ancestor.downtime_schedule == ()
    default = MigrationPolicy()
    assert default.stall is not None
    assert default.stall_actions
    assert default.downtime_schedule
    assert MigrationPolicy.from_hvparams(HvParams(migration_downtime=3000)).downtime_ms == 3000


def test_schedules() -> None:
    nova = linear_schedule(100, 1000, 10, seconds_apart=7.5)
    assert [s.downtime_ms for s in nova][:3] == [190, 280, 370]
    assert nova[-1].downtime_ms == 1000
    assert nova[-1].after_seconds == 75
    ovirt = pass_schedule(100, 500, 4)
    assert [(s.after_passes, s.downtime_ms) for s in ovirt] == [
        (2, 200),
        (3, 300),
        (4, 400),
        (5, 500),
    ]


def test_qemu_parameters_and_capabilities() -> None:
    policy = MigrationPolicy(
        bandwidth_mib=20,
        downtime_ms=50,
        stall_actions=(Action.AUTO_CONVERGE, Action.POSTCOPY),
        capabilities=Capabilities(postcopy_ram=True, xbzrle=True),
    )
    params = policy.qemu_parameters()
    assert params["max-bandwidth"] == 20 * MIB
    assert params["downtime-limit"] == 50
    assert params["max-cpu-throttle"] == 1  # held until the action
    assert params["xbzrle-cache-size"] == 64 * MIB
    assert policy.enabled_capabilities("source") == {
        "events",
        "auto-converge",
        "xbzrle",
        "postcopy-ram",
    }
    assert policy.enabled_capabilities("target") == {"events", "postcopy-ram"}
    # The others are turned off, not left as an earlier migration set them.
    assert {c["capability"]: c["state"] for c in policy.source_capabilities()}["multifd"] is False
    assert params["tls-creds"] == ""
    assert policy.throttle_parameters()["max-cpu-throttle"] == 99


def test_estimate() -> None:
    # 20 MiB/s link (167.8 Mbit/s), guest dirtying 50 MiB/s: hopeless.
    hopeless = estimate(active(48 * MIB, dirty_mib=50), 50, 20 * MIB)
    assert hopeless is not None
    assert not hopeless.converging
    assert str(hopeless) == "not converging"
    # Dirtying 10 MiB/s: 48 MiB left, 1 MiB fits in the downtime: about 4.7 s.
    fine = estimate(active(48 * MIB, dirty_mib=10), 50, 20 * MIB)
    assert fine is not None
    assert fine.converging
    assert fine.seconds_left == pytest.approx(4.7, abs=0.2)
    assert estimate(active(48 * MIB, passes=1), 50, 20 * MIB) is None  # no dirty rate yet


def test_engine_escalates_in_order_with_grace() -> None:
    policy = MigrationPolicy(
        bandwidth_mib=20,
        downtime_ms=50,
        downtime_ceiling_ms=150,
        downtime_schedule=(),
        stall=None,
        action_grace_seconds=2,
        stall_actions=(
            Action.RAISE_DOWNTIME,
            Action.RAISE_DOWNTIME,
            Action.RAISE_DOWNTIME,
            Action.AUTO_CONVERGE,
            Action.ABORT,
        ),
        seconds_per_gib=None,
    )
    engine = PolicyEngine(policy, 128, started_at=0.0)
    hopeless = active(48 * MIB, dirty_mib=50)
    taken = []
    for second in range(12):
        taken += [(second, d.name, d.trigger) for d in engine.observe(hopeless, float(second))]
    # 50 -> 100 -> 150 (the ceiling); the third raise has nothing left to raise and is
    # skipped, then throttle, then abort, each at least 2 s apart; then nothing more.
    assert taken == [
        (0, "raise-downtime", "prediction"),
        (2, "raise-downtime", "prediction"),
        (4, "auto-converge", "prediction"),
        (6, "abort", "prediction"),
    ]
    assert [d.downtime_ms for d in engine.decisions if d.downtime_ms] == [100, 150]
    assert engine.exhausted


def test_engine_schedule_by_passes_and_time() -> None:
    policy = MigrationPolicy(
        downtime_ms=100,
        downtime_ceiling_ms=400,
        stall=None,
        predict=False,
        seconds_per_gib=None,
        downtime_schedule=(DowntimeStep(200, after_passes=2), DowntimeStep(400, after_seconds=10)),
    )
    engine = PolicyEngine(policy, 128, started_at=0.0)
    assert engine.observe(active(MIB, passes=1), 1.0) == []
    [step] = engine.observe(active(MIB, passes=2), 2.0)
    assert (step.name, step.downtime_ms, step.trigger) == ("downtime-step", 200, "schedule")
    assert engine.observe(active(MIB, passes=3), 5.0) == []
    [step] = engine.observe(active(MIB, passes=3), 10.0)
    assert step.downtime_ms == 400


def test_engine_stall_rule_and_deadline() -> None:
    policy = MigrationPolicy(
        downtime_schedule=(),
        predict=False,
        stall=StallRule(5, 0.1),
        stall_actions=(Action.PAUSE,),
        seconds_per_gib=80,
        deadline_floor_seconds=5,
        deadline_actions=(Action.ABORT,),
        action_grace_seconds=1,
    )
    engine = PolicyEngine(policy, 128, started_at=0.0)  # deadline: 10 s for 128 MiB
    decisions = []
    for second, remaining in enumerate([100, 90, 80, 79, 79, 79, 79, 79, 79, 79, 79, 79]):
        decisions += [
            (second, d.name, d.trigger)
            for d in engine.observe(active(remaining * MIB), float(second))
        ]
    assert decisions == [(7, "pause", "stall"), (10, "abort", "deadline")]
    assert "shrank" in engine.decisions[0].evidence
