"""How a migration is run and how it is made to converge, as one frozen, checked object.

A :class:`MigrationPolicy` holds the limits (bandwidth, initial downtime), a downtime
schedule, a stall rule, a completion deadline scaled by guest RAM, the actions to take in
order when the migration does not converge, the capabilities to enable on both sides, and
how the watcher polls and tolerates bad answers. :meth:`MigrationPolicy.ancestor` is the
ancestor's fixed behaviour; the plain constructor gives kvmflow's default.
"""

from __future__ import annotations

import enum
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from kvmflow.errors import FieldProblem, ValidationError
from kvmflow.kvm.hvparams import HvParams

MIB = 1024 * 1024
GIB = 1024 * MIB


class Action(enum.StrEnum):
    """What the policy may do to a migration that does not converge, in the order given."""

    DOWNTIME_STEP = "downtime-step"  # the downtime schedule's next step (not a stall action)
    RAISE_DOWNTIME = "raise-downtime"  # double the allowed downtime, up to the ceiling
    AUTO_CONVERGE = "auto-converge"  # let QEMU throttle the guest's vCPUs
    POSTCOPY = "postcopy"  # switch to post-copy (needs postcopy_ram)
    PAUSE = "pause"  # pause the guest and finish non-live
    ABORT = "abort"  # cancel cleanly; the guest keeps running on the source


@dataclass(frozen=True)
class DowntimeStep:
    """Allow ``downtime_ms`` once ``after_seconds`` have passed or ``after_passes``
    dirty-sync passes were made (whichever is set)."""

    downtime_ms: int
    after_seconds: float | None = None
    after_passes: int | None = None


def linear_schedule(
    initial_ms: int, ceiling_ms: int, steps: int, *, seconds_apart: float
) -> tuple[DowntimeStep, ...]:
    """Nova's way: ``steps`` equal raises from initial to ceiling, ``seconds_apart`` apart."""
    return tuple(
        DowntimeStep(
            initial_ms + (ceiling_ms - initial_ms) * n // steps, after_seconds=seconds_apart * n
        )
        for n in range(1, steps + 1)
    )


