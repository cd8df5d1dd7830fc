"""Evacuating a node: where each instance goes, decided from capacities and the pre-check.

:func:`plan_moves` is a pure function of what each target has free and carries now and of
which moves the pre-check refuses, so it is tested with numbers alone;
:func:`refused_moves` asks the pre-check, and the engine gathers the figures and runs the
moves.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from kvmflow.errors import MigrationError
from kvmflow.instance.instance import Instance
from kvmflow.kvm.hypervisor import KvmHypervisor
from kvmflow.migration.compat import check_migration
from kvmflow.migration.policy import MigrationPolicy
from kvmflow.migration.results import MigrationResult


@dataclass
class EvacuationPlan:
    """Which instance goes where, and why some cannot go anywhere."""

    source: str
    moves: list[tuple[str, str, int]] = field(default_factory=list)  # instance, target, MiB
    unplaceable: list[tuple[str, str]] = field(default_factory=list)  # instance, reason
    capacity: dict[str, dict[str, int]] = field(default_factory=dict)


@dataclass
class EvacuationSummary:
    """What an evacuation did."""

    plan: EvacuationPlan
    moved: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    dry_run: bool = False
    results: dict[str, MigrationResult] = field(default_factory=dict)  # by instance moved

    @property
    def ok(self) -> bool:
        return not self.failed and not self.plan.unplaceable


@dataclass(frozen=True)
class Capacity:
    """What one target has: free memory (MiB) and how many instances it carries now."""

    free_mib: int
    instances: int


def plan_moves(
    source: str,
    instances: dict[str, int],
    capacity: dict[str, Capacity],
    refusals: Mapping[tuple[str, str], str] | None = None,
) -> EvacuationPlan:
    """Assign each instance (name -> MiB it needs) to a target, largest first: the least
    loaded target that has the memory, then the one with the most memory left. A target
    whose QEMU cannot take an instance (``refusals[(instance, target)]``, the pre-check's
    words) is never chosen for it."""
    refused = refusals or {}
    plan = EvacuationPlan(source)
    plan.capacity = {
        t: {"free_mib": c.free_mib, "instances": c.instances} for t, c in capacity.items()
    }
    free = {target: c.free_mib for target, c in capacity.items()}
    load = {target: c.instances for target, c in capacity.items()}
    for name, need in sorted(instances.items(), key=lambda item: -item[1]):
        able = [t for t in capacity if (name, t) not in refused]
        if not able:
            why = "; ".join(f"{t}: {refused[(name, t)]}" for t in capacity)
            plan.unplaceable.append((name, f"no target's QEMU can take it ({why})"))
            continue
        fitting = [t for t in able if free[t] >= need]
        if not fitting:
            have = ", ".join(f"{t}: {free[t]}" for t in capacity)
            plan.unplaceable.append((name, f"needs {need} MiB; no target has it free ({have})"))
            continue
        best = min(fitting, key=lambda t: (load[t], -free[t]))
        free[best] -= need
        load[best] += 1
        plan.moves.append((name, best, need))
    return plan


async def refused_moves(
    source: KvmHypervisor,
    instances: list[tuple[Instance, MigrationPolicy | None]],
    targets: list[KvmHypervisor],
) -> dict[tuple[str, str], str]:
    """The pre-check's refusal of each (instance, target) pair that cannot move, with its
    reasons (each instance under its policy, or its own hvparams' without one)."""
    refusals: dict[tuple[str, str], str] = {}
    for instance, policy in instances:
        wanted = policy or MigrationPolicy.from_hvparams(instance.spec.hvparams)
        for target in targets:
            key = (instance.name, target.node.name)
            try:
                problems = await check_migration(source, target, instance.name, wanted)
            except MigrationError as exc:  # not running: its migration would fail too
                refusals[key] = exc.reason
                continue
            if problems:
                refusals[key] = "; ".join(map(str, problems))
    return refusals
