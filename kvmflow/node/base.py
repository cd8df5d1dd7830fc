"""What a node is: the place where commands run, files live and monitor sockets open.

The KVM layer never touches the local machine directly; it asks a :class:`Node`. This
machine is :class:`~kvmflow.node.local.LocalNode`; other machines are reached over SSH.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from kvmflow.errors import KvmflowError
from kvmflow.monitor.transport import Connector


class NodeError(KvmflowError):
    """A node could not do what was asked (command failed to run, file unreadable, ...)."""

    def __init__(self, message: str, *, node: str | None = None) -> None:
        self.node = node
        super().__init__(f"{message} [node {node}]" if node else message)


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


@runtime_checkable
class Node(Protocol):
    """Operations the KVM layer needs from a machine."""

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
