"""Controllers as a cluster, for real: two controller processes (``tests/cluster_controller``)
share a real 3-member etcd cluster and real QEMUs on the nodes node-a and node-b.

Each trial ends with exactly one running copy of the guest, the journal closed by whoever
finished the work, and no command from a controller that lost its lease. The moments of
misbehaviour (SIGKILL, SIGSTOP) are hooks at a phase, never a sleep.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import psutil
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from kvmflow.engine.reality import CopyState, survey
from kvmflow.engine.shards import owner_of
from kvmflow.guest import dirty_guest_spec, wait_for_sweeps
from kvmflow.instance import Instance
from kvmflow.kvm import KvmHypervisor
from kvmflow.monitor import RunState, query_status
from kvmflow.store import Owner
from kvmflow.store.etcd import EtcdStore
from kvmflow.store.url import etcd_target
from kvmflow.testing.etcd import EtcdCluster
from tests.conftest import qemus_under

pytestmark = pytest.mark.anyio

TTL = 3
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def controller_ids(node: str = "node-a") -> tuple[str, str]:
    """Two controller ids, the first of which wins ``node`` (rendezvous hashing)."""
    for i in range(100):
        first, second = f"ctl-a{i}", f"ctl-b{i}"
        if owner_of(node, [first, second]) == first:
            return first, second
    raise AssertionError("no pair of ids found")


async def calm_guest(hv: KvmHypervisor, guest: Path, name: str = "vm") -> None:
    """The dirtying guest, slowed down (8 MiB a sweep, then a pause) so that a migration
    at the test policies' 30 MiB/s converges in a few seconds."""
    spec = dirty_guest_spec(name, guest, migration_port=0, mib=8, pause=20)
    await Instance(spec, hv).start()
    await wait_for_sweeps(hv, name)


class ControllerProcess:
    """A controller subprocess: commands on its stdin, its JSON events read from stdout,
    its log (stderr) kept in a file."""

    def __init__(self, process: anyio.abc.Process, ident: str, log: Path) -> None:
        assert process.stdout is not None
        self.process, self.ident, self.log = process, ident, log
        self._lines = BufferedByteReceiveStream(process.stdout)
        self.events: list[dict[str, Any]] = []

    @classmethod
    async def start(cls, url: str, ident: str, root: Path, logs: Path) -> ControllerProcess:
        log = logs / f"{ident}.log"
        process = await anyio.open_process(
            [sys.executable, "-m", "tests.cluster_controller", url, ident, str(root), str(TTL)],
            cwd=REPO,
            stderr=log.open("wb"),
        )
        controller = cls(process, ident, log)
        await controller.event("ready", timeout=30)
        return controller

    async def event(self, kind: str, timeout: float = 30) -> dict[str, Any]:
        """The next event of ``kind`` (the others are kept in :attr:`events`)."""
        with anyio.move_on_after(timeout):
            while True:
                try:
                    line = await self._lines.receive_until(b"\n", 1 << 20)
                except anyio.EndOfStream:
                    raise AssertionError(
                        f"{self.ident} ended before {kind!r}: {self.events} {self.log_text()}"
                    ) from None
                if not line.startswith(b"{"):
                    continue
                event = json.loads(line)
                self.events.append(event)
                if event["event"] == kind:
                    return dict(event)
        raise AssertionError(f"{self.ident}: no {kind!r} in {timeout} s: {self.events}")

    async def takeover_of(self, node: str, timeout: float) -> dict[str, Any]:
        """The takeover event that includes ``node`` (earlier ones: the initial shard)."""
        deadline = time.monotonic() + timeout
        while True:
            event = await self.event("takeover", timeout=deadline - time.monotonic())
            if node in event["nodes"]:
                return event

    async def send(self, **command: Any) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send(json.dumps(command).encode() + b"\n")

    async def close_commands(self) -> None:
        """No more commands: the controller exits once it stood down."""
        assert self.process.stdin is not None
        await self.process.stdin.aclose()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    async def stop(self) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGCONT)
            self.process.kill()
        with anyio.move_on_after(10):
            await self.process.wait()


async def client_store(cluster: EtcdCluster, prefix: str) -> EtcdStore:
    """A store session of the test itself (a client: it holds no shard)."""
    return await EtcdStore.open(
        etcd_target(cluster.url(prefix)), Owner.this_process("test-client"), ttl=TTL
    )


async def assert_only_copy(
    nodes: tuple[KvmHypervisor, KvmHypervisor], name: str, node: str
) -> None:
    by_name = {hv.node.name: hv for hv in nodes}
    copies = (await survey(by_name, [name])).get(name, [])
    assert [(c.node, c.state) for c in copies] == [(node, CopyState.RUNNING)]
    async with by_name[node].qmp(name) as qmp:
        assert (await query_status(qmp)).state is RunState.RUNNING
    other = next(hv for hv in nodes if hv.node.name != node)
    assert qemus_under(Path(other.paths.root)) == []