def pass_schedule(initial_ms: int, ceiling_ms: int, steps: int) -> tuple[DowntimeStep, ...]:
    """oVirt's way: raise the downtime at each dirty-sync pass from the second one on."""
    return tuple(
        DowntimeStep(initial_ms + (ceiling_ms - initial_ms) * n // steps, after_passes=n + 1)
        for n in range(1, steps + 1)
    )


@dataclass(frozen=True)
class StallRule:
    """The migration stalls when remaining bytes did not shrink by ``min_progress``
    (a fraction) within ``window_seconds``."""

    window_seconds: float = 30.0
    min_progress: float = 0.1


@dataclass(frozen=True)
class Capabilities:
    """Migration capabilities, enabled on both sides before ``migrate`` as QEMU requires."""

    auto_converge: bool = False
    throttle_initial: int = 20
    throttle_increment: int = 10
    xbzrle: bool = False
    xbzrle_cache_mib: int = 64
    multifd: bool = False
    multifd_channels: int = 2
    multifd_compression: str | None = None  # zlib, zstd, ... where both QEMU builds have it
    postcopy_ram: bool = False
    events: bool = True


@dataclass(frozen=True)
class MigrationPolicy:
    """Everything that decides how one migration runs.

    ``bandwidth_mib`` (MiB/s; ``None`` leaves QEMU's default) and ``downtime_ms`` are the
    starting limits; ``downtime_schedule`` raises the downtime over time or passes up to
    ``downtime_ceiling_ms``. ``stall`` and ``seconds_per_gib`` (completion deadline per GiB
    of guest RAM, at least ``deadline_floor_seconds``) trigger ``stall_actions`` and
    ``deadline_actions`` one at a time, and so does the prediction when the guest dirties
    memory faster than the link carries it (``predict``). ``action_grace_seconds`` is the
    least time between two actions.
    """

    bandwidth_mib: int | None = 32
    downtime_ms: int = 100
    downtime_ceiling_ms: int = 2000
    downtime_schedule: tuple[DowntimeStep, ...] = field(
        default_factory=lambda: pass_schedule(100, 500, 4)
    )
    stall: StallRule | None = field(default_factory=StallRule)
    stall_actions: tuple[Action, ...] = (
        Action.RAISE_DOWNTIME,
        Action.AUTO_CONVERGE,
        Action.RAISE_DOWNTIME,
        Action.RAISE_DOWNTIME,
    )
    seconds_per_gib: float | None = 150.0
    deadline_floor_seconds: float = 60.0
    deadline_actions: tuple[Action, ...] = (Action.ABORT,)
    predict: bool = True
    action_grace_seconds: float = 3.0
    capabilities: Capabilities = field(default_factory=Capabilities)
    poll_interval: float = 0.5
    max_bad_answers: int = 5
    retry_delay: float = 2.0
    query_timeout: float = 10.0
    cancel_timeout: float = 30.0
    target_ready_timeout: float = 30.0
    cleanup_timeout: float = 90.0  # all of an abort, or all of the finishing, at most
    postcopy_recovery_seconds: float = 60.0
    wake_on_events: bool = True  # False: poll only (events still enabled, e.g. for timing)
    tls: bool = False  # encrypt the stream with each node's migration TLS credentials

    def __post_init__(self) -> None:
        problems = _check(self)
        if problems:
            raise ValidationError(problems)

    @property
    def use_events(self) -> bool:
        """Whether MIGRATION events wake the watcher before the next poll."""
        return self.capabilities.events and self.wake_on_events

    # ---------------------------------------------------------------- presets

    @classmethod
    def ancestor(cls, hv: HvParams | None = None, **overrides: Any) -> MigrationPolicy:
        """Ganeti's behaviour: fixed bandwidth and downtime from the instance's parameters,
        polling every 2 s, no schedule, no stall rule, no deadline."""
        hv = hv or HvParams()
        values: dict[str, Any] = dict(
            bandwidth_mib=hv.migration_bandwidth,
            downtime_ms=hv.migration_downtime,
            downtime_ceiling_ms=hv.migration_downtime,
            downtime_schedule=(),
            stall=None,
            stall_actions=(),
            seconds_per_gib=None,
            deadline_actions=(),
            predict=False,
            poll_interval=2.0,
        )
        values.update(overrides)
        return cls(**values)

    @classmethod
    def fixed(cls, **overrides: Any) -> MigrationPolicy:
        """Fixed limits and no convergence help, with kvmflow's polling and tolerance."""
        values: dict[str, Any] = dict(
            downtime_schedule=(),
            stall=None,
            stall_actions=(),
            seconds_per_gib=None,
            deadline_actions=(),
            predict=False,
        )
        values.update(overrides)
        if "downtime_ceiling_ms" not in overrides:
            values["downtime_ceiling_ms"] = max(values.get("downtime_ms", 100), 100)
        return cls(**values)

    @classmethod
    def from_hvparams(cls, hv: HvParams, **overrides: Any) -> MigrationPolicy:
        """kvmflow's default policy, starting from the instance's bandwidth and downtime."""
        values: dict[str, Any] = {
            "bandwidth_mib": hv.migration_bandwidth,
            "downtime_ms": hv.migration_downtime,
        }
        values.update(overrides)
        ceiling = values.get("downtime_ceiling_ms", cls.downtime_ceiling_ms)
        if values["downtime_ms"] > ceiling:
            values["downtime_ceiling_ms"] = values["downtime_ms"]
        if "downtime_schedule" not in overrides:
            values["downtime_schedule"] = pass_schedule(
                values["downtime_ms"], max(values["downtime_ms"], min(500, ceiling)), 4
            )
        return cls(**values)

    def with_changes(self, **changes: Any) -> MigrationPolicy:
        return replace(self, **changes)

    def as_record(self) -> dict[str, Any]:
        """The policy as plain JSON data (for the journal: recovery continues under it)."""
        return asdict(self)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> MigrationPolicy:
        """The policy :meth:`as_record` wrote (checked again, like any policy)."""
        values = dict(record)
        values["downtime_schedule"] = tuple(
            DowntimeStep(**step) for step in values.get("downtime_schedule", ())
        )
        stall = values.get("stall")
        values["stall"] = StallRule(**stall) if stall is not None else None
        for key in ("stall_actions", "deadline_actions"):
            if key in values:
                values[key] = tuple(Action(a) for a in values[key])
        values["capabilities"] = Capabilities(**values.get("capabilities", {}))
        return cls(**values)

    # ------------------------------------------------------------ for QEMU

    def uses(self, action: Action) -> bool:
        return action in self.stall_actions or action in self.deadline_actions

    def qemu_parameters(self) -> dict[str, int | str]:
        """Arguments of ``migrate-set-parameters`` before the migration starts."""
        parameters: dict[str, int | str] = {"downtime-limit": self.downtime_ms}
        if self.bandwidth_mib is not None:
            parameters["max-bandwidth"] = self.bandwidth_mib * MIB
        caps = self.capabilities
        if caps.auto_converge:
            parameters.update(
                {
                    "cpu-throttle-initial": caps.throttle_initial,
                    "cpu-throttle-increment": caps.throttle_increment,
                    "max-cpu-throttle": 99,
                }
            )
        elif self.uses(Action.AUTO_CONVERGE):
            # Capabilities cannot change mid-flight, so auto-converge is on from the start
            # but held at 1% until the policy's action lifts the cap.
            parameters.update(
                {"cpu-throttle-initial": 1, "cpu-throttle-increment": 1, "max-cpu-throttle": 1}
            )
        if caps.xbzrle:
            parameters["xbzrle-cache-size"] = caps.xbzrle_cache_mib * MIB
        parameters.update(self.target_parameters())
        if not self.tls:  # a guest that arrived over TLS keeps its credentials otherwise
            parameters["tls-creds"] = ""
        return parameters

    def target_parameters(self) -> dict[str, int | str]:
        """Parameters the target must share with the source: the multifd channel count
        (the target waits for that many connections) and compression."""
        caps = self.capabilities
        if not caps.multifd:
            return {}
        return {
            "multifd-channels": caps.multifd_channels,
            "multifd-compression": caps.multifd_compression or "none",
        }

    def throttle_parameters(self) -> dict[str, int]:
        """What the auto-converge action sets: the real throttle steps and a 99% cap."""
        return {
            "cpu-throttle-initial": self.capabilities.throttle_initial,
            "cpu-throttle-increment": self.capabilities.throttle_increment,
            "max-cpu-throttle": 99,
        }

    def source_capabilities(self) -> list[dict[str, Any]]:
        """Every capability kvmflow manages, on or off: a QEMU keeps what an earlier
        migration set (a guest that arrived over multifd still has it on), so each
        migration states all of them."""
        caps = self.capabilities
        wanted = {
            "events": caps.events,
            "auto-converge": caps.auto_converge or self.uses(Action.AUTO_CONVERGE),
            "xbzrle": caps.xbzrle,
            "multifd": caps.multifd,
            "postcopy-ram": caps.postcopy_ram,
        }
        return [{"capability": name, "state": on} for name, on in wanted.items()]

    def target_capabilities(self) -> list[dict[str, Any]]:
        """The capabilities the target must share with the source, on or off."""
        caps = self.capabilities
        wanted = {"events": caps.events, "multifd": caps.multifd, "postcopy-ram": caps.postcopy_ram}
        return [{"capability": name, "state": on} for name, on in wanted.items()]

    def enabled_capabilities(self, side: str = "source") -> set[str]:
        """The names of the capabilities this policy turns on (``side``: source or target)."""
        listed = self.source_capabilities() if side == "source" else self.target_capabilities()
        return {c["capability"] for c in listed if c["state"]}

    def deadline_seconds(self, memory_mib: int) -> float | None:
        """The completion deadline for a guest of ``memory_mib``: seconds per GiB, but never
        less than ``deadline_floor_seconds`` (small guests still need setup time)."""
        if self.seconds_per_gib is None:
            return None
        return max(self.deadline_floor_seconds, self.seconds_per_gib * max(memory_mib, 1) / 1024)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _check(policy: MigrationPolicy) -> list[FieldProblem]:
    problems: list[FieldProblem] = []

    def bad(name: str, value: Any, rule: str) -> None:
        problems.append(FieldProblem(name, value, rule))

    if policy.bandwidth_mib is not None and not _positive_int(policy.bandwidth_mib):
        bad("bandwidth_mib", policy.bandwidth_mib, "a positive integer (MiB/s) or None")
    if not _positive_int(policy.downtime_ms):
        bad("downtime_ms", policy.downtime_ms, "a positive integer (ms)")
    if not _positive_int(policy.downtime_ceiling_ms):
        bad("downtime_ceiling_ms", policy.downtime_ceiling_ms, "a positive integer (ms)")
    elif _positive_int(policy.downtime_ms) and policy.downtime_ceiling_ms < policy.downtime_ms:
        bad(
            "downtime_ceiling_ms",
            policy.downtime_ceiling_ms,
            f"at least the initial downtime_ms ({policy.downtime_ms})",
        )
    for index, step in enumerate(policy.downtime_schedule):
        name = f"downtime_schedule[{index}]"
        if (step.after_seconds is None) == (step.after_passes is None):
            bad(name, step, "exactly one of after_seconds and after_passes")
        if step.after_seconds is not None and not (
            isinstance(step.after_seconds, (int, float)) and step.after_seconds >= 0
        ):
            bad(name, step.after_seconds, "after_seconds must not be negative")
        if step.after_passes is not None and not _positive_int(step.after_passes):
            bad(name, step.after_passes, "after_passes must be a positive integer")
        if not _positive_int(step.downtime_ms) or (
            _positive_int(policy.downtime_ceiling_ms)
            and step.downtime_ms > policy.downtime_ceiling_ms
        ):
            bad(name, step.downtime_ms, "a positive downtime no higher than the ceiling")
    if policy.stall is not None:
        if not _positive_number(policy.stall.window_seconds):
            bad("stall.window_seconds", policy.stall.window_seconds, "positive seconds")
        if not (
            isinstance(policy.stall.min_progress, (int, float))
            and 0 < policy.stall.min_progress < 1
        ):
            bad("stall.min_progress", policy.stall.min_progress, "a fraction between 0 and 1")
    if policy.seconds_per_gib is not None and not _positive_number(policy.seconds_per_gib):
        bad("seconds_per_gib", policy.seconds_per_gib, "positive seconds per GiB or None")
    for name in ("stall_actions", "deadline_actions"):
        for action in getattr(policy, name):
            if not isinstance(action, Action) or action is Action.DOWNTIME_STEP:
                allowed = ", ".join(a.value for a in Action if a is not Action.DOWNTIME_STEP)
                bad(name, action, f"actions from {allowed}")
    if policy.uses(Action.POSTCOPY) and not policy.capabilities.postcopy_ram:
        bad(
            "capabilities.postcopy_ram",
            False,
            "the postcopy action needs postcopy_ram enabled on both sides before migrate",
        )
    caps = policy.capabilities
    if not (1 <= caps.throttle_initial <= 99):
        bad("capabilities.throttle_initial", caps.throttle_initial, "1 to 99 percent")
    if not (1 <= caps.throttle_increment <= 100):
        bad("capabilities.throttle_increment", caps.throttle_increment, "1 to 100 percent")
    if caps.xbzrle and not _positive_int(caps.xbzrle_cache_mib):
        bad("capabilities.xbzrle_cache_mib", caps.xbzrle_cache_mib, "a positive MiB count")
    if caps.multifd and not (_positive_int(caps.multifd_channels) and caps.multifd_channels <= 255):
        bad("capabilities.multifd_channels", caps.multifd_channels, "1 to 255")
    if caps.multifd_compression is not None and not (
        caps.multifd and re.fullmatch(r"[a-z][a-z0-9-]{0,15}", str(caps.multifd_compression))
    ):
        bad(
            "capabilities.multifd_compression",
            caps.multifd_compression,
            "a QEMU multifd compression method (zlib, zstd, ...), with multifd on",
        )
    if caps.multifd and caps.postcopy_ram:
        bad("capabilities.multifd", True, "QEMU 7.2 cannot combine multifd with postcopy_ram")
    if not _positive_int(policy.max_bad_answers):
        bad("max_bad_answers", policy.max_bad_answers, "an integer, at least 1")
    for name in (
        "poll_interval",
        "retry_delay",
        "query_timeout",
        "cancel_timeout",
        "target_ready_timeout",
        "cleanup_timeout",
        "action_grace_seconds",
        "postcopy_recovery_seconds",
    ):
        if not _positive_number(getattr(policy, name)):
            bad(name, getattr(policy, name), "a positive number of seconds")
    return problems
