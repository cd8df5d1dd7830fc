"""One controller's session with an etcd cluster: the connection, its etcd lease, and the
local clock that says how long the lease surely holds.

The client is aetcd (asyncio, gRPC), run on a loop of its own (:mod:`kvmflow.store.bridge`)
so that kvmflow works the same on asyncio and trio. Its channel names every member
(``ipv4:a:p,b:p``, round robin), so a member lost costs one failed call, retried on the
next; TLS client certificates and user/password come from :class:`EtcdTarget`.

The session holds one etcd lease (``ttl`` seconds) with the controller's key
``PREFIX/controllers/ID`` attached: it is the controller's liveness. A keep-alive runs
every third of the TTL. After each answered keep-alive, the lease surely holds until
*(time the keep-alive was sent) + TTL* (etcd only extends a lease, also through a leader
election): :attr:`EtcdSession.valid_until`, on the monotonic clock, is what fencing checks
before every QEMU-changing step, together with a transaction. A keep-alive answered with
TTL 0 means the lease is gone (the controller was paused or partitioned past it): the
session is lost for good (:attr:`EtcdSession.lost`) and the controller stands down.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import json
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aetcd
import aetcd.exceptions
import aetcd.rpc
import aetcd.watcher
import anyio
import grpc

from kvmflow._logging import get_logger
from kvmflow.errors import ConfigError, FieldProblem, LeaseLostError, StoreError
from kvmflow.errors import StoreUnavailableError as Unavailable
from kvmflow.store.base import Owner
from kvmflow.store.bridge import LoopThread

_log = get_logger("kvmflow.store")
T = TypeVar("T")

#: Failures that mean "no answer" (a member down, no leader, no quorum), as opposed to an
#: answer that refuses.
_NO_ANSWER = (aetcd.exceptions.ConnectionFailedError, aetcd.exceptions.ConnectionTimeoutError)


@dataclass(frozen=True)
class EtcdTarget:
    """Where the cluster is and how to log in: members ``host:port``, the key prefix,
    TLS files (CA, client certificate and key) and user/password, all optional."""

    endpoints: tuple[str, ...]
    prefix: str = "/kvmflow"
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    user: str | None = None
    password: str | None = None
    request_timeout: float = 2.0

    def __str__(self) -> str:
        return "etcd://" + ",".join(self.endpoints) + self.prefix

    def grpc_target(self) -> str:
        """The gRPC target naming every member (names resolved now: gRPC's ``ipv4:``
        scheme takes several addresses, ``dns:`` only one name)."""
        addresses = []
        for endpoint in self.endpoints:
            host, _, port = endpoint.rpartition(":")
            host = host.strip("[]")
            try:
                ip = ipaddress.ip_address(host)
            except ValueError:
                try:
                    ip = ipaddress.ip_address(socket.getaddrinfo(host, port)[0][4][0])
                except OSError as exc:
                    raise ConfigError(
                        [FieldProblem("store", endpoint, f"a resolvable host ({exc})")]
                    ) from None
            addresses.append(f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}")
        return "ipv4:" + ",".join(addresses)

    def credentials(self) -> Any:
        """gRPC channel credentials, or ``None`` for a plain channel."""
        if not (self.ca_file or self.cert_file):
            return None
        if bool(self.cert_file) != bool(self.key_file):
            raise ConfigError([FieldProblem("store", str(self), "both cert= and key=, or neither")])

        def read(path: str | None) -> bytes | None:
            if path is None:
                return None
            try:
                return Path(path).read_bytes()
            except OSError as exc:
                raise ConfigError(
                    [FieldProblem("store", path, f"a readable TLS file ({exc.strerror})")]
                ) from None

        return grpc.ssl_channel_credentials(
            read(self.ca_file), read(self.key_file), read(self.cert_file)
        )


class _Client(aetcd.Client):  # type: ignore[misc]
    """aetcd's client on a channel of our own: every member, and TLS when asked (aetcd
    itself opens one plain channel to one host)."""

    def __init__(self, target: EtcdTarget) -> None:
        super().__init__(
            username=target.user, password=target.password, timeout=target.request_timeout
        )
        self._target = target

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        options = [("grpc.lb_policy_name", "round_robin")]
        address, credentials = self._target.grpc_target(), self._target.credentials()
        if credentials is None:
            self.channel = aetcd.rpc.insecure_channel(address, options=options)
        else:
            self.channel = aetcd.rpc.secure_channel(address, credentials, options=options)
        if self._username is not None:
            request = aetcd.rpc.AuthenticateRequest(name=self._username, password=self._password)
            try:
                reply = await aetcd.rpc.AuthStub(self.channel).Authenticate(
                    request, timeout=self._timeout
                )
            except aetcd.rpc.AioRpcError as exc:
                aetcd.exceptions._handle_exception(exc)
            self.metadata = (("token", reply.token),)
        self.kvstub = aetcd.rpc.KVStub(self.channel)
        self.clusterstub = aetcd.rpc.ClusterStub(self.channel)
        self.leasestub = aetcd.rpc.LeaseStub(self.channel)
        self.maintenancestub = aetcd.rpc.MaintenanceStub(self.channel)
        self._watcher = aetcd.watcher.Watcher(
            aetcd.rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata
        )
        self._connected.set()


class EtcdSession:
    """A controller's connection and lease; see the module docstring."""

    def __init__(self, target: EtcdTarget, owner: Owner, ttl: int, role: str) -> None:
        self.target, self.owner, self.ttl, self.role = target, owner, ttl, role
        self.prefix = target.prefix.rstrip("/").encode()
        self.thread = LoopThread(f"kvmflow-etcd-{owner.controller}")
        self.client = _Client(target)
        self.lease_id = 0
        self.key_revision = 0  # create_revision of our controller key: this incarnation
        self.valid_until = 0.0  # monotonic: the lease surely holds until then
        self.lost: str | None = None  # why the session is gone for good
        self.unanswered_since: float | None = None  # monotonic, while keep-alives fail
        self._keepalive: Any = None
        self._closed = False

    def key(self, *parts: str) -> bytes:
        return b"/".join([self.prefix, *(part.encode() for part in parts)])

    @property
    def controller_key(self) -> bytes:
        return self.key("controllers", self.owner.controller)

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Grant the lease, register the controller (refused while another live process
        uses its id) and start the keep-alive."""
        try:
            await self.call(self._register)
        except BaseException:
            await self.close()
            raise
        self._keepalive = self.thread.submit(self._keep_alive)

    async def _register(self) -> None:
        sent = time.monotonic()
        lease = await self.client.lease(self.ttl)
        value = json.dumps(
            {**owner_record(self.owner), "ttl": self.ttl, "lease": lease.id, "role": self.role}
        ).encode()
        tx = self.client.transactions
        ok, replies = await self.client.transaction(
            compare=[tx.version(self.controller_key) == 0],
            success=[tx.put(self.controller_key, value, lease.id), tx.get(self.controller_key)],
            failure=[tx.get(self.controller_key)],
        )
        if not ok:
            await self.client.revoke_lease(lease.id)
            held = json.loads(replies[0][0][0]) if replies and replies[0] else {}
            raise StoreError(
                f"controller id {self.owner.controller!r} is already registered by pid "
                f"{held.get('pid')} on {held.get('host')}: give each controller its own id, "
                "or wait for that one's lease to expire",
                path=str(self.target),
            )
        self.lease_id, self.key_revision = lease.id, replies[1][0][1].create_revision
        self.valid_until = sent + self.ttl

    async def _keep_alive(self) -> None:
        """On the client's loop: refresh the lease every third of its TTL."""
        while self.lost is None:
            await asyncio.sleep(self.ttl / 3 if self.unanswered_since is None else 0.25)
            await self.refresh()

    async def refresh(self) -> None:
        """One keep-alive (on the client's loop); updates the validity or the loss."""
        sent = time.monotonic()
        try:
            reply = await asyncio.wait_for(self.client.refresh_lease(self.lease_id), self.ttl / 3)
        except (TimeoutError, *_NO_ANSWER, aetcd.exceptions.ClientError) as exc:
            if self.unanswered_since is None:
                self.unanswered_since = sent
                _log.warning(
                    "etcd does not answer the keep-alive",
                    store=str(self.target),
                    error=str(exc) or type(exc).__name__,
                )
            return
        if reply is None or reply.TTL <= 0:
            self.lost = (
                f"the etcd lease of controller {self.owner.controller} expired (paused or cut "
                "off longer than its TTL): another controller may own its work now"
            )
            _log.error("controller session lost; standing down", reason=self.lost)
            return
        if self.unanswered_since is not None:
            _log.warning("etcd answers again", store=str(self.target))
            self.unanswered_since = None
        self.valid_until = max(self.valid_until, sent + reply.TTL)

    async def close(self) -> None:
        """Revoke the lease (the controller leaves at once, its nodes free) and stop; a
        second close does nothing."""
        if self._closed:
            return
        self._closed = True

        async def leave() -> None:
            if self.lease_id and self.lost is None:
                with contextlib.suppress(asyncio.TimeoutError, aetcd.exceptions.ClientError):
                    await asyncio.wait_for(self.client.revoke_lease(self.lease_id), 2)
            await self.client.close()

        if self._keepalive is not None:
            self._keepalive.cancel()
        try:
            with anyio.CancelScope(shield=True):
                await self.thread.call(leave)
        finally:
            self.thread.stop()

    # ------------------------------------------------------------------- calls

    def remaining(self) -> float:
        """Seconds the lease surely holds from now (negative once it may be gone)."""
        return self.valid_until - time.monotonic()

    def check(self) -> None:
        """Refuse to write through a lost session."""
        if self.lost is not None:
            raise LeaseLostError(self.lost, path=str(self.target))

    async def call(self, factory: Callable[[], Awaitable[T]], *, attempts: int = 3) -> T:
        """Run one client call on its loop: an unanswered call is tried again on another
        member (``attempts`` in all), then :class:`StoreUnavailableError`; any other
        failure is a :class:`StoreError`."""
        if self._closed:
            raise StoreError("the store session is closed", path=str(self.target))

        async def run() -> T:
            started = time.monotonic()
            for attempt in range(attempts):
                try:
                    try:
                        return await factory()
                    except aetcd.exceptions.ClientError as exc:
                        if _means_no_answer(exc):
                            raise aetcd.exceptions.ConnectionTimeoutError(str(exc)) from None
                        raise
                except _NO_ANSWER as exc:
                    # Another member may answer; a whole timeout spent is enough, though.
                    last = attempt == attempts - 1 or (
                        time.monotonic() - started > self.target.request_timeout
                    )
                    _log.warning(
                        "etcd does not answer; giving up"
                        if last
                        else "etcd does not answer; trying again",
                        store=str(self.target),
                        attempt=attempt + 1,
                        error=str(exc) or type(exc).__name__,
                    )
                    if last:
                        raise Unavailable(
                            f"etcd at {self.target} does not answer ({exc or type(exc).__name__}):"
                            " no quorum, or no member reachable; nothing was written, and new"
                            " operations are refused until it answers",
                            path=str(self.target),
                        ) from None
                    await asyncio.sleep(0.1 * (attempt + 1))
                except aetcd.exceptions.ClientError as exc:
                    raise StoreError(f"etcd refused: {exc}", path=str(self.target)) from None
            raise AssertionError("unreachable")

        return await self.thread.call(run)

    # ------------------------------------------------------------------ watches

    def watch(self, *kinds: str) -> Callable[[float], Awaitable[bool]]:
        """A waiter that returns ``True`` when a key under any of ``kinds`` (``"nodes"``,
        ...) changed, or ``False`` after its timeout; fed by etcd watches re-established
        after any failure."""
        event = asyncio.Event()  # only touched on the client's loop
        for kind in kinds:
            prefix = self.key(kind) + b"/"
            self.thread.submit(functools.partial(self._watch_forever, prefix, event))

        async def wait(timeout: float) -> bool:
            if self._closed:
                raise StoreError("the store session is closed", path=str(self.target))

            async def on_loop() -> bool:
                try:
                    await asyncio.wait_for(event.wait(), timeout)
                except TimeoutError:
                    return False
                event.clear()
                return True

            return await self.thread.call(on_loop)

        return wait

    async def _watch_forever(self, prefix: bytes, event: asyncio.Event) -> None:
        while self.lost is None:
            try:
                async for _ in await self.client.watch_prefix(prefix):
                    event.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                _log.info(
                    "etcd watch broke; watching again", prefix=prefix.decode(), error=str(exc)
                )
            event.set()  # something may have changed while not watching
            await asyncio.sleep(0.5)


#: What etcd says when it cannot serve a request now (no leader, no quorum), as errors of
#: their own code.
_NO_ANSWER_TEXTS = (
    "context deadline exceeded",
    "request timed out",
    "no leader",
    "leader changed",
    "too many requests",
)


def _means_no_answer(exc: Exception) -> bool:
    text = str(exc)
    return any(fragment in text for fragment in _NO_ANSWER_TEXTS)


def owner_record(owner: Owner) -> dict[str, Any]:
    return {
        "controller": owner.controller,
        "host": owner.host,
        "pid": owner.pid,
        "pid_started": owner.pid_started,
    }


def owner_from(record: dict[str, Any]) -> Owner:
    return Owner(record["controller"], record["host"], record["pid"], record["pid_started"])
