"""Node shards: which live controller manages which node, and taking over a dead one's.

**The rule** is rendezvous hashing (highest random weight): for each node, every live
controller scores ``blake2b(controller id, node)``, and the highest score owns it. Every
controller computes it alone from the list of live controllers; it is fair (each of *n*
controllers gets about 1/*n* of the nodes), stable (nothing moves while the controllers
stay the same) and moves little (a controller that joins takes only the nodes it now
wins; one that leaves hands only its own nodes to the others).

**Holding** a node is its key in the store (attached to the controller's etcd lease, see
:mod:`kvmflow.store.etcd_nodes`). A controller only operates on instances of nodes it
holds (the guard refuses others with :class:`~kvmflow.errors.NodeNotHeldError` naming the
owner); a migration is run by its source node's owner.

One node, as one controller sees it:

============  ============================================================================
state         meaning
============  ============================================================================
``other``     another controller wins it (or holds it still)
``claiming``  this controller wins it; it claims the key once the old owner gave it back
              or died (its lease expired), then runs recovery for the node's open entries
``held``      this controller's: operations on its instances are allowed
``leaving``   another controller wins it now; given back once no operation runs on it
============  ============================================================================

A controller whose session is lost (paused or cut off past its TTL) holds nothing any more:
:meth:`ShardKeeper.run` raises :class:`~kvmflow.errors.LeaseLostError` and the controller
stands down (its operations are fenced already, see :mod:`kvmflow.fencing`).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio

from kvmflow._logging import get_logger
from kvmflow.errors import KvmflowError, LeaseLostError, MisuseError, NodeNotHeldError
from kvmflow.store.etcd import EtcdStore

if TYPE_CHECKING:
    from kvmflow.engine.engine import Engine
    from kvmflow.engine.verdicts import RecoveryReport

_log = get_logger("kvmflow.engine")

#: Rounds without a change after which the keeper reads the shard records all the same
#: (a watch that missed an event costs this many intervals at most).
QUIET_ROUNDS = 10


@dataclass(frozen=True)
class Takeover:
    """Nodes a controller claimed (at ``claimed_at``, time.time()) and what recovering them
    found, ``seconds`` after the claim."""

    nodes: list[str]
    reports: list[RecoveryReport]
    claimed_at: float
    seconds: float


def score(controller: str, node: str) -> int:
    digest = hashlib.blake2b(f"{controller}\0{node}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def owner_of(node: str, controllers: Iterable[str]) -> str | None:
    """The controller that should hold ``node`` (``None`` when none lives)."""
    return max(controllers, key=lambda c: score(c, node), default=None)


def shard(nodes: Iterable[str], controllers: Iterable[str], me: str) -> set[str]:
    """The nodes ``me`` should hold among ``controllers``."""
    live = list(controllers)
    return {node for node in nodes if owner_of(node, live) == me}


class ShardKeeper:
    """Keeps one controller's shard of ``engine``'s nodes in ``store`` (see the module
    docstring): ``async with ShardKeeper(engine, store) as keeper:`` claims the shard (and
    recovers it) before the body runs, and keeps it while the body runs."""

    def __init__(
        self,
        engine: Engine,
        store: EtcdStore,
        *,
        interval: float = 1.0,
        on_takeover: Callable[[Takeover], None] | None = None,
    ) -> None:
        if engine.guard is None or engine.guard.store is not store:
            raise MisuseError("a shard keeper needs an engine whose guard uses the same store")
        self.engine, self.store = engine, store
        self.me = store.controller
        self.interval = interval
        self.on_takeover = on_takeover
        self.held: set[str] = set()
        self.owners: dict[str, str] = {}  # node -> holder, as last read
        self.recovered: list[RecoveryReport] = []
        self.lost: LeaseLostError | None = None
        self._task_group: anyio.abc.TaskGroup | None = None
        self._lost_event: anyio.Event | None = None
        self._changed = store.session.watch("controllers", "nodes")

    # ----------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> ShardKeeper:
        assert self.engine.guard is not None
        self.engine.guard.node_check = self.require
        self._lost_event = anyio.Event()
        await self.rebalance()
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        self._task_group.start_soon(self._keep)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._task_group is not None
        self._task_group.cancel_scope.cancel()
        await self._task_group.__aexit__(None, None, None)

    async def _keep(self) -> None:
        """Rebalance when a controller or node key changed (the watch), and every
        :data:`QUIET_ROUNDS` rounds anyway; a quiet round only checks the session, locally
        (at rest, a controller of 3,000 nodes does not re-read 10,000 keys a second)."""
        quiet = 0
        while True:
            try:
                changed = await self._changed(self.interval)
                quiet = 0 if changed else quiet + 1
                if quiet % QUIET_ROUNDS:
                    self.store.session.check()
                    continue
                await self.rebalance()
            except LeaseLostError as exc:
                self.lost, self.held = exc, set()
                assert self._lost_event is not None
                self._lost_event.set()
                _log.error("controller lost its session; standing down", reason=str(exc))
                return
            except KvmflowError as exc:  # the store hiccuped: the next round tries again
                _log.warning("shard keeper could not reach the store", error=str(exc))
                await anyio.sleep(self.interval)

    async def wait_lost(self) -> LeaseLostError:
        """Until the session is lost (the controller must stand down); returns why."""
        assert self._lost_event is not None, "use the keeper in an async with block"
        await self._lost_event.wait()
        assert self.lost is not None
        return self.lost

    # ------------------------------------------------------------------ the rule

    def require(self, node: str) -> None:
        """Refuse (:class:`NodeNotHeldError`, naming the owner) a node not held here."""
        if node in self.held:
            return
        owner = self.owners.get(node)
        if owner is None:
            why = f"node {node} is held by no controller yet (its shard is being taken over)"
        else:
            why = f"node {node} is managed by controller {owner}; ask it"
        raise NodeNotHeldError(
            f"{why} (controller {self.me} holds {len(self.held)} nodes)", node=node, owner=owner
        )

    def _busy_nodes(self) -> set[str]:
        """Nodes where an operation of this controller runs (never given away then)."""
        assert self.engine.guard is not None
        busy: set[str] = set()
        for op in self.engine.guard.held_operations():
            details = op.entry.details
            busy |= {str(details[k]) for k in ("node", "source", "target") if details.get(k)}
        return busy

    async def rebalance(self) -> list[str]:
        """One round: give back nodes another controller now wins (when idle), claim the
        free nodes this one wins, recover those claimed. Returns the nodes claimed."""
        self.store.session.check()
        live = [c.id for c in await self.store.controllers() if c.role == "controller"]
        if self.me not in live:
            self.store.session.check()
            raise LeaseLostError(f"controller {self.me} is not registered any more")
        wanted = shard(self.engine.nodes, live, self.me)
        self.owners = await self.store.node_owners()
        mine = {node for node, owner in self.owners.items() if owner == self.me}
        leaving = sorted(mine - wanted - self._busy_nodes())
        if leaving:
            self.held -= set(leaving)  # refused from now, before the key goes
            await self.store.release_nodes(leaving)
            for node in leaving:
                self.owners.pop(node, None)
            _log.info("nodes handed over", controller=self.me, nodes=len(leaving))
        free = sorted(node for node in wanted if node not in self.owners)
        claimed = await self.store.claim_nodes(free) if free else []
        for node in claimed:
            self.owners[node] = self.me
        self.held = (mine - set(leaving)) | set(claimed)
        if claimed:
            await self._take_over(claimed)
        return claimed

    async def _take_over(self, claimed: list[str]) -> None:
        claimed_at, started = time.time(), time.monotonic()
        _log.info("nodes claimed; recovering them", controller=self.me, nodes=len(claimed))
        reports = await self.engine.recover(nodes=set(claimed), survey=False)
        self.recovered += reports
        seconds = time.monotonic() - started
        (_log.warning if reports else _log.info)(
            "nodes taken over",
            controller=self.me,
            nodes=len(claimed),
            recovered=len(reports),
            seconds=round(seconds, 3),
        )
        if self.on_takeover is not None:
            self.on_takeover(Takeover(claimed, reports, claimed_at, seconds))
