"""What each ``kvmflow`` subcommand does, on top of the library (no sockets here)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict
from typing import Any, TypeVar

import anyio
from rich.console import Console, RenderableType
from rich.table import Table
from rich.text import Text

from kvmflow.cli.config import Config
from kvmflow.cli.progress import MigrationBars, human_bytes
from kvmflow.engine import Engine, Limits, NodeEntry
from kvmflow.engine.reality import look
from kvmflow.errors import ConfigError, FieldProblem, MisuseError, ValidationError
from kvmflow.instance import Instance, InstanceState
from kvmflow.instance.guard import OperationGuard
from kvmflow.kvm import KvmHypervisor, RuntimePaths, default_accelerator
from kvmflow.kvm.console import BUSY_EXIT
from kvmflow.kvm.spec import InstanceSpec
from kvmflow.migration import MigrationPolicy
from kvmflow.monitor import hmp_via_qmp
from kvmflow.node import LocalNode, SSHNode
from kvmflow.store import DEFAULT_PATH, Owner, SQLiteStore

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_PARTIAL = 0, 1, 2, 3
T = TypeVar("T")


class Context:
    """The loaded configuration, one hypervisor per node, and where the store is."""

    def __init__(
        self, config: Config, console: Console, *, as_json: bool, store_path: str | None = None
    ) -> None:
        self.config = config
        self.console = console
        self.as_json = as_json
        self.store_path = resolve_store_path(store_path, config)
        accel = default_accelerator()
        self.hypervisors = {
            name: KvmHypervisor(
                SSHNode(name, node.ssh) if node.ssh else LocalNode(name),
                RuntimePaths(node.runtime_root),
                default_accelerator=accel,
            )
            for name, node in config.nodes.items()
        }

    def run(self, command: Callable[..., Awaitable[int]], *args: Any) -> int:
        """Run one command, then close the nodes' connections (SSH), whatever happens."""

        async def closing() -> int:
            try:
                return await until_terminated(command, *args)
            finally:
                with anyio.CancelScope(shield=True):
                    for hv in self.hypervisors.values():
                        await hv.node.aclose()

        return anyio.run(closing)

    def located_running(self, name: str) -> KvmHypervisor | None:
        """Where ``name`` runs now (None: nowhere), asked in one event loop of its own."""

        async def ask() -> int:
            hv = await self.locate(name)
            found.append(hv if await hv.is_running(name) else None)
            return EXIT_OK

        found: list[KvmHypervisor | None] = []
        self.run(ask)
        return found[0]

    @contextlib.asynccontextmanager
    async def guard(self) -> AsyncIterator[OperationGuard]:
        """The store, open for one command, and this process's leases in it."""
        async with await SQLiteStore.open(self.store_path) as store:
            yield OperationGuard(store, Owner.this_process("kvmflow-cli"))

    def spec(self, name: str) -> InstanceSpec:
        entry = self.config.instances.get(name)
        if entry is None:
            known = ", ".join(sorted(self.config.instances)) or (
                "none configured: no config file found at "
                + ", ".join(self.config.searched)
                + " (or pass -c FILE)"
                if self.config.searched
                else "none configured"
            )
            raise ConfigError([FieldProblem("instance", name, f"a configured instance ({known})")])
        return entry.spec

    async def locate(self, name: str, guard: OperationGuard | None = None) -> KvmHypervisor:
        """The node where ``name`` runs now, else where the store last recorded it, else
        the node the configuration gives it (only where a first start goes)."""
        for hv in self.hypervisors.values():
            if await hv.is_running(name):
                return hv
        if guard is not None:
            placed = await guard.store.placement(name)
            if placed is not None and placed.node in self.hypervisors:
                return self.hypervisors[placed.node]
        self.spec(name)
        return self.hypervisors[self.config.instances[name].node]

    def hypervisor(self, node: str) -> KvmHypervisor:
        if node not in self.hypervisors:
            known = ", ".join(sorted(self.hypervisors))
            raise ConfigError([FieldProblem("node", node, f"a configured node ({known})")])
        return self.hypervisors[node]

    def engine(
        self,
        policy: MigrationPolicy | None,
        limits: Limits | None = None,
        *,
        guard: OperationGuard | None = None,
    ) -> Engine:
        """An engine over the configured nodes. Its operations hold leases through
        ``guard``; it does not recover on entering (that is ``kvmflow recover``'s job, so
        that a migration of one instance never acts on another's leftovers)."""
        entries = [
            NodeEntry(self.hypervisors[name], node.migration_address, node.link_budget_mib)
            for name, node in self.config.nodes.items()
        ]
        return Engine(
            entries,
            limits=limits,
            default_policy=policy,
            close_nodes=True,
            guard=guard,
            recover_on_enter=False,
        )

    def say_waiting(self, instance: Instance, *, force: bool, timeout: float) -> None:
        """Tell the operator (on stderr, never under --json) what a stop waits for."""
        if force or self.as_json or not instance.spec.hvparams.acpi:
            return
        print(
            f"kvmflow: asked {instance.name} on {instance.node_name} to power off (ACPI); "
            f"it is killed if it has not in {timeout:g} s",
            file=sys.stderr,
        )

    def emit(self, data: Any, table: Table | None = None, text: str | None = None) -> None:
        if self.as_json:
            print(json.dumps(data, default=str))
        elif table is not None:
            self.console.print(table)
        elif text is not None:
            self.console.print(text, highlight=False, markup=False)


