"""The commands that read and act on the store of record, from any shell: ``list`` (every
copy of every instance, and what disagrees), ``jobs`` (operations in flight), ``abort``
(ask an operation's owner to cancel) and ``recover`` (after a controller died)."""

from __future__ import annotations

import os
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any

import anyio

from kvmflow.cli.context import EXIT_FAILED, EXIT_OK, Context, make_table
from kvmflow.engine.failover import failover
from kvmflow.engine.reality import Copy, survey
from kvmflow.engine.recovery import Recovery
from kvmflow.errors import FieldProblem, KvmflowError, MisuseError, ValidationError
from kvmflow.node.power import is_this_machine, powercycle
from kvmflow.store.base import JournalEntry, Lease, Placement

#: How long ``kvmflow abort`` waits for the owner to finish cleaning up.
ABORT_WAIT_SECONDS = 120.0


def disagreements(copies: list[Copy], placed: Placement | None) -> list[str]:
    """What ``list`` flags about one instance: its copies against the store's record."""
    holding = [c for c in copies if c.holds_guest]
    flags = []
    if len(holding) > 1:
        flags.append("TWO COPIES: " + ", ".join(f"{c.node} {c.state}" for c in holding))
    for copy in holding:
        if placed is None or copy.node != placed.node:
            flags.append(f"copy on {copy.node} not in the store")
    if placed is not None and not any(c.node == placed.node for c in holding):
        files = [f for c in copies if c.node == placed.node for f in c.stale_files]
        flags.append(
            f"recorded on {placed.node}, no process there"
            + (f" (crashed; files left: {', '.join(files)})" if files else "")
        )
    for copy in copies:
        if not copy.holds_guest and copy.alive:
            flags.append(f"{copy.state} copy on {copy.node} (a migration left it?)")
    return flags


async def cmd_list(ctx: Context, view: ListView | None = None) -> int:
    view = view or ListView()
    async with ctx.guard() as guard:
        store = guard.store
        placements = {p.instance: p for p in await store.placements()}
        found = await survey(ctx.hypervisors, set(ctx.config.instances) | set(placements))
        rows: list[dict[str, Any]] = []
        for name in sorted(set(ctx.config.instances) | set(placements) | set(found)):
            copies = found.get(name, [])
            placed = placements.get(name)
            holder = await store.holder(name)
            holding = [c for c in copies if c.holds_guest]
            home = holding[0] if len(holding) == 1 else None
            info = await ctx.hypervisors[home.node].info(name) if home else None
            rows.append(
                {
                    "instance": name,
                    "state": _state(copies, placed),
                    "node": home.node if home else (placed.node if placed else None),
                    "recorded_node": placed.node if placed else None,
                    "pid": home.pid if home else None,
                    "memory_mib": info.memory_mib if info else None,
                    "vcpus": info.vcpus if info else None,
                    "tags": list(ctx.config.instances[name].spec.tags)
                    if name in ctx.config.instances
                    else [],
                    "copies": [_copy_row(c) for c in copies],
                    "operation": _holder_text(holder),
                    "flags": disagreements(copies, placed),
                }
            )
    rows = [row for row in rows if view.shows(row)]
    if ctx.as_json:
        ctx.emit([{f: row[f] for f in view.fields} for row in rows] if view.chosen else rows)
        return EXIT_OK
    lines = [[_cell(row[field]) for field in view.fields] for row in rows]
    if view.separator is not None:
        if view.headers:
            print(view.separator.join(view.fields))
        for line in lines:
            print(view.separator.join(line))
        return EXIT_OK
    table = make_table(*view.fields, show_header=view.headers)
    for line in lines:
        table.add_row(*line)
    ctx.emit(rows, table if rows else None, "no instances to show (--all shows stopped ones)")
    return EXIT_OK


#: What ``list -o`` may show, and what it shows by default.
LIST_FIELDS = (
    "instance",
    "state",
    "node",
    "recorded_node",
    "pid",
    "memory_mib",
    "vcpus",
    "tags",
    "copies",
    "operation",
    "flags",
)
DEFAULT_LIST_FIELDS = ("instance", "state", "node", "copies", "operation", "flags")


