"""The store of record on an etcd v3 cluster, shared by several controllers.

Keys under the store's prefix (JSON values):

=============================  ===============================================================
key                            what it holds
=============================  ===============================================================
``controllers/ID``             a live controller (attached to its session's etcd lease)
``nodes/NODE``                 the controller whose shard holds NODE (attached likewise)
``leases/INSTANCE``            an operation's lease: owner, operation, the owner's session;
                               its ``mod_revision`` is the fencing token
``placement/INSTANCE``         the node it runs on, written under a lease
``journal/INSTANCE/ID``        one journal entry (ID is the lease's token, zero-padded)
``open/ID``                    the instance of every entry still open (what recovery reads)
``progress/ID``                the owner's latest progress report of an open entry
``cancel/INSTANCE``            a cancel request for the lease holding INSTANCE
``fences/NODE``                the latest fence of NODE
=============================  ===============================================================

An operation lease does not expire by itself: it holds while its owner's session does
(``controllers/ID`` exists with the same ``create_revision``), so a controller renews a
thousand leases with one keep-alive. Every write proves in its own transaction that the
lease key still has the writer's token and the writer's session is alive (fencing); so
does :meth:`EtcdStore.prove`, which the guard calls before every step that changes a QEMU.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

from kvmflow.errors import (
    InstanceBusyError,
    LeaseLostError,
    NothingToAbortError,
    StoreError,
    StoreUnavailableError,
)
from kvmflow.store.base import (
    Fence,
    JournalEntry,
    Lease,
    Owner,
    Placement,
    PlacementChange,
    busy_message,
)
from kvmflow.store.etcd_nodes import NodeShards
from kvmflow.store.etcd_session import EtcdSession, EtcdTarget, owner_from, owner_record

#: Operations per transaction (etcd's --max-txn-ops defaults to 128).
BATCH = 100


class EtcdStore(NodeShards):
    """A :class:`~kvmflow.store.base.Store` on etcd for the controller ``owner``; use
    ``async with await EtcdStore.open(target, owner, ttl=10) as store:``. Its session's
    ``ttl`` governs every lease it takes (the ``ttl`` arguments of the protocol are kept
    for the interface and ignored)."""

    def __init__(self, session: EtcdSession) -> None:
        self.session = session
        self.path = str(session.target)
        self.writes = 0  # transactions that wrote, for the benchmark's count per migration

    @classmethod
    async def open(
        cls, target: EtcdTarget, owner: Owner, *, ttl: int = 10, role: str = "client"
    ) -> EtcdStore:
        """Open a session as ``owner``: ``role="controller"`` takes a shard of the nodes
        (:mod:`kvmflow.engine.shards`); a ``"client"`` (a shell's command) takes none."""
        if not 2 <= ttl <= 3600:
            raise StoreError(f"an etcd session TTL of {ttl} s: use 2 to 3600 s", path=str(target))
        if role not in ("controller", "client"):
            raise StoreError(f"role {role!r}: use 'controller' or 'client'", path=str(target))
        session = EtcdSession(target, owner, ttl, role)
        await session.start()
        return cls(session)

    async def aclose(self) -> None:
        await self.session.close()

    async def __aenter__(self) -> EtcdStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @property
    def ttl(self) -> int:
        return self.session.ttl

    # ------------------------------------------------------------------ helpers

    def _k(self, *parts: str) -> bytes:
        return self.session.key(*parts)

    async def _txn(self, compare: list[Any], success: list[Any], failure: list[Any]) -> Any:
        self.session.check()
        client = self.session.client
        reply = await self.session.call(lambda: client.transaction(compare, success, failure))
        if success and any(_writes(op) for op in success):
            self.writes += 1
        return reply

    def _mine(self) -> Any:
        """The compare that says this controller's session is still the live one."""
        tx = self.session.client.transactions
        return tx.create(self.session.controller_key) == self.session.key_revision

    def _fencing(self, lease: Lease) -> list[Any]:
        tx = self.session.client.transactions
        return [tx.mod(self._k("leases", lease.instance)) == lease.token, self._mine()]

    async def _fenced(self, lease: Lease, success: list[Any]) -> list[Any]:
        """Run ``success`` if ``lease`` still holds; else :class:`LeaseLostError`."""
        tx = self.session.client.transactions
        key = self._k("leases", lease.instance)
        ok, replies = await self._txn(
            self._fencing(lease), success, [tx.get(key), tx.get(self.session.controller_key)]
        )
        if not ok:
            raise self._lost(lease, replies)
        return list(replies)

    def _lost(self, lease: Lease, replies: list[Any]) -> LeaseLostError:
        if not replies[1]:
            why = "this controller's session expired"
        elif replies[0]:
            held = json.loads(replies[0][0][0])
            why = f"now held by {owner_from(held)} (token {replies[0][0][1].mod_revision})"
        else:
            why = "released"
        return LeaseLostError(
            f"the lease on {lease.instance} (token {lease.token}) was lost: {why}; "
            "nothing was written",
            path=self.path,
        )

    async def _get(self, *parts: str) -> tuple[dict[str, Any], Any] | None:
        client = self.session.client
        key = self._k(*parts)
        got = await self.session.call(lambda: client.get(key))
        return (json.loads(got.value), got) if got is not None else None

    async def _range(self, *parts: str) -> list[tuple[dict[str, Any], Any]]:
        client = self.session.client
        prefix = self._k(*parts) + b"/"
        got = await self.session.call(lambda: client.get_prefix(prefix))
        return [(json.loads(kv.value), kv) for kv in got]

    async def _live(self) -> dict[str, tuple[int, float]]:
        """Live controllers: id -> (their key's create_revision, their TTL)."""
        return {
            record["controller"]: (kv.create_revision, float(record["ttl"]))
            for record, kv in await self._range("controllers")
        }

    def _lease(
        self,
        instance: str,
        record: dict[str, Any],
        kv: Any,
        live: dict[str, tuple[int, float]],
        now: float | None = None,
    ) -> Lease:
        """A lease as read: it runs a TTL more while its owner's session lives (the session
        is renewed all the time), and ended ``now`` (or when abandoned) otherwise."""
        owner = owner_from(record)
        session = live.get(owner.controller)
        now = time.time() if now is None else now
        alive = session is not None and session[0] == record["session"]
        if alive and record.get("abandoned_at") is None:
            assert session is not None
            expires_at = now + session[1]
        else:
            expires_at = min(now, record.get("abandoned_at") or now)
        return Lease(instance, owner, record["operation"], kv.mod_revision, expires_at)

    # ------------------------------------------------------------------- leases

    async def acquire(
        self, instance: str, owner: Owner, operation: str, ttl: float, *, take_over: bool = False
    ) -> Lease:
        tx = self.session.client.transactions
        key = self._k("leases", instance)
        record = {
            **owner_record(owner),
            "operation": operation,
            "session": self.session.key_revision,
            "abandoned_at": None,
        }
        for _ in range(5):
            now = time.time()
            found = await self._get("leases", instance)
            if found is not None:
                held = self._lease(instance, *found, await self._live(), now)
                gone = held.expires_at <= now or held.owner.alive() is False
                if not (take_over and gone):
                    raise InstanceBusyError(busy_message(held, now), holder=held)
                unchanged = tx.mod(key) == found[1].mod_revision
            else:
                unchanged = tx.version(key) == 0
            ok, replies = await self._txn(
                [unchanged, self._mine()],
                [tx.put(key, json.dumps(record).encode()), tx.get(key)],
                [tx.get(self.session.controller_key)],
            )
            if ok:
                token = replies[1][0][1].mod_revision
                return Lease(instance, owner, operation, token, now + self.session.ttl)
            if not replies[0]:
                self.session.check()
                raise LeaseLostError("this controller's session expired", path=self.path)
        raise InstanceBusyError(
            f"instance {instance} is contended: its lease changed five times while taking it",
            holder=None,
        )

    async def prove(self, lease: Lease) -> None:
        """Fencing: the lease still holds (token current, session alive), or
        :class:`LeaseLostError`; raises :class:`StoreUnavailableError` when etcd does
        not answer, or when the lease cannot be vouched for long enough (the keep-alives
        went unanswered: a step must not be sent on a lease that may run out under it)."""
        await self._fenced(lease, [])
        session = self.session
        if session.remaining() < session.ttl / 4:
            await session.thread.call(session.refresh)
            session.check()
            if session.remaining() < session.ttl / 4:
                raise StoreUnavailableError(
                    f"the session of controller {self.controller} cannot be vouched for "
                    f"({session.remaining():.1f} s left): the keep-alives go unanswered",
                    path=self.path,
                )

    async def renew(self, lease: Lease, ttl: float) -> Lease:
        await self.prove(lease)
        return dataclasses.replace(lease, expires_at=time.time() + self.session.ttl)

    async def renew_all(
        self, leases: list[Lease], ttl: float
    ) -> tuple[list[Lease], list[tuple[Lease, LeaseLostError]]]:
        self.session.check()
        current = {kv.key: kv.mod_revision for _, kv in await self._range("leases")}
        expires_at = time.time() + self.session.ttl
        renewed, lost = [], []
        for lease in leases:
            if current.get(self._k("leases", lease.instance)) == lease.token:
                renewed.append(dataclasses.replace(lease, expires_at=expires_at))
            else:
                lost.append(
                    (
                        lease,
                        LeaseLostError(f"the lease on {lease.instance} was lost", path=self.path),
                    )
                )
        return renewed, lost

    async def abandon(self, lease: Lease) -> None:
        tx = self.session.client.transactions
        found = await self._get("leases", lease.instance)
        if found is None or found[1].mod_revision != lease.token:
            return
        record = {**found[0], "abandoned_at": time.time()}
        key = self._k("leases", lease.instance)
        await self._txn(
            [tx.mod(key) == lease.token], [tx.put(key, json.dumps(record).encode())], []
        )

    async def release(self, lease: Lease) -> None:
        tx = self.session.client.transactions
        key = self._k("leases", lease.instance)
        await self._txn(
            [tx.mod(key) == lease.token],
            [tx.delete(key), tx.delete(self._k("cancel", lease.instance))],
            [],
        )

    async def request_cancel(self, instance: str, requested_by: str) -> Lease:
        found = await self._get("leases", instance)
        if found is None:
            raise NothingToAbortError(
                f"no operation holds {instance} now: there is nothing to abort"
            )
        held = self._lease(instance, *found, await self._live())
        tx = self.session.client.transactions
        value = {"token": held.token, "by": requested_by, "at": time.time()}
        ok, _ = await self._txn(
            [tx.mod(self._k("leases", instance)) == held.token],
            [tx.put(self._k("cancel", instance), json.dumps(value).encode())],
            [],
        )
        if not ok:
            return await self.request_cancel(instance, requested_by)
        return held

    async def cancel_requests(self) -> dict[tuple[str, int], str]:
        return {
            (kv.key.decode().rsplit("/cancel/", 1)[1], record["token"]): record["by"]
            for record, kv in await self._range("cancel")
        }

    async def record_fence(self, node: str, by: str, how: str) -> Fence:
        fence = Fence(node, time.time(), by, how)
        tx = self.session.client.transactions
        await self._txn(
            [],
            [tx.put(self._k("fences", node), json.dumps(dataclasses.asdict(fence)).encode())],
            [],
        )
        return fence

    async def fence(self, node: str) -> Fence | None:
        found = await self._get("fences", node)
        return Fence(**found[0]) if found else None

    async def leases(self) -> list[Lease]:
        live = await self._live()
        prefix = self._k("leases").decode() + "/"
        found = [
            self._lease(kv.key.decode().removeprefix(prefix), record, kv, live)
            for record, kv in await self._range("leases")
        ]
        return sorted(found, key=lambda lease: lease.instance)

    async def holder(self, instance: str) -> Lease | None:
        found = await self._get("leases", instance)
        return self._lease(instance, *found, await self._live()) if found else None

    # ---------------------------------------------------------------- placement

    async def placement(self, instance: str) -> Placement | None:
        found = await self._get("placement", instance)
        return Placement(**found[0]) if found else None

    async def placements(self) -> list[Placement]:
        found = [Placement(**record) for record, _ in await self._range("placement")]
        return sorted(found, key=lambda p: p.instance)

    def _place_ops(self, lease: Lease, node: str | None, now: float) -> list[Any]:
        tx = self.session.client.transactions
        key = self._k("placement", lease.instance)
        if node is None:
            return [tx.delete(key)]
        placed = Placement(lease.instance, node, lease.token, now)
        return [tx.put(key, json.dumps(dataclasses.asdict(placed)).encode())]

    async def record_placement(self, lease: Lease, node: str) -> Placement:
        now = time.time()
        await self._fenced(lease, self._place_ops(lease, node, now))
        return Placement(lease.instance, node, lease.token, now)

    async def forget_placement(self, lease: Lease) -> None:
        await self._fenced(lease, self._place_ops(lease, None, time.time()))

    # ------------------------------------------------------------------ journal

    def _entry_ops(self, entry: JournalEntry) -> list[Any]:
        tx = self.session.client.transactions
        record = dataclasses.asdict(dataclasses.replace(entry, progress=None))
        return [tx.put(self._entry_key(entry), json.dumps(record, default=str).encode())]

    def _entry_key(self, entry: JournalEntry) -> bytes:
        return self._k("journal", entry.instance, f"{entry.id:020d}")

    async def begin(self, lease: Lease, phase: str, details: dict[str, Any]) -> JournalEntry:
        now = time.time()
        entry = JournalEntry(
            lease.token, lease.instance, lease.operation, lease.owner, lease.token,
            now, phase, dict(details), now,
        )  # fmt: skip
        tx = self.session.client.transactions
        ops = [
            *self._entry_ops(entry),
            tx.put(self._k("open", f"{entry.id:020d}"), lease.instance.encode()),
        ]
        await self._fenced(lease, ops)
        return entry

    async def _update_open(self, lease: Lease, entry: JournalEntry, extra: list[Any]) -> None:
        tx = self.session.client.transactions
        open_key = self._k("open", f"{entry.id:020d}")
        ok, replies = await self._txn(
            [*self._fencing(lease), tx.version(open_key) > 0],
            [*self._entry_ops(entry), *extra],
            [
                tx.get(self._k("leases", lease.instance)),
                tx.get(self.session.controller_key),
                tx.get(open_key),
            ],
        )
        if not ok:
            if not replies[2]:
                raise StoreError(f"journal entry {entry.id} is not open", path=self.path)
            raise self._lost(lease, replies)

    async def record_phase(
        self, lease: Lease, entry: JournalEntry, phase: str, details: dict[str, Any]
    ) -> JournalEntry:
        merged = {**entry.details, **details}
        changed = dataclasses.replace(entry, phase=phase, details=merged, updated_at=time.time())
        await self._update_open(lease, changed, [])
        return changed

    async def finish(
        self,
        lease: Lease,
        entry: JournalEntry,
        outcome: str,
        *,
        placement: PlacementChange | None = None,
        release: bool = False,
    ) -> JournalEntry:
        now = time.time()
        closed = dataclasses.replace(entry, finished_at=now, outcome=outcome, updated_at=now)
        tx = self.session.client.transactions
        ident = f"{entry.id:020d}"
        extra = [tx.delete(self._k("open", ident)), tx.delete(self._k("progress", ident))]
        if placement is not None:
            extra += self._place_ops(lease, placement.node, now)
        if release:
            extra += [tx.delete(self._k("leases", lease.instance))]
            extra += [tx.delete(self._k("cancel", lease.instance))]
        await self._update_open(lease, closed, extra)
        return closed

    async def record_progress(
        self, reports: list[tuple[Lease, JournalEntry, dict[str, Any]]]
    ) -> None:
        tx = self.session.client.transactions
        for start in range(0, len(reports), BATCH):
            nested = [
                tx.txn(
                    self._fencing(lease),
                    [
                        tx.put(
                            self._k("progress", f"{entry.id:020d}"), json.dumps(progress).encode()
                        )
                    ],
                    [],
                )
                for lease, entry, progress in reports[start : start + BATCH]
            ]
            await self._txn([], nested, [])

    async def _entries(self, keys: list[bytes]) -> list[JournalEntry]:
        """The entries at ``keys`` with their progress, read in batched transactions."""
        tx = self.session.client.transactions
        entries: list[JournalEntry] = []
        for start in range(0, len(keys), BATCH // 2):
            chunk = keys[start : start + BATCH // 2]
            ops = []
            for key in chunk:
                ident = key.rsplit(b"/", 1)[1].decode()
                ops += [tx.get(key), tx.get(self._k("progress", ident))]
            _, replies = await self._txn([], ops, [])
            for got, progress in zip(replies[::2], replies[1::2], strict=True):
                if got:
                    entry = _entry(json.loads(got[0][0]))
                    if progress:
                        entry = dataclasses.replace(entry, progress=json.loads(progress[0][0]))
                    entries.append(entry)
        return entries

    async def unfinished(self) -> list[JournalEntry]:
        found = sorted(await self._range_raw("open"), key=lambda kv: kv.key)
        keys = [
            self._k("journal", kv.value.decode(), kv.key.rsplit(b"/", 1)[1].decode())
            for kv in found
        ]
        return await self._entries(keys)

    async def _range_raw(self, *parts: str) -> list[Any]:
        client = self.session.client
        prefix = self._k(*parts) + b"/"
        return list(await self.session.call(lambda: client.get_prefix(prefix)))

    async def history(self, instance: str, limit: int = 20) -> list[JournalEntry]:
        mine = [
            _entry(record)
            for record, _ in await self._range("journal", instance)
            if record["instance"] == instance
        ]
        newest = sorted(mine, key=lambda e: e.id)[-limit:]
        return await self._entries([self._entry_key(e) for e in newest]) if newest else []


def _writes(op: Any) -> bool:
    return type(op).__name__ in ("Put", "Delete", "Txn")


def _entry(record: dict[str, Any]) -> JournalEntry:
    record = dict(record)
    record["owner"] = Owner(**record["owner"])
    return JournalEntry(**record)
