"""Node shards in etcd: which controllers live, which one holds each node, and the
requests a shell leaves for a node's controller.

A controller holds a node by the key ``nodes/NODE`` attached to its session's etcd lease:
created only where no key is (a transaction per node, a hundred nodes a round trip), gone
by itself when the controller dies (its lease expires) or given back by the controller.
Who *should* hold a node is :mod:`kvmflow.engine.shards`'s business; this is the record.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvmflow.errors import InstanceBusyError
from kvmflow.store.etcd_session import owner_from

if TYPE_CHECKING:
    from kvmflow.store.base import Owner
    from kvmflow.store.etcd_session import EtcdSession

#: Nodes per transaction (each one a nested transaction of one compare and one put).
NODES_PER_TXN = 100


@dataclass(frozen=True)
class Controller:
    """A live controller: its id, its process, its session's TTL."""

    id: str
    owner: Owner
    ttl: float
    role: str  # "controller" (holds a shard) or "client" (a shell's command)


class NodeShards:
    """The shard records of an :class:`~kvmflow.store.etcd.EtcdStore` (a mixin)."""

    session: EtcdSession

    async def _txn(self, compare: list[Any], success: list[Any], failure: list[Any]) -> Any:
        raise NotImplementedError

    @property
    def controller(self) -> str:
        """This store's controller id."""
        return self.session.owner.controller

    async def controllers(self) -> list[Controller]:
        """Every live controller, by id."""
        client = self.session.client
        prefix = self.session.key("controllers") + b"/"
        got = await self.session.call(lambda: client.get_prefix(prefix))
        found = []
        for kv in got:
            record = json.loads(kv.value)
            found.append(
                Controller(
                    record["controller"],
                    owner_from(record),
                    record["ttl"],
                    record.get("role", "controller"),
                )
            )
        return sorted(found, key=lambda c: c.id)

    async def node_owners(self) -> dict[str, str]:
        """node -> the controller holding it now."""
        client = self.session.client
        prefix = self.session.key("nodes") + b"/"
        got = await self.session.call(lambda: client.get_prefix(prefix))
        return {kv.key[len(prefix) :].decode(): json.loads(kv.value)["controller"] for kv in got}

    async def claim_nodes(self, nodes: list[str]) -> list[str]:
        """Hold each free node of ``nodes`` for this controller; returns those now held
        (a node another controller holds stays its own)."""
        tx = self.session.client.transactions
        value = json.dumps({"controller": self.controller}).encode()
        claimed: list[str] = []
        for start in range(0, len(nodes), NODES_PER_TXN):
            chunk = nodes[start : start + NODES_PER_TXN]
            nested = [
                tx.txn(
                    [tx.version(self.session.key("nodes", node)) == 0],
                    [tx.put(self.session.key("nodes", node), value, self.session.lease_id)],
                    [],
                )
                for node in chunk
            ]
            mine = tx.create(self.session.controller_key) == self.session.key_revision
            ok, replies = await self._txn([mine], nested, [])
            if ok:
                claimed += [
                    node for node, reply in zip(chunk, replies, strict=True)
                    if reply.response_txn.succeeded
                ]  # fmt: skip
        return claimed

    async def release_nodes(self, nodes: list[str]) -> None:
        """Give ``nodes`` back (only those this controller holds)."""
        tx = self.session.client.transactions
        value = json.dumps({"controller": self.controller}).encode()
        for start in range(0, len(nodes), NODES_PER_TXN):
            nested = [
                tx.txn(
                    [tx.value(self.session.key("nodes", node)) == value],
                    [tx.delete(self.session.key("nodes", node))],
                    [],
                )
                for node in nodes[start : start + NODES_PER_TXN]
            ]
            await self._txn([], nested, [])

    # ----------------------------------------------------------------- requests

    async def submit_request(self, instance: str, request: dict[str, Any]) -> str:
        """Leave ``request`` (an operation on ``instance``) for the controller holding its
        node; returns its id. Refused while another request for it waits."""
        tx = self.session.client.transactions
        ident = f"{instance}-{uuid.uuid4().hex[:12]}"
        key = self.session.key("requests", instance)
        record = {**request, "id": ident, "instance": instance, "at": time.time()}
        ok, replies = await self._txn(
            [tx.version(key) == 0], [tx.put(key, json.dumps(record).encode())], [tx.get(key)]
        )
        if not ok:
            waiting = json.loads(replies[0][0][0]) if replies[0] else {}
            raise InstanceBusyError(
                f"a request for {instance} ({waiting.get('operation')} by "
                f"{waiting.get('by')}) waits for its controller already",
                holder=None,
            )
        return ident

    async def take_requests(self, wanted: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        """The waiting requests ``wanted`` accepts, each taken (deleted) by this controller
        alone: two controllers never run one request."""
        client, tx = self.session.client, self.session.client.transactions
        prefix = self.session.key("requests") + b"/"
        got = await self.session.call(lambda: client.get_prefix(prefix))
        taken = []
        for kv in got:
            request = json.loads(kv.value)
            if not wanted(request):
                continue
            ok, _ = await self._txn([tx.mod(kv.key) == kv.mod_revision], [tx.delete(kv.key)], [])
            if ok:
                taken.append(request)
        return taken

    async def answer_request(self, ident: str, answer: dict[str, Any]) -> None:
        """Say how a taken request ended (the shell that left it waits for this)."""
        tx = self.session.client.transactions
        key = self.session.key("answers", ident)
        await self._txn([], [tx.put(key, json.dumps(answer).encode())], [])

    async def answer(self, ident: str) -> dict[str, Any] | None:
        """The answer to request ``ident``, once there (and then removed)."""
        client, tx = self.session.client, self.session.client.transactions
        key = self.session.key("answers", ident)
        got = await self.session.call(lambda: client.get(key))
        if got is None:
            return None
        await self._txn([], [tx.delete(key)], [])
        return dict(json.loads(got.value))