@dataclass(frozen=True)
class ListView:
    """Which rows and columns ``list`` prints, and how (``gnt-instance list`` habits)."""

    all: bool = False  # also instances that are stopped and need nothing
    fields: tuple[str, ...] = DEFAULT_LIST_FIELDS
    chosen: bool = False  # -o was given (JSON keeps only those keys then)
    headers: bool = True
    separator: str | None = None  # plain lines instead of a table
    node: str | None = None
    tag: str | None = None

    @classmethod
    def parse(cls, fields: str | None, **options: Any) -> ListView:
        if fields is None:
            return cls(**options)
        chosen = tuple(f.strip() for f in fields.split(",") if f.strip())
        unknown = [f for f in chosen if f not in LIST_FIELDS]
        if unknown or not chosen:
            raise ValidationError(
                [FieldProblem("-o", fields, f"fields among {', '.join(LIST_FIELDS)}")]
            )
        return cls(fields=chosen, chosen=True, **options)

    def shows(self, row: dict[str, Any]) -> bool:
        if not self.all and row["state"] == "stopped" and not row["copies"] and not row["flags"]:
            return False
        if self.node is not None and self.node not in (
            row["node"],
            *(copy["node"] for copy in row["copies"]),
        ):
            return False
        return self.tag is None or self.tag in row["tags"]


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        parts = [
            f"{item['node']}:{item['state']}" if isinstance(item, dict) else str(item)
            for item in value
        ]
        return "; ".join(parts) if parts else "-"
    return str(value)


def _state(copies: list[Copy], placed: Placement | None) -> str:
    holding = [c for c in copies if c.holds_guest]
    if len(holding) > 1:
        return "two-copies"
    if holding:
        return holding[0].state.value
    if placed is not None:
        return "failed"  # recorded as running, and nothing runs
    alive = [c for c in copies if c.alive]
    return alive[0].state.value if alive else "stopped"


def _copy_row(copy: Copy) -> dict[str, Any]:
    return {
        "node": copy.node,
        "state": copy.state.value,
        "pid": copy.pid,
        "migration": copy.migration,
        "stale_files": list(copy.stale_files),
    }


def _holder_text(lease: Lease | None) -> str | None:
    if lease is None:
        return None
    gone = lease.expires_at <= time.time() or lease.owner.alive() is False
    return f"{lease.operation} by {lease.owner}" + (" (owner gone: recover)" if gone else "")


async def cmd_verify(ctx: Context) -> int:
    """A fleet check, as ``gnt-cluster verify``: every node reachable, every instance
    running exactly once where the store records it, no stale files, no leftover copies,
    no operation whose owner is gone. Exit 1 on any finding."""
    findings: list[dict[str, str]] = []
    for name, hv in ctx.hypervisors.items():
        try:
            await hv.node.list_dir(hv.paths.root)
        except KvmflowError as exc:
            findings.append({"subject": f"node {name}", "finding": f"unreachable: {exc}"})
    async with ctx.guard() as guard:
        store = guard.store
        placements = {p.instance: p for p in await store.placements()}
        found = await survey(ctx.hypervisors, set(placements))
        for name in sorted(set(placements) | set(found)):
            for flag in disagreements(found.get(name, []), placements.get(name)):
                findings.append({"subject": f"instance {name}", "finding": flag})
        for entry in await store.unfinished():
            row = _job_row(entry, await store.holder(entry.instance))
            if not row["owner_alive"]:
                findings.append(
                    {
                        "subject": f"instance {entry.instance}",
                        "finding": f"{entry.operation} left open at {entry.phase} by "
                        f"{row['owner']}, who is gone: run kvmflow recover",
                    }
                )
    table = make_table("subject", "finding")
    for finding in findings:
        table.add_row(finding["subject"], finding["finding"])
    nodes = len(ctx.hypervisors)
    ctx.emit(
        findings,
        table if findings else None,
        f"fleet verified: {nodes} node(s), {len(placements)} recorded instance(s), no findings",
    )
    return EXIT_FAILED if findings else EXIT_OK


async def cmd_powercycle(
    ctx: Context, node: str, *, confirmed: bool, allow_this_machine: bool
) -> int:
    """Power-cycle a node (the fence of last resort) and record the fence in the store."""
    hv = ctx.hypervisor(node)
    if is_this_machine(hv.node) and not allow_this_machine:
        raise MisuseError(
            f"node {node} is the machine kvmflow runs on; pass --allow-this-machine to "
            "power-cycle it anyway"
        )
    if not confirmed:
        if not sys.stdin.isatty():
            raise ValidationError(
                [FieldProblem("--yes", False, "needed to power-cycle a node off a terminal")]
            )
        typed = await anyio.to_thread.run_sync(
            input, f"power-cycle {node} now (an immediate reset)? type its name to confirm: "
        )
        if typed.strip() != node:
            raise MisuseError(f"not confirmed ({typed.strip()!r} is not {node!r}); nothing done")
    async with ctx.guard() as guard:
        await powercycle(hv.node, allow_this_machine=allow_this_machine)
        fence = await guard.store.record_fence(node, str(guard.owner), "powercycle")
    ctx.emit(
        {"node": node, "fenced_at": fence.at, "how": fence.how},
        text=f"power-cycled {node}; recorded as fenced (failover may now start its instances)",
    )
    return EXIT_OK


