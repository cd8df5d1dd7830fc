"""The policy's judgement: from ``query-migrate`` samples to estimates and actions.

:class:`PolicyEngine` holds no I/O. It is fed every snapshot and answers with the
decisions to apply now (raise the downtime, throttle, switch to post-copy, pause, abort),
each with the evidence that led to it, so that it can be tested with numbers alone.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from kvmflow.migration.policy import Action, MigrationPolicy
from kvmflow.migration.status import MigrationSnapshot, MigrationStatus

#: A guest that dirties this share of the usable bandwidth or more cannot converge.
NOT_CONVERGING_SHARE = 0.95


@dataclass(frozen=True)
class Estimate:
    """Whether and when the migration can finish under the current limits."""

    converging: bool
    seconds_left: float | None
    bandwidth: float  # bytes/s the link carries now
    dirty_rate: float  # bytes/s the guest dirties
    remaining: int

    def __str__(self) -> str:
        if not self.converging:
            return "not converging"
        if self.seconds_left is None:
            return "unknown"
        return f"{self.seconds_left:.0f} s left"


@dataclass(frozen=True)
class Decision:
    """One thing the policy decided, why, and what it sets."""

    action: Action
    trigger: str  # "schedule", "stall", "deadline" or "prediction"
    evidence: str
    downtime_ms: int | None = None

    @property
    def name(self) -> str:
        return self.action.value


def estimate(
    snapshot: MigrationSnapshot, downtime_ms: int, bandwidth_limit: float | None
) -> Estimate | None:
    """Estimate convergence from one snapshot; ``None`` until there is evidence (the first
    pass gives no dirty rate)."""
    if snapshot.status is not MigrationStatus.ACTIVE or snapshot.dirty_sync_count < 2:
        return None
    bandwidth = snapshot.throughput_mbps * 1_000_000 / 8 or (bandwidth_limit or 0.0)
    dirty = float(snapshot.dirty_bytes_rate)
    remaining = snapshot.remaining
    budget = bandwidth * downtime_ms / 1000
    if remaining <= budget:
        return Estimate(True, 0.0, bandwidth, dirty, remaining)
    if bandwidth <= 0 or dirty >= NOT_CONVERGING_SHARE * bandwidth:
        return Estimate(False, None, bandwidth, dirty, remaining)
    return Estimate(True, (remaining - budget) / (bandwidth - dirty), bandwidth, dirty, remaining)


class PolicyEngine:
    """Applies one policy to one migration, sample by sample."""

    def __init__(self, policy: MigrationPolicy, memory_mib: int, started_at: float) -> None:
        self.policy = policy
        self.started_at = started_at
        self.downtime_ms = policy.downtime_ms
        self.deadline = policy.deadline_seconds(memory_mib)
        self.last_estimate: Estimate | None = None
        self.decisions: list[Decision] = []
        self._stall_index = 0
        self._deadline_index = 0
        self._last_action_at = -1e9
        self._window: deque[tuple[float, int]] = deque()
        self._throttling = policy.capabilities.auto_converge
        self._bandwidth_limit = (
            policy.bandwidth_mib * 1024 * 1024 if policy.bandwidth_mib is not None else None
        )

    @property
    def exhausted(self) -> bool:
        return self._stall_index >= len(self.policy.stall_actions)

    def observe(self, snapshot: MigrationSnapshot, now: float) -> list[Decision]:
        """Take one snapshot; return what to do now."""
        elapsed = now - self.started_at
        self.last_estimate = estimate(snapshot, self.downtime_ms, self._bandwidth_limit)
        if snapshot.status is not MigrationStatus.ACTIVE:
            return []
        decisions = self._schedule(snapshot, elapsed)
        if self.deadline is not None and elapsed >= self.deadline:
            decision = self._next(
                self.policy.deadline_actions,
                "deadline",
                f"{elapsed:.0f} s elapsed, deadline {self.deadline:.0f} s",
                now,
                deadline=True,
            )
            if decision:
                decisions.append(decision)
                return self._record(decisions)
        reason = self._stalled(snapshot, now) or self._predicted(elapsed)
        if reason is not None and now - self._last_action_at >= self.policy.action_grace_seconds:
            trigger, evidence = reason
            decision = self._next(self.policy.stall_actions, trigger, evidence, now)
            if decision:
                decisions.append(decision)
        return self._record(decisions)

    def _record(self, decisions: list[Decision]) -> list[Decision]:
        self.decisions.extend(decisions)
        return decisions

    def _schedule(self, snapshot: MigrationSnapshot, elapsed: float) -> list[Decision]:
        wanted = self.downtime_ms
        for step in self.policy.downtime_schedule:
            reached = (step.after_seconds is not None and elapsed >= step.after_seconds) or (
                step.after_passes is not None and snapshot.dirty_sync_count >= step.after_passes
            )
            if reached:
                wanted = max(wanted, step.downtime_ms)
        wanted = min(wanted, self.policy.downtime_ceiling_ms)
        if wanted <= self.downtime_ms:
            return []
        evidence = (
            f"{elapsed:.1f} s elapsed, pass {snapshot.dirty_sync_count}: "
            f"downtime {self.downtime_ms} -> {wanted} ms"
        )
        self.downtime_ms = wanted
        return [Decision(Action.DOWNTIME_STEP, "schedule", evidence, wanted)]

    def _stalled(self, snapshot: MigrationSnapshot, now: float) -> tuple[str, str] | None:
        rule = self.policy.stall
        if rule is None:
            return None
        window = self._window
        window.append((now, snapshot.remaining))
        while len(window) > 1 and now - window[1][0] >= rule.window_seconds:
            window.popleft()
        start, remaining_then = window[0]
        if now - start < rule.window_seconds or remaining_then <= 0:
            return None
        shrunk = (remaining_then - snapshot.remaining) / remaining_then
        if shrunk >= rule.min_progress:
            return None
        return "stall", (
            f"remaining {snapshot.remaining} B shrank {shrunk:.0%} in "
            f"{now - start:.0f} s (< {rule.min_progress:.0%})"
        )

    def _predicted(self, elapsed: float) -> tuple[str, str] | None:
        estimate = self.last_estimate
        if not self.policy.predict or estimate is None:
            return None
        if not estimate.converging:
            return "prediction", (
                f"dirty rate {estimate.dirty_rate / 2**20:.1f} MiB/s >= "
                f"{NOT_CONVERGING_SHARE:.0%} of bandwidth "
                f"{estimate.bandwidth / 2**20:.1f} MiB/s"
            )
        if (
            self.deadline is not None
            and estimate.seconds_left is not None
            and elapsed + estimate.seconds_left > self.deadline
        ):
            return "prediction", (
                f"estimated {estimate.seconds_left:.0f} s more would pass "
                f"the {self.deadline:.0f} s deadline"
            )
        return None

    def _next(
        self,
        actions: tuple[Action, ...],
        trigger: str,
        evidence: str,
        now: float,
        *,
        deadline: bool = False,
    ) -> Decision | None:
        index = self._deadline_index if deadline else self._stall_index
        while index < len(actions):
            action = actions[index]
            index += 1
            decision = self._make(action, trigger, evidence)
            if decision is not None:
                break
        else:
            decision = None
        if deadline:
            self._deadline_index = index
        else:
            self._stall_index = index
        if decision is not None:
            self._last_action_at = now
            self._window.clear()
        return decision

    def _make(self, action: Action, trigger: str, evidence: str) -> Decision | None:
        if action is Action.RAISE_DOWNTIME:
            raised = min(self.policy.downtime_ceiling_ms, self.downtime_ms * 2)
            if raised <= self.downtime_ms:
                return None  # already at the ceiling: on to the next action
            self.downtime_ms = raised
            return Decision(action, trigger, f"{evidence}; downtime -> {raised} ms", raised)
        if action is Action.AUTO_CONVERGE:
            if self._throttling:
                return None
            self._throttling = True
        return Decision(action, trigger, evidence)
