"""Node shards in etcd: which controllers live, and which one holds each node.

A controller holds a node by the key ``nodes/NODE`` attached to its session's etcd lease:
created only where no key is (a transaction per node, a hundred nodes a round trip), gone
by itself when the controller dies (its lease expires) or given back by the controller.
Who *should* hold a node is :mod:`kvmflow.engine.shards`'s business; this is the record.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

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
            found.append(Controller(record["controller"], owner_from(record), record["ttl"]))
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
