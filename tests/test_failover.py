"""The fence of last resort and failover: a node power-cycled (recorded by a fake node: the
machine the tests run on is never reset), and an instance started elsewhere only when no
reachable node runs a copy and its lost node was fenced."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from kvmflow.errors import MisuseError, NodeError
from kvmflow.node import CommandResult, LocalNode, SSHNode, SSHTarget
from kvmflow.node.power import SYSRQ_RESET, is_this_machine, powercycle
from kvmflow.store import Owner, SQLiteStore
from tests.conftest import qemus_under
from tests.test_cli_commands import kvmflow


class RecordingLocalNode(LocalNode):
    """This machine, whose commands are recorded instead of run (it must be refused)."""

    def __init__(self, name: str, *, dies: bool = False) -> None:
        super().__init__(name)
        self.commands: list[list[str]] = []
        self.dies = dies

    async def run(
        self, argv: list[str], *, stdin: bytes | None = None, timeout: float | None = None
    ) -> CommandResult:
        self.commands.append(argv)
        if self.dies and argv == SYSRQ_RESET:
            raise NodeError("the connection was lost", node=self.name)
        return CommandResult(tuple(argv), 0, b"", b"")


class FakeRemoteNode(RecordingLocalNode):
    """A node standing for another machine (what a real SSH node elsewhere would be)."""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_powercycle_syncs_then_resets_and_refuses_this_machine(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    local = RecordingLocalNode("here")
    with pytest.raises(MisuseError, match="the machine kvmflow runs on"):
        await powercycle(local)
    assert local.commands == []  # refused before anything ran

    remote = FakeRemoteNode("there", dies=True)
    monkeypatch.setattr("kvmflow.node.power.is_this_machine", lambda node: False)
    await powercycle(remote)  # the node dying during the reset is the expected end
    assert remote.commands == [["sync"], SYSRQ_RESET]


def test_which_nodes_are_this_machine() -> None:
    assert is_this_machine(LocalNode("here"))
    assert is_this_machine(SSHNode("loop", SSHTarget("127.0.0.2")))
    assert is_this_machine(SSHNode("named", SSHTarget("localhost")))
    # TEST-NET-2 (RFC 5737): never this machine; nothing connects to it here.
    assert not is_this_machine(SSHNode("far", SSHTarget("198.51.100.7")))


def test_powercycle_of_this_machine_is_refused_by_the_cli(runtime_root: Path) -> None:
    config = runtime_root / "k.toml"
    config.write_text(f'[nodes.here]\nruntime_root = "{runtime_root}/here"\n')
    refused = kvmflow("node", "powercycle", "here", config=config)
    assert refused.returncode == 1
    assert "is the machine kvmflow runs on; pass --allow-this-machine" in refused.stderr


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port on 127.0.0.2 where nothing listens: a node that does not answer."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.2", 0))
        yield holder.getsockname()[1]


@pytest.fixture
def lost_config(runtime_root: Path, closed_port: int) -> Path:
    path = runtime_root / "k.toml"
    path.write_text(f"""
[nodes.alpha]
runtime_root = "{runtime_root}/alpha"
[nodes.beta]
runtime_root = "{runtime_root}/beta"
[nodes.lost]
host = "127.0.0.2"
port = {closed_port}
runtime_root = "/run/kvmflow-lost"
migration_address = "127.0.0.2"

[instances.f1]
node = "lost"
memory_mib = 64
""")
    return path


def place(store_path: Path, name: str, node: str) -> None:
    async def record() -> None:
        async with await SQLiteStore.open(store_path) as store:
            lease = await store.acquire(name, Owner.this_process("lost-controller"), "start", 30)
            await store.record_placement(lease, node)
            await store.release(lease)

    anyio.run(record)


def test_failover_needs_a_fence_and_never_makes_a_second_copy(
    lost_config: Path, own_store: Path, runtime_root: Path
) -> None:
    place(own_store, "f1", "lost")  # it ran on the node that stopped answering
    refused = kvmflow("failover", "f1", "--to", "alpha", config=lost_config)
    assert refused.returncode == 1
    assert "node lost does not answer and was not fenced" in refused.stderr
    assert "kvmflow node powercycle lost" in refused.stderr
    assert qemus_under(runtime_root) == []  # nothing started

    done = kvmflow("failover", "f1", "--to", "alpha", "--node-is-down", config=lost_config)
    assert done.returncode == 0, done.stderr
    assert "failed f1 over to alpha" in done.stdout
    listed = json.loads(kvmflow("list", "--json", config=lost_config).stdout)
    assert [(r["instance"], r["node"], r["recorded_node"]) for r in listed] == [
        ("f1", "alpha", "alpha")
    ]

    twice = kvmflow("failover", "f1", "--to", "beta", "--node-is-down", config=lost_config)
    assert twice.returncode == 1  # recorded on alpha, where a copy runs
    assert "has a running copy on alpha" in twice.stderr
    assert qemus_under(runtime_root / "beta") == []
    assert kvmflow("stop", "f1", "--force", config=lost_config).returncode == 0
    unknown = kvmflow("failover", "f1", "--to", "beta", config=lost_config)
    assert unknown.returncode == 1
    assert "no record of where f1 runs: start it instead" in unknown.stderr


def test_a_powercycle_fence_lets_failover_go(
    lost_config: Path, own_store: Path, runtime_root: Path
) -> None:
    place(own_store, "f1", "lost")

    async def fenced() -> None:
        async with await SQLiteStore.open(own_store) as store:
            await store.record_fence("lost", "the operator", "powercycle")

    anyio.run(fenced)
    done = kvmflow("failover", "f1", "--to", "beta", config=lost_config)
    assert done.returncode == 0, done.stderr
    assert kvmflow("stop", "f1", "--force", config=lost_config).returncode == 0
    assert qemus_under(runtime_root) == []
