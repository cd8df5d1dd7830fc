"""One controller of a cluster: an engine over the fleet's nodes, the shard of them it
holds (:mod:`kvmflow.engine.shards`), and the requests a shell leaves for their instances.

``await ClusterController(engine, store).run()`` serves until the controller's session is
lost (it returns why: the process should exit and leave the work to the new owners) or it
is cancelled. Requests (``kvmflow migrate`` with an etcd store) wait under
``requests/INSTANCE``; the controller holding the instance's node takes each (a
transaction: one controller only), runs it through the engine (leases, journal, fencing as
for any operation) and answers under ``answers/ID``.

Requests are ``migrate``, ``start`` and ``stop``. A request's life:

============  ==============================================================
state         meaning
============  ==============================================================
``waiting``   left by a shell; no controller took it yet
``taken``     deleted by the controller holding the node, which runs it
``answered``  its outcome is under ``answers/ID`` until the shell reads it
============  ==============================================================
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.abc

from kvmflow._logging import get_logger
from kvmflow.engine.engine import Engine
from kvmflow.engine.shards import ShardKeeper, Takeover
from kvmflow.errors import KvmflowError, LeaseLostError, MisuseError
from kvmflow.instance.instance import Instance
from kvmflow.migration.policy import MigrationPolicy
from kvmflow.store.etcd import EtcdStore

_log = get_logger("kvmflow.engine")

#: Finds (or refreshes) the engine's instance before a request runs on it.
InstanceFinder = Callable[[str], Awaitable[Instance | None]]


#: The operations a shell may ask of a node's controller.
REQUESTS = ("migrate", "start", "stop")


class ClusterController:
    """See the module docstring."""

    def __init__(
        self,
        engine: Engine,
        store: EtcdStore,
        *,
        interval: float = 1.0,
        find_instance: InstanceFinder | None = None,
        on_takeover: Callable[[Takeover], None] | None = None,
    ) -> None:
        self.engine, self.store = engine, store
        self.interval = interval
        self.find_instance = find_instance
        self.keeper = ShardKeeper(engine, store, interval=interval, on_takeover=on_takeover)
        self.answered = 0
        self.reason: LeaseLostError | None = None  # why it stood down
        self.stood_down = anyio.Event()

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> LeaseLostError:
        """Hold the shard (claimed and recovered before ``task_status`` says started) and
        serve requests until the session is lost: returns why, and sets
        :attr:`stood_down` (the process should exit, leaving the work to the new owners)."""
        async with self.keeper, anyio.create_task_group() as tg:
            task_status.started()
            tg.start_soon(self._serve, tg)
            reason = await self.keeper.wait_lost()
            tg.cancel_scope.cancel()
        _log.error("controller stands down", controller=self.store.controller, reason=str(reason))
        self.reason = reason
        self.stood_down.set()
        return reason

    def _is_mine(self, request: dict[str, Any]) -> bool:
        instance = self.engine.instances.get(request.get("instance", ""))
        node = instance.node_name if instance is not None else request.get("node")
        return node in self.keeper.held

    async def _serve(self, tg: anyio.abc.TaskGroup) -> None:
        changed = self.store.session.watch("requests")
        while True:
            try:
                for request in await self.store.take_requests(self._is_mine):
                    tg.start_soon(self._run_request, request)
                await changed(self.interval)
            except KvmflowError as exc:  # the store hiccuped: the next round tries again
                _log.warning("requests could not be read", error=str(exc))
                await anyio.sleep(self.interval)

    async def _run_request(self, request: dict[str, Any]) -> None:
        try:
            answer = {"ok": True, "by": self.store.controller, **await self._execute(request)}
        except KvmflowError as exc:
            answer = {
                "ok": False,
                "by": self.store.controller,
                "error": type(exc).__name__,
                "detail": str(exc),
            }
        with anyio.CancelScope(shield=True):
            try:
                await self.store.answer_request(request["id"], answer)
                self.answered += 1
            except KvmflowError as exc:
                _log.error("could not answer a request", request=request["id"], error=str(exc))

    async def _execute(self, request: dict[str, Any]) -> dict[str, Any]:
        """Run one request through the engine (leases, journal, fencing as for any
        operation); what it did, for the answer."""
        name, operation = request["instance"], request.get("operation")
        if operation not in REQUESTS:
            raise MisuseError(f"unknown request {operation!r}: one of {', '.join(REQUESTS)}")
        if self.find_instance is not None:
            found = await self.find_instance(name)
            if found is not None:
                self.engine.add_instance(found)
        if operation == "migrate":
            policy = request.get("policy")
            ticket = self.engine.submit_migration(
                name,
                request["target"],
                policy=MigrationPolicy.from_record(policy) if policy else None,
                live=bool(request.get("live", True)),
            )
            result = await ticket.wait()
            return {
                "detail": f"{name} moved to {request['target']}",
                "downtime_ms": result.downtime_ms,
            }
        if operation == "start":
            info = await self.engine.start(name)
            node = self.engine.instance(name).node_name
            return {"detail": f"started {name} on {node}", "node": node, "pid": info.pid}
        instance = self.engine.instance(name)
        await instance.stop(
            force=bool(request.get("force")), timeout=float(request.get("timeout", 30))
        )
        return {"detail": f"stopped {name} on {instance.node_name}", "node": instance.node_name}
