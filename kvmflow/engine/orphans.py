"""Copies no journal entry explains, found by surveying every node after the entries are
settled: a second copy, a leftover migration target or stale ``postmigrate`` source, a
running guest the store has no record of, a recorded guest with no process.

Only copies that hold no guest state (``inmigrate``, ``postmigrate``, ``prelaunch``, files
left behind) are ever removed, and only with ``clean_orphans`` and once the copy the store
records is verified to hold the guest. Two copies that both hold the guest are never
touched: that is for an operator.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvmflow.engine.reality import Copy, survey
from kvmflow.engine.resolve import keep_only
from kvmflow.engine.verdicts import RecoveryReport, Verdict
from kvmflow.errors import InstanceBusyError, KvmflowError

if TYPE_CHECKING:
    from kvmflow.engine.recovery import Recovery


async def find_orphans(recovery: Recovery, *, skip: set[str]) -> list[RecoveryReport]:
    """Reports for every instance (except ``skip``: entries still open) whose copies and
    record disagree; acts only as the module says."""
    store = recovery.store
    only = recovery.only_nodes
    placements = {p.instance: p for p in await store.placements() if only is None or p.node in only}
    hypervisors = {n: hv for n, hv in recovery.hypervisors.items() if only is None or n in only}
    found = await survey(hypervisors, placements)
    reports: list[RecoveryReport] = []
    for name in sorted(set(found) | set(placements)):
        if name in skip or await store.holder(name) is not None:
            continue  # an operation (or an open entry) owns it
        copies = found.get(name, [])
        placed = placements.get(name)
        holding = [c for c in copies if c.holds_guest]
        leftovers = [c for c in copies if not c.holds_guest]
        if len(holding) > 1:
            if name in recovery.resolve and not recovery.dry_run:
                reports.append(await _resolved(recovery, name, recovery.resolve[name]))
                continue
            nodes = ", ".join(f"{c.node} ({c.state})" for c in holding)
            reports.append(
                RecoveryReport(
                    name,
                    Verdict.AMBIGUOUS,
                    f"two copies hold the guest: {nodes} (--resolve {name}=NODE keeps one)",
                )
            )
            continue
        home = holding[0] if holding else None
        if home is not None and (placed is None or placed.node != home.node):
            reports.append(await _record(recovery, name, home, placed.node if placed else None))
        if home is None and placed is not None:
            files = [f for c in copies if c.node == placed.node for f in c.stale_files]
            detail = f"the store says it runs on {placed.node}; no process does"
            reports.append(
                RecoveryReport(
                    name,
                    Verdict.CRASHED,
                    detail + (f" (files left: {', '.join(files)})" if files else ""),
                )
            )
        for copy in leftovers:
            if home is None or copy.node == home.node:
                if copy.alive or placed is None or copy.node != placed.node:
                    reports.append(_orphan(name, copy, "no copy holds the guest"))
                continue
            reports.append(await _leftover(recovery, name, copy, home))
    return reports


def _orphan(name: str, copy: Copy, why: str) -> RecoveryReport:
    return RecoveryReport(name, Verdict.ORPHAN, f"{copy.state} copy on {copy.node}: {why}")


async def _leftover(recovery: Recovery, name: str, copy: Copy, home: Copy) -> RecoveryReport:
    """A copy holding nothing beside the copy that holds the guest: removed if asked."""
    why = f"the guest runs on {home.node} ({home.state})"
    if not recovery.clean_orphans or recovery.dry_run:
        return _orphan(name, copy, why + "; --clean-orphans removes it")
    hv = recovery.hypervisor(copy.node)
    try:
        if copy.alive:
            await hv.stop(name, force=True)
        else:
            await hv.cleanup(name)
    except KvmflowError as exc:
        return RecoveryReport(name, Verdict.FAILED, f"the {copy.state} copy on {copy.node}: {exc}")
    return RecoveryReport(name, Verdict.ORPHAN_REMOVED, f"{copy.state} copy on {copy.node}; {why}")


async def _resolved(recovery: Recovery, name: str, node: str) -> RecoveryReport:
    """Two copies hold the guest and the operator said which one is real."""
    try:
        async with recovery.guard.hold(name, "resolve", {"node": node}) as held:
            detail = await keep_only(name, node, recovery.hypervisors)
            held.place(node)
            held.outcome = detail
    except InstanceBusyError as exc:
        return RecoveryReport(name, Verdict.IN_FLIGHT, str(exc))
    except KvmflowError as exc:
        return RecoveryReport(name, Verdict.FAILED, str(exc))
    return RecoveryReport(name, Verdict.RESOLVED, detail, runs_on=node)


async def _record(
    recovery: Recovery, name: str, home: Copy, recorded: str | None
) -> RecoveryReport:
    """Exactly one copy holds the guest and the store says otherwise: record where it runs
    (under a lease of its own, fenced like any write)."""
    said = f"the store said {recorded}" if recorded else "the store had no record"
    if recovery.dry_run:
        return RecoveryReport(name, Verdict.WOULD, f"record it on {home.node} ({said})")
    try:
        async with recovery.guard.hold(name, "record", {"node": home.node}) as held:
            held.place(home.node)
    except InstanceBusyError as exc:
        return RecoveryReport(name, Verdict.IN_FLIGHT, str(exc))
    return RecoveryReport(
        name, Verdict.RECORDED, f"runs on {home.node} ({said})", runs_on=home.node
    )