class Terminated(Exception):
    """The command got SIGTERM: it was cancelled and cleaned up as for Ctrl-C."""


async def until_terminated(command: Callable[..., Awaitable[int]], *args: Any) -> int:
    """Run ``command``; SIGTERM (systemd, kill) cancels it as Ctrl-C does, so that what is
    in flight is cleaned up instead of left for recovery, then :class:`Terminated`."""
    failure: Exception | None = None
    result = EXIT_FAILED
    terminated = False
    with anyio.open_signal_receiver(signal.SIGTERM) as signals:
        async with anyio.create_task_group() as tg:

            async def watch() -> None:
                nonlocal terminated
                async for _ in signals:
                    terminated = True
                    tg.cancel_scope.cancel()
                    return

            tg.start_soon(watch)
            try:
                result = await command(*args)
            except Exception as exc:  # raised as it is below, not in an ExceptionGroup
                failure = exc
            finally:
                tg.cancel_scope.cancel()
    if terminated:
        raise Terminated
    if failure is not None:
        raise failure
    return result


def resolve_store_path(flag: str | None, config: Config) -> str:
    """Where the store is: ``--store``, then ``$KVMFLOW_STORE``, then the config file's
    ``[store] path``, then :data:`~kvmflow.store.DEFAULT_PATH` (its directory is created
    then, as the state directory of a controller host)."""
    path = flag or os.environ.get("KVMFLOW_STORE") or config.store_path
    if path:
        return path
    os.makedirs(os.path.dirname(DEFAULT_PATH), mode=0o700, exist_ok=True)
    return DEFAULT_PATH


async def with_progress(
    ctx: Context, engine: Engine, work: Callable[[], Awaitable[T]], *, enabled: bool, total: int = 1
) -> T:
    """Run ``work`` while drawing the engine's migrations as progress bars."""
    events = engine.events()
    failure: Exception | None = None
    with MigrationBars(ctx.console, enabled=enabled, total=total) as bars:
        async with anyio.create_task_group() as tg:

            async def draw() -> None:
                async for event in events:
                    bars.handle(event)

            tg.start_soon(draw)
            try:
                result = await work()
            except Exception as exc:  # raised as it is below, not in an ExceptionGroup
                failure = exc
            finally:
                tg.cancel_scope.cancel()
    if failure is not None:
        raise failure
    return result


class PlainTable(Table):
    """A table whose cells are shown as they are: text from outside (QEMU's answers, paths,
    error messages such as ``[store /x]``) is never read as rich markup."""

    def add_row(self, *cells: RenderableType | None, **options: Any) -> None:
        super().add_row(
            *(Text(cell) if isinstance(cell, str) else cell for cell in cells), **options
        )


def make_table(*columns: str, **options: Any) -> Table:
    return PlainTable(*columns, **{"show_edge": False, "header_style": "bold", **options})


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
        info = await ctx.hypervisor(name).node_info()
        rows.append({"node": name, **asdict(info)})
    table = make_table("node", "memory total", "free", "used by node", "cpus", "sockets", "numa")
    for row in rows:
        table.add_row(
            row["node"],
            f"{row['memory_total_mib']} MiB",
            f"{row['memory_free_mib']} MiB",
            f"{row['memory_used_by_node_mib']} MiB",
            str(row["cpu_count"]),
            str(row["cpu_sockets"]),
            str(row["numa_nodes"]),
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
