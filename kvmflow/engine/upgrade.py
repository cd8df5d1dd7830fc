"""A rolling upgrade of one node: drain it, upgrade its QEMU, verify it, bring guests back.

This is why fleets live-migrate: a node's guests move away (the evacuation plans only
targets whose QEMU passes the pre-check), the operator's upgrade command runs on the node
over its own connection, the node's QEMU is probed afresh (a binary that no longer runs
stops the upgrade there, with the guests safe elsewhere), and the chosen guests migrate back
onto the new QEMU, each under its own journal entry and lease like any migration.

With the engine's guard, the node itself is held for the whole upgrade (the lease
``node/NAME``, which no instance name can take), so that two controllers never upgrade one
node at once; its journal entry records each stage.

=============  ==========================================================================
stage          what holds
=============  ==========================================================================
intent         nothing moved yet
evacuated      the node runs no guest (every move succeeded)
upgraded       the command succeeded and the node's QEMU answered its probe (versions)
returned       the chosen guests migrated back (the entry closes with the outcome)
=============  ==========================================================================

A failure at any stage stops there and raises :class:`UpgradeError`; nothing later runs,
and every guest runs somewhere, once.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvmflow.engine.evacuation import EvacuationSummary
from kvmflow.errors import KvmflowError, UpgradeError
from kvmflow.instance.guard import HeldOperation
from kvmflow.migration.policy import MigrationPolicy
from kvmflow.migration.results import MigrationResult

if TYPE_CHECKING:
    from kvmflow.engine.engine import Engine

#: The store key a node's upgrade holds: instance names cannot contain "/".
NODE_LEASE_PREFIX = "node/"
OPERATION = "upgrade-node"


@dataclass
class UpgradeReport:
    """What a node's upgrade did: where its guests went, the QEMU before and after, and
    which came back."""

    node: str
    qemu_before: str
    evacuation: EvacuationSummary
    qemu_after: str = ""
    command_output: str = ""
    returned: dict[str, MigrationResult] = field(default_factory=dict)
    not_returned: dict[str, str] = field(default_factory=dict)  # instance -> why


async def upgrade_node(
    engine: Engine,
    node: str,
    command: list[str],
    *,
    targets: list[str] | None = None,
    bring_back: bool | Collection[str] = True,
    policy: MigrationPolicy | None = None,
    command_timeout: float = 1800.0,
) -> UpgradeReport:
    """Drain ``node`` onto ``targets`` (default: every other node), run ``command`` on it
    (no shell; e.g. ``["apt-get", "install", "-y", "qemu-system-x86"]``), verify its QEMU,
    then migrate back the guests ``bring_back`` names (``True``: all that left)."""
    if not command:
        raise UpgradeError(f"upgrade of {node}: no command given")
    entry = engine.node(node)
    hypervisor = entry.hypervisor
    targets = targets if targets is not None else [n for n in engine.nodes if n != node]
    async with _held(engine, node, {"command": command, "targets": targets}) as held:
        before = await hypervisor.qemu()
        summary = await engine.evacuate(node, targets, policy=policy)
        report = UpgradeReport(node, before.version_text, summary)
        left = await hypervisor.list_instances()
        if not summary.ok or left:
            problems = [f"{i}: {why}" for i, why in summary.plan.unplaceable + summary.failed]
            problems += [f"{name}: still runs there" for name in left if name not in problems]
            raise UpgradeError(
                f"{node} was not drained, so it was not upgraded: " + "; ".join(problems)
            )
        await _phase(held, "evacuated", {"moved": dict(summary.moved)})
        result = await hypervisor.node.run(command, timeout=command_timeout)
        report.command_output = (result.stdout + result.stderr).decode(errors="replace")[-4000:]
        if not result.ok:
            raise UpgradeError(
                f"the upgrade command failed on {node} (its guests stay where they went): "
                f"{result.error_text()[-800:]}"
            )
        hypervisor.forget_qemu()
        try:
            after = await hypervisor.qemu()
        except KvmflowError as exc:
            raise UpgradeError(
                f"{node}'s QEMU does not run after the upgrade (its guests stay where they "
                f"went): {exc}"
            ) from exc
        report.qemu_after = after.version_text
        await _phase(held, "upgraded", {"before": before.version_text, "after": after.version_text})
        wanted = {name for name, _ in summary.moved}
        if bring_back is not True:
            wanted &= set(bring_back or ())
        tickets = [engine.submit_migration(name, node, policy=policy) for name in sorted(wanted)]
        for ticket in tickets:
            try:
                report.returned[ticket.instance.name] = await ticket.wait()
            except KvmflowError as exc:
                report.not_returned[ticket.instance.name] = str(exc)
        await _phase(held, "returned", {"returned": sorted(report.returned)})
        if held is not None and report.not_returned:
            held.outcome = f"upgraded; not returned: {', '.join(sorted(report.not_returned))}"
        return report


@contextlib.asynccontextmanager
async def _held(
    engine: Engine, node: str, details: dict[str, Any]
) -> AsyncIterator[HeldOperation | None]:
    if engine.guard is None:
        yield None
        return
    async with engine.guard.hold(NODE_LEASE_PREFIX + node, OPERATION, details) as held:
        yield held


async def _phase(held: HeldOperation | None, phase: str, details: dict[str, Any]) -> None:
    if held is not None:
        await held.phase(phase, details)
