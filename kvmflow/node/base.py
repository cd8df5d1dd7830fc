"""What a node is: the place where commands run, files live and monitor sockets open.

The KVM layer never touches the local machine directly; it asks a :class:`Node`. This
machine is :class:`~kvmflow.node.local.LocalNode`; other machines are reached over SSH.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, Self, runtime_checkable

from kvmflow.errors import NodeError
from kvmflow.monitor.transport import Connector


@dataclass(frozen=True)
class CommandResult:
    """Exit status and output of a command run on a node."""

    argv: tuple[str, ...]
    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def error_text(self) -> str:
        """What the command said about its failure, for error messages."""
        text = (self.stderr or self.stdout).decode(errors="replace").strip()
        return text or f"exit status {self.returncode}"


@dataclass(frozen=True)
class NodeInfo:
    """Memory and CPU figures of a node (the ancestor's GetNodeInfo)."""

    memory_total_mib: int
    memory_free_mib: int
    memory_used_by_node_mib: int
    cpu_count: int
    cpu_sockets: int
    numa_nodes: int


@contextlib.contextmanager
def node_errors(node: str | None, doing: str, *kinds: type[BaseException]) -> Iterator[None]:
    """Translate a foreign failure (``OSError`` unless ``kinds`` says which) inside the block
    into :class:`NodeError` ``cannot <doing>: <why>`` at the node boundary."""
    caught = kinds or (OSError,)
    try:
        yield
    except caught as exc:
        why = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise NodeError(f"cannot {doing}: {why}", node=node) from exc


class NodeLifecycle:
    """``async with node:`` closes the node on exit (see :class:`Node`)."""

    async def aclose(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


@runtime_checkable
class Node(Protocol):
    """Operations the KVM layer needs from a machine.

    The code that creates a node owns it and closes it when done (``async with node:`` or
    ``await node.aclose()``): closing ends what the node keeps open (an SSH connection);
    a closed node opens it again on next use. An :class:`~kvmflow.engine.Engine` built with
    ``close_nodes=True`` closes the nodes it was given when it exits.
    """

    @property
    def name(self) -> str:
        """Human name of the node (host name or address)."""
        ...

    async def run(
        self, argv: list[str], *, stdin: bytes | None = None, timeout: float | None = None
    ) -> CommandResult:
        """Run a command (no shell) and return its result; raise NodeError if it cannot run."""
        ...

    async def read_file(self, path: str) -> bytes | None:
        """The file's bytes, or ``None`` if it does not exist."""
        ...

    async def write_file(self, path: str, data: bytes, mode: int = 0o600) -> None:
        """Write atomically (temp file + rename) with the given mode."""
        ...

    async def create_exclusive(self, path: str, data: bytes, mode: int = 0o600) -> bool:
        """Create a new file with ``data``; return False if it already exists."""
        ...

    async def remove(self, path: str) -> bool:
        """Remove a file or socket; return whether it existed."""
        ...

    async def make_dirs(self, path: str, mode: int = 0o700) -> None:
        """Create a directory and its parents; enforce ``mode`` on the last one."""
        ...

    async def path_kind(self, path: str) -> str | None:
        """``file``, ``directory`` or ``other`` (a device, a socket) for what ``path`` names,
        following symbolic links; ``None`` if nothing is there."""
        ...

    async def user_exists(self, name: str) -> bool:
        """Whether the node knows a user of that name."""
        ...

    async def list_dir(self, path: str) -> list[str]:
        """Names in a directory (empty if it does not exist)."""
        ...

    async def rename(self, source: str, target: str) -> None:
        """Rename within the node."""
        ...

    async def remove_tree(self, path: str) -> None:
        """Remove a directory tree if it exists."""
        ...

    async def process_cmdline(self, pid: int) -> list[str] | None:
        """The command line of a live process, or ``None`` if there is none (or a zombie)."""
        ...

    async def find_processes(self, argument: str) -> list[int]:
        """Pids of live processes that have ``argument`` as one of their command-line
        arguments (to find a process whose pid file is gone)."""
        ...

    async def signal_process(self, pid: int, sig: signal.Signals) -> bool:
        """Send a signal; return False if the process does not exist."""
        ...

    async def node_info(self) -> NodeInfo:
        """Memory and CPU figures."""
        ...

    def monitor_connector(self, path: str) -> Connector:
        """A connector to a unix socket on this node (for QMP/HMP clients)."""
        ...

    async def aclose(self) -> None:
        """End what the node keeps open; it reopens on next use."""
        ...