async def cmd_failover(ctx: Context, name: str, target: str, *, node_is_down: bool) -> int:
    ctx.hypervisor(target)
    async with ctx.guard() as guard:
        info = await failover(
            ctx.spec(name),
            target,
            ctx.hypervisors,
            guard,
            node_is_down=node_is_down,
            by=str(guard.owner),
        )
    ctx.emit(
        {"instance": name, "node": target, "pid": info.pid},
        text=f"failed {name} over to {target} (pid {info.pid})",
    )
    return EXIT_OK


async def cmd_jobs(ctx: Context) -> int:
    async with ctx.guard() as guard:
        store = guard.store
        rows = []
        for entry in await store.unfinished():
            holder = await store.holder(entry.instance)
            rows.append(_job_row(entry, holder))
    table = make_table("instance", "operation", "phase", "owner", "age", "progress")
    for row in rows:
        table.add_row(
            row["instance"],
            row["operation"],
            row["phase"],
            row["owner"] + ("" if row["owner_alive"] else " (gone: run kvmflow recover)"),
            f"{row['age_seconds']:.0f} s",
            row["progress_text"],
        )
    ctx.emit(rows, table if rows else None, "no operations in flight")
    return EXIT_OK


def _job_row(entry: JournalEntry, holder: Lease | None) -> dict[str, Any]:
    ours = holder is not None and holder.token == entry.token
    alive = (
        holder is not None and holder.expires_at > time.time() and holder.owner.alive() is not False
    )
    progress = entry.progress or {}
    text = "-"
    if progress.get("disk_total"):  # local disks copying, before RAM streams
        share = 100 * (progress.get("disk_copied") or 0) / progress["disk_total"]
        text = f"copying disks {share:.0f}% of {progress['disk_total'] >> 20} MiB"
    elif progress:
        total = progress.get("total") or 0
        done = total - (progress.get("remaining") or 0)
        share = f" {100 * done / total:.0f}%" if total else ""
        text = f"{progress.get('status', '?')}{share}, {progress.get('mbps', 0):.0f} Mbit/s"
    owner = holder.owner if holder is not None else entry.owner
    return {
        "instance": entry.instance,
        "operation": entry.operation,
        "phase": entry.phase,
        "owner": str(owner),
        "owner_alive": alive,
        "recovering": holder is not None and not ours,
        "age_seconds": round(time.time() - entry.started_at, 1),
        "source": entry.details.get("source") or entry.details.get("node"),
        "target": entry.details.get("target"),
        "progress": progress,
        "progress_text": text,
    }


async def cmd_abort(ctx: Context, name: str, *, wait: float = ABORT_WAIT_SECONDS) -> int:
    async with ctx.guard() as guard:
        store = guard.store
        lease = await store.holder(name)
        if lease is not None and (lease.expires_at <= time.time() or lease.owner.alive() is False):
            raise MisuseError(
                f"{lease.operation} of {name} has no live owner ({lease.owner} is gone): "
                "run kvmflow recover --abort"
            )
        asked = await store.request_cancel(
            name, f"kvmflow abort (pid {os.getpid()} on {socket.gethostname()})"
        )
        with anyio.move_on_after(wait):
            while True:
                now = await store.holder(name)
                if now is None or now.token != asked.token:
                    break
                await anyio.sleep(0.1)  # the store can only be polled
        ended = now is None or now.token != asked.token
        history = [e for e in await store.history(name) if e.token == asked.token]
    outcome = history[-1].outcome if history else None
    data = {"instance": name, "operation": asked.operation, "ended": ended, "outcome": outcome}
    if not ended:
        ctx.emit(
            data,
            text=f"asked {asked.owner} to abort {asked.operation} of {name}; "
            f"it has not ended after {wait:g} s",
        )
        return EXIT_FAILED
    ctx.emit(data, text=f"{asked.operation} of {name} ended: {outcome or 'closed'}")
    return EXIT_OK


async def cmd_recover(
    ctx: Context,
    *,
    dry_run: bool,
    abort: bool,
    clean_orphans: bool,
    resolve: dict[str, str] | None = None,
) -> int:
    async with ctx.guard() as guard:
        recovery = Recovery(
            ctx.hypervisors,
            guard,
            abort=abort,
            dry_run=dry_run,
            clean_orphans=clean_orphans,
            resolve=resolve,
        )
        reports = await recovery.run()
    rows = [
        {
            "instance": r.instance,
            "verdict": r.verdict.value,
            "detail": r.detail,
            "operation": r.operation,
            "phase": r.phase,
            "runs_on": r.runs_on,
            "entry": r.entry,
        }
        for r in reports
    ]
    table = make_table("instance", "operation", "phase", "verdict", "runs on", "detail")
    for r in reports:
        table.add_row(
            r.instance,
            r.operation or "-",
            r.phase or "-",
            r.verdict.value,
            r.runs_on or "-",
            r.detail,
        )
    ctx.emit(rows, table if rows else None, "nothing to recover: the store and the nodes agree")
    return EXIT_OK if all(r.ok for r in reports) else EXIT_FAILED
