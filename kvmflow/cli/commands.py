"""What each ``kvmflow`` subcommand does, on top of the library (no sockets here); what
the commands share is in :mod:`kvmflow.cli.context`."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from typing import Any

from kvmflow.cli.context import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_PARTIAL,
    Context,
    make_table,
    with_progress,
)
from kvmflow.cli.progress import human_bytes
from kvmflow.engine import Engine, Limits
from kvmflow.engine.reality import look
from kvmflow.errors import ConfigError, FieldProblem, MisuseError, ValidationError
from kvmflow.instance import Instance, InstanceState
from kvmflow.kvm.console import BUSY_EXIT
from kvmflow.migration import MigrationPolicy
from kvmflow.migration.compat import check_migration
from kvmflow.monitor import hmp_via_qmp


async def cmd_info(ctx: Context, name: str) -> int:
    """The full picture of one instance, running or not: its description (the running
    copy's own, else the configuration's), where it runs, is configured and is recorded, its
    run state, its sockets and the operation in flight with its phase."""
    async with ctx.guard() as guard:
        hv = await ctx.locate(name, guard)
        copy = await look(hv, name)  # over HMP: a migration in flight holds QMP
        holder = await guard.store.holder(name)
        placed = await guard.store.placement(name)
        open_entries = [e for e in await guard.store.unfinished() if e.instance == name]
        runtime = await hv.load_runtime(name) if copy is not None and copy.alive else None
    configured = ctx.config.instances.get(name)
    # The running copy's own description, else the configuration's (or the usual error).
    spec = runtime.spec if runtime is not None else ctx.spec(name)
    running = copy is not None and copy.holds_guest
    data: dict[str, Any] = {
        "instance": name,
        "running": running,
        "run_state": copy.state.value if copy is not None else "stopped",
        "node": hv.node.name if running else None,
        "configured_node": configured.node if configured else None,
        "recorded_node": placed.node if placed else None,
        "pid": copy.pid if copy is not None else None,
        "migration": copy.migration if copy is not None else None,
        "operation": f"{holder.operation} by {holder.owner}" if holder else None,
        "phase": open_entries[-1].phase if open_entries else None,
        **{k: v for k, v in spec.to_dict().items() if k != "name"},
        "qmp_socket": hv.paths.qmp_socket(name),
        "hmp_socket": hv.paths.hmp_socket(name),
        "serial_socket": hv.paths.serial_socket(name),
        "stale_files": list(copy.stale_files) if copy is not None else [],
    }
    table = make_table("field", "value")
    for key, value in data.items():
        table.add_row(key, json.dumps(value) if isinstance(value, dict | list) else str(value))
    ctx.emit(data, table)
    return EXIT_OK


async def cmd_start(ctx: Context, name: str) -> int:
    spec = ctx.spec(name)
    async with ctx.guard() as guard:
        # Where it last ran (the store), else where the configuration puts a first start.
        placed = await guard.store.placement(name)
        node = placed.node if placed is not None else ctx.config.instances[name].node
        hv = ctx.hypervisor(node)
        instance = Instance(spec, hv, guard=guard)
        info = await instance.start(peers=list(ctx.hypervisors.values()))
    ctx.emit(
        {"instance": name, "node": hv.node.name, "pid": info.pid},
        text=f"started {name} on {hv.node.name} (pid {info.pid})",
    )
    return EXIT_OK


async def cmd_stop(ctx: Context, name: str, *, force: bool, timeout: float) -> int:
    if timeout < 0:
        raise ValidationError([FieldProblem("--timeout", timeout, "0 or more seconds")])
    async with ctx.guard() as guard:
        hv = await ctx.locate(name, guard)
        instance = Instance(ctx.spec(name), hv, InstanceState.RUNNING, guard=guard)
        if not await hv.is_running(name):
            async with instance.operation("stop") as held:
                await hv.cleanup(name)
                if held is not None:
                    held.place(None)
            ctx.emit(
                {"instance": name, "stopped": True, "was_running": False},
                text=f"{name} was not running; cleaned up",
            )
            return EXIT_OK
        ctx.say_waiting(instance, force=force, timeout=timeout)
        await instance.stop(force=force, timeout=timeout)
    ctx.emit(
        {"instance": name, "stopped": True, "was_running": True},
        text=f"stopped {name} on {hv.node.name}",
    )
    return EXIT_OK


async def cmd_reboot(ctx: Context, name: str, *, force: bool, timeout: float) -> int:
    if timeout < 0:
        raise ValidationError([FieldProblem("--timeout", timeout, "0 or more seconds")])
    async with ctx.guard() as guard:
        hv = await ctx.locate(name, guard)
        if not await hv.is_running(name):
            raise MisuseError(f"{name} is not running on {hv.node.name}; start it instead")
        instance = Instance(ctx.spec(name), hv, InstanceState.RUNNING, guard=guard)
        ctx.say_waiting(instance, force=force, timeout=timeout)
        info = await instance.reboot(force=force, timeout=timeout)
    ctx.emit(
        {"instance": name, "node": hv.node.name, "pid": info.pid},
        text=f"rebooted {name} on {hv.node.name} (pid {info.pid})",
    )
    return EXIT_OK


async def cmd_pause_resume(ctx: Context, name: str, pause: bool) -> int:
    async with ctx.guard() as guard:
        hv = await ctx.locate(name, guard)
        if not await hv.is_running(name):
            raise MisuseError(f"{name} is not running on {hv.node.name}")
        instance = await Instance.attach(ctx.spec(name), hv)
        instance.guard = guard
        await (instance.pause() if pause else instance.resume())
    verb = "paused" if pause else "resumed"
    ctx.emit(
        {"instance": name, "node": hv.node.name, "state": instance.machine.state.value},
        text=f"{verb} {name} on {hv.node.name}",
    )
    return EXIT_OK


async def cmd_monitor(
    ctx: Context, name: str, *, qmp_command: str | None, arguments: str | None, hmp_line: str | None
) -> int:
    hv = await ctx.locate(name)
    if not await hv.is_running(name):
        raise MisuseError(f"{name} is not running; start it first")
    async with hv.qmp(name, command_timeout=30) as qmp:
        if hmp_line is not None:
            output = await hmp_via_qmp(qmp, hmp_line)  # an HMP error is an error (exit 1)
            ctx.emit({"output": output}, text=output)
            return EXIT_OK
        assert qmp_command is not None
        try:
            args = json.loads(arguments) if arguments else None
        except json.JSONDecodeError as exc:
            raise ValidationError(
                [FieldProblem("--args", arguments, f"a JSON object ({exc})")]
            ) from exc
        if args is not None and not isinstance(args, dict):
            raise ValidationError([FieldProblem("--args", arguments, "a JSON object")])
        result = await qmp.execute(qmp_command, args)
    print(json.dumps(result, indent=None if ctx.as_json else 2))
    return EXIT_OK


def console_command(ctx: Context, name: str) -> int:
    """Attach this terminal to the instance's serial console until Ctrl-] (or the end of
    the copy), then say how it ended: detached, the guest migrated away, or it stopped."""
    hv = ctx.located_running(name)
    if hv is None:
        raise MisuseError(f"{name} is not running; start it first")
    terminal = sys.stdin.isatty()
    command = hv.console(ctx.spec(name), terminal=terminal)
    if isinstance(command, str):
        ctx.console.print(command, markup=False, highlight=False)
        return EXIT_FAILED
    if ctx.as_json:
        print(json.dumps({"command": command}))
        return EXIT_OK
    if terminal:
        print(f"kvmflow: console of {name} on {hv.node.name}; Ctrl-] detaches", file=sys.stderr)
    ended = subprocess.run(command, check=False)
    if ended.returncode == BUSY_EXIT:
        raise MisuseError(
            f"another console is attached to {name} on {hv.node.name} (one at a time): "
            "detach that one first"
        )
    now = ctx.located_running(name)
    if now is None:
        print(f"kvmflow: {name} stopped; the console ended", file=sys.stderr)
    elif now.node.name != hv.node.name:
        print(
            f"kvmflow: {name} migrated to {now.node.name}; the console ended there "
            f"(kvmflow console {name} attaches again)",
            file=sys.stderr,
        )
    elif ended.returncode != 0:
        raise MisuseError(f"the console of {name} failed (exit {ended.returncode})")
    return EXIT_OK


async def cmd_node_info(ctx: Context, node: str | None) -> int:
    names = [node] if node else list(ctx.hypervisors)
    rows = []
    for name in names:
        hv = ctx.hypervisor(name)
        info = await hv.node_info()
        qemu = await hv.qemu()
        rows.append(
            {
                "node": name,
                **asdict(info),
                "qemu_binary": qemu.binary,
                "qemu_version": qemu.version_text,
                "default_machine": qemu.resolve_machine(None),
            }
        )
    table = make_table(
        "node", "memory total", "free", "used by node", "cpus", "sockets", "numa", "qemu"
    )
    for row in rows:
        table.add_row(
            row["node"],
            f"{row['memory_total_mib']} MiB",
            f"{row['memory_free_mib']} MiB",
            f"{row['memory_used_by_node_mib']} MiB",
            str(row["cpu_count"]),
            str(row["cpu_sockets"]),
            str(row["numa_nodes"]),
            f"{row['qemu_version']} ({row['default_machine']})",
        )
    ctx.emit(rows, table)
    return EXIT_OK


async def cmd_migrate(
    ctx: Context, name: str, target: str, *, live: bool, policy: MigrationPolicy, progress: bool
) -> int:
    hv = await ctx.locate(name)
    ctx.hypervisor(target)
    if not await hv.is_running(name):
        raise MisuseError(f"{name} is not running; nothing to migrate")
    async with ctx.guard() as guard, ctx.engine(policy, guard=guard) as engine:
        engine.add_instance(Instance(ctx.spec(name), hv, InstanceState.RUNNING))
        result = await with_progress(
            ctx,
            engine,
            lambda: engine.submit_migration(name, target, live=live).wait(),
            enabled=progress,
        )
    data = {
        "instance": name,
        "source": result.source,
        "target": result.target,
        "seconds": round(result.elapsed, 3),
        "downtime_ms": result.downtime_ms,
        "transferred": result.final.transferred,
        "actions": [d.name for d in result.decisions],
    }
    ctx.emit(
        data,
        text=(
            f"migrated {name} {result.source} -> {result.target} in "
            f"{result.elapsed:.1f} s, downtime {result.downtime_ms} ms"
        ),
    )
    return EXIT_OK


async def cmd_migrate_check(ctx: Context, name: str, target: str, policy: MigrationPolicy) -> int:
    """The pre-check of a migration alone: exit 0 when the target can take the instance,
    1 with every reason (and its fix) when it cannot."""
    hv = await ctx.locate(name)
    target_hv = ctx.hypervisor(target)
    problems = await check_migration(hv, target_hv, name, policy)
    source_qemu, target_qemu = await hv.qemu(), await target_hv.qemu()
    data = {
        "instance": name,
        "source": hv.node.name,
        "target": target,
        "source_qemu": source_qemu.version_text,
        "target_qemu": target_qemu.version_text,
        "compatible": not problems,
        "problems": [{"what": p.what, "fix": p.fix} for p in problems],
    }
    head = (
        f"{name}: {hv.node.name} (QEMU {source_qemu.version_text}) -> {target} "
        f"(QEMU {target_qemu.version_text})"
    )
    if not problems:
        ctx.emit(data, text=f"{head}: the target can take it")
        return EXIT_OK
    lines = [f"{head}: the target cannot take it"]
    lines += [f"  - {p.what}\n    fix: {p.fix}" for p in problems]
    ctx.emit(data, text="\n".join(lines))
    return EXIT_FAILED


async def cmd_evacuate(
    ctx: Context,
    node: str,
    targets: list[str],
    *,
    dry_run: bool,
    policy: MigrationPolicy | None,
    limits: Limits,
    progress: bool,
) -> int:
    ctx.hypervisor(node)
    for target in targets:
        ctx.hypervisor(target)
    async with ctx.guard() as guard, ctx.engine(policy, limits, guard=guard) as engine:
        source = ctx.hypervisors[node]
        for name in await source.list_instances():
            spec = ctx.config.instances[name].spec if name in ctx.config.instances else None
            if spec is None:
                raise ConfigError(
                    [
                        FieldProblem(
                            "instance", name, "running on the node but not in the configuration"
                        )
                    ]
                )
            engine.add_instance(Instance(spec, source, InstanceState.RUNNING))
        summary = await with_progress(
            ctx,
            engine,
            lambda: engine.evacuate(node, targets, dry_run=dry_run),
            enabled=progress and not dry_run,
            total=len(engine.on_node(node)),
        )
    plan = summary.plan
    data = {
        "node": node,
        "dry_run": dry_run,
        "plan": [{"instance": i, "target": t, "memory_mib": m} for i, t, m in plan.moves],
        "unplaceable": [{"instance": i, "reason": r} for i, r in plan.unplaceable],
        "capacity": plan.capacity,
        "moved": [{"instance": i, "target": t} for i, t in summary.moved],
        "failed": [{"instance": i, "reason": r} for i, r in summary.failed],
    }
    results = summary.results
    data["moved"] = [
        {
            "instance": i,
            "target": t,
            "seconds": round(results[i].elapsed, 3) if i in results else None,
            "downtime_ms": results[i].downtime_ms if i in results else None,
            "transferred_bytes": results[i].final.transferred if i in results else None,
        }
        for i, t in summary.moved
    ]
    table = make_table("instance", "target", "memory", "outcome", "time", "downtime", "moved")
    failed = dict(summary.failed)
    for instance, target, memory in plan.moves:
        result = results.get(instance)
        if dry_run:
            outcome = "planned"
        else:
            outcome = "moved" if result else f"failed: {failed.get(instance, '?')}"
        table.add_row(
            instance,
            target,
            f"{memory} MiB",
            outcome,
            f"{result.elapsed:.1f} s" if result else "-",
            f"{result.downtime_ms} ms" if result and result.downtime_ms is not None else "-",
            human_bytes(result.final.transferred) if result else "-",
        )
    for instance, reason in plan.unplaceable:
        table.add_row(instance, "-", "-", f"unplaceable: {reason}", "-", "-", "-")
    ctx.emit(data, table)
    if summary.failed or plan.unplaceable:
        return EXIT_PARTIAL
    return EXIT_OK


async def attach_all(ctx: Context, engine: Engine) -> None:
    """Register every configured instance where it runs now (or on its configured node)."""
    for name, entry in ctx.config.instances.items():
        engine.add_instance(await Instance.attach(entry.spec, await ctx.locate(name)))


async def cmd_plan(ctx: Context, path: str, *, run: bool, progress: bool) -> int:
    from pathlib import Path

    from kvmflow.plans import journal_path, load_plan, run_plan

    steps = load_plan(Path(path), instances=set(ctx.config.instances), nodes=set(ctx.config.nodes))
    if not run:
        ctx.emit(
            [
                {"step": s.index, "action": s.action, "instance": s.instance, "target": s.target}
                for s in steps
            ],
            text="\n".join(s.describe() for s in steps) + f"\nplan is valid: {len(steps)} steps",
        )
        return EXIT_OK
    async with ctx.guard() as guard, ctx.engine(None, guard=guard) as engine:
        await attach_all(ctx, engine)
        report = await with_progress(
            ctx,
            engine,
            lambda: run_plan(engine, steps, journal_path(Path(path))),
            enabled=progress,
            total=sum(step.action == "migrate" for step in steps),  # the bars count migrations
        )
    rows = [
        {
            "step": o.step.index,
            "action": o.step.action,
            "instance": o.step.instance,
            "outcome": o.outcome,
            "detail": o.detail,
        }
        for o in report.outcomes
    ]
    table = make_table("step", "action", "instance", "outcome", "detail")
    for o in report.outcomes:
        table.add_row(str(o.step.index), o.step.action, o.step.instance, o.outcome, o.detail)
    ctx.emit(rows, table)
    return EXIT_PARTIAL if report.failed else EXIT_OK