@pytest.fixture
async def pair(
    etcd: EtcdCluster,
    nodes: tuple[KvmHypervisor, KvmHypervisor],
    runtime_root: Path,
    tmp_path: Path,
) -> Any:
    """Controllers A (which wins node-a) and B, both ready; stopped in teardown."""
    first, second = controller_ids()
    url = etcd.url("/pair")
    started: list[ControllerProcess] = []
    try:
        a = await ControllerProcess.start(url, first, runtime_root, tmp_path)
        started.append(a)
        b = await ControllerProcess.start(url, second, runtime_root, tmp_path)
        started.append(b)
        yield a, b, url
    finally:
        for controller in started:
            await controller.stop()


async def test_a_controller_killed_mid_stream_is_taken_over_and_the_migration_adopted(
    pair: Any,
    etcd: EtcdCluster,
    nodes: tuple[KvmHypervisor, KvmHypervisor],
    dirty_guest: Path,
) -> None:
    a, b, _ = pair
    await calm_guest(nodes[0], dirty_guest)
    await a.send(
        do="migrate", name="vm", target="node-b", policy="converging", hook="kill-at-active"
    )
    with anyio.fail_after(30):
        await a.process.wait()
    assert a.process.returncode == -signal.SIGKILL
    killed_at = time.time()
    takeover = await b.takeover_of("node-a", timeout=TTL + 60)
    assert takeover["claimed_at"] - killed_at <= TTL + 10
    assert [r["instance"] for r in takeover["reports"]] == ["vm"]
    await assert_only_copy(nodes, "vm", "node-b")
    async with await client_store(etcd, "/pair") as store:
        assert await store.unfinished() == []
        [entry] = await store.history("vm")
        assert entry.outcome is not None
        assert entry.outcome.startswith("recovered")
        assert await store.holder("vm") is None
        assert {c.id for c in await store.controllers()} == {b.ident, "test-client"}


async def test_a_frozen_controller_wakes_fenced_sends_nothing_and_stands_down(
    pair: Any,
    etcd: EtcdCluster,
    nodes: tuple[KvmHypervisor, KvmHypervisor],
    dirty_guest: Path,
) -> None:
    a, b, _ = pair
    source = nodes[0]
    await calm_guest(source, dirty_guest)
    pid = await source.find_pid("vm")
    await a.send(
        do="migrate", name="vm", target="node-b", policy="converging", hook="freeze-at-streaming"
    )
    await a.event("freezing")
    with anyio.fail_after(5):
        while psutil.Process(a.process.pid).status() != psutil.STATUS_STOPPED:
            await anyio.sleep(0.05)
    # Frozen longer than its TTL: B takes node-a over and settles the migration.
    takeover = await b.takeover_of("node-a", timeout=TTL + 60)
    assert [r["instance"] for r in takeover["reports"]] == ["vm"], takeover
    os.kill(a.process.pid, signal.SIGCONT)
    await a.event("standing-down", timeout=TTL + 10)
    await a.close_commands()
    with anyio.fail_after(10):
        await a.process.wait()
    assert a.process.returncode == 0
    # Through the monitor: `migrate` never reached the source (A's next step after the
    # freeze), and the source is the same QEMU, running its guest.
    async with source.qmp("vm") as qmp:
        assert await qmp.execute("query-migrate") == {}
    assert await source.find_pid("vm") == pid
    await assert_only_copy(nodes, "vm", "node-a")
    # Through the log: every step A tried after waking was fenced.
    fenced = [line for line in a.log_text().splitlines() if "fenced: not taking" in line]
    assert any("step='qmp migrate on" in line for line in fenced), fenced
    assert any("step='qmp migrate_cancel on" in line for line in fenced), fenced
    async with await client_store(etcd, "/pair") as store:
        assert await store.unfinished() == []
        [entry] = await store.history("vm")
        assert entry.outcome is not None
        assert entry.outcome.startswith("recovered")


async def test_two_controllers_asked_at_once_one_proceeds_the_other_names_the_owner(
    pair: Any,
    nodes: tuple[KvmHypervisor, KvmHypervisor],
    dirty_guest: Path,
) -> None:
    a, b, _ = pair
    await calm_guest(nodes[0], dirty_guest)
    for controller in (a, b):
        await controller.send(do="migrate", name="vm", target="node-b", policy="converging")
    refused = await b.event("refused")
    assert refused["error"] == "NodeNotHeldError"
    assert f"managed by controller {a.ident}" in refused["detail"]
    result = await a.event("result", timeout=60)
    assert result["runs_on"] == "node-b"
    await assert_only_copy(nodes, "vm", "node-b")
