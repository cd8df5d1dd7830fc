"""The command line in a cluster of controllers (an etcd store): ``kvmflow controller``
runs one controller, and a shell's ``kvmflow migrate`` of an instance whose node a
controller holds asks that controller (through the store) and waits for its answer."""

from __future__ import annotations

import sys
from typing import Any

from kvmflow.cli.commands import cmd_migrate, cmd_start, cmd_stop
from kvmflow.cli.context import EXIT_FAILED, EXIT_OK, Context
from kvmflow.engine import Engine, NodeEntry
from kvmflow.engine.controller import ClusterController
from kvmflow.engine.shards import Takeover
from kvmflow.errors import ConfigError, FieldProblem
from kvmflow.instance import Instance, InstanceState
from kvmflow.instance.guard import OperationGuard
from kvmflow.migration import MigrationPolicy
from kvmflow.store import Owner
from kvmflow.store.etcd import EtcdStore
from kvmflow.store.url import etcd_target

#: How often a waiting shell looks for the controller's answer (besides the watch).
ANSWER_POLL_SECONDS = 0.3


def _need_etcd(ctx: Context, what: str) -> None:
    if not ctx.clustered:
        raise ConfigError(
            [FieldProblem("store", ctx.store_path, f"an etcd:// URL: {what} needs a cluster")]
        )


async def cmd_controller(ctx: Context, ident: str | None) -> int:
    """Run one controller of the cluster until SIGTERM (exit 0) or until its session is
    lost (exit 1: another controller owns its nodes now; restart it to rejoin)."""
    _need_etcd(ctx, "kvmflow controller")
    ident = ident or ctx.config.controller
    if ident is None:
        raise ConfigError(
            [FieldProblem("controller", None, "--id NAME or [store] controller = NAME")]
        )
    owner = Owner.this_process(ident)
    ttl = ctx.config.store_ttl
    store = await EtcdStore.open(etcd_target(ctx.store_path), owner, ttl=ttl, role="controller")
    guard = OperationGuard(store, owner, ttl=ttl)
    entries = [
        NodeEntry(ctx.hypervisors[name], node.migration_address, node.link_budget_mib)
        for name, node in ctx.config.nodes.items()
    ]

    async def find(name: str) -> Instance | None:
        """The configured instance where it runs, else where it last ran (the store's
        placement), else on its configured node (a first start)."""
        if name not in ctx.config.instances:
            return None
        for hv in ctx.hypervisors.values():
            if await hv.is_running(name):
                return Instance(ctx.spec(name), hv, InstanceState.RUNNING, guard=guard)
        placed = await store.placement(name)
        node = placed.node if placed is not None else ctx.config.instances[name].node
        return Instance(ctx.spec(name), ctx.hypervisor(node), guard=guard)

    def took_over(takeover: Takeover) -> None:
        print(
            f"kvmflow controller {ident}: holds {len(takeover.nodes)} more nodes "
            f"({', '.join(takeover.nodes[:5])}{'...' if len(takeover.nodes) > 5 else ''}); "
            f"recovered {len(takeover.reports)} operations in {takeover.seconds:.1f} s",
            file=sys.stderr,
            flush=True,
        )

    async with store, Engine(entries, guard=guard, recover_on_enter=False) as engine:
        controller = ClusterController(engine, store, find_instance=find, on_takeover=took_over)
        reason = await controller.run()
    print(f"kvmflow controller {ident}: stood down: {reason}", file=sys.stderr)
    return EXIT_FAILED


async def cmd_migrate_anywhere(
    ctx: Context, name: str, target: str, *, live: bool, policy: MigrationPolicy, progress: bool
) -> int:
    """Migrate here, or through the controller that holds the instance's node."""
    ctx.hypervisor(target)
    request = {"operation": "migrate", "target": target, "live": live, "policy": policy.as_record()}
    if await controller_of(ctx, name) is not None:
        return await ask_controller(ctx, name, request)
    return await cmd_migrate(ctx, name, target, live=live, policy=policy, progress=progress)


async def cmd_start_anywhere(ctx: Context, name: str) -> int:
    """Start here, or through the controller that holds the instance's node."""
    ctx.spec(name)
    if await controller_of(ctx, name) is not None:
        return await ask_controller(ctx, name, {"operation": "start"})
    return await cmd_start(ctx, name)


async def cmd_stop_anywhere(ctx: Context, name: str, *, force: bool, timeout: float) -> int:
    """Stop here, or through the controller that holds the instance's node."""
    if await controller_of(ctx, name) is not None:
        request = {"operation": "stop", "force": force, "timeout": timeout}
        return await ask_controller(ctx, name, request)
    return await cmd_stop(ctx, name, force=force, timeout=timeout)


async def controller_of(ctx: Context, name: str) -> str | None:
    """The controller that holds the node ``name`` runs on (or would start on), if the
    store is etcd."""
    if not ctx.clustered:
        return None
    async with ctx.guard() as guard:
        hv = await ctx.locate(name, guard)
        assert isinstance(guard.store, EtcdStore)
        return (await guard.store.node_owners()).get(hv.node.name)


async def ask_controller(ctx: Context, name: str, request: dict[str, Any]) -> int:
    """Leave ``request`` for the controller of ``name``'s node, and wait for its answer
    (exit 0 when it did it, 1 with its reason when it did not)."""
    async with ctx.guard() as guard:
        store = guard.store
        assert isinstance(store, EtcdStore)
        hv = await ctx.locate(name, guard)
        ident = await store.submit_request(
            name, {**request, "node": hv.node.name, "by": guard.owner.controller}
        )
        operation = request["operation"]
        print(
            f"kvmflow: asked the controller of {hv.node.name} to {operation} {name}",
            file=sys.stderr,
        )
        answered = store.session.watch("answers")
        while (answer := await store.answer(ident)) is None:
            await answered(ANSWER_POLL_SECONDS)
    data = {"instance": name, "operation": operation, **answer}
    if not answer["ok"]:
        ctx.emit(
            data, text=f"controller {answer['by']} did not {operation} {name}: {answer['detail']}"
        )
        return EXIT_FAILED
    ctx.emit(data, text=f"controller {answer['by']}: {answer['detail']}")
    return EXIT_OK
