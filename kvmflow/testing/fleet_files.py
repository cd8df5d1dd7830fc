"""The files of fake nodes (pid files, runtime files): in the node object's memory, or in
the fleet process, so that several controller processes see one node's files alike (as
they would on a real node) and a controller taking over another's nodes finds them.

:class:`NodeFiles` is the store of one node's files, used as it is in memory and by the
fleet process for every node (:func:`fleet_files_op`); :class:`FleetFiles` is a node's
view of its files in the fleet process.
"""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable
from typing import Any


class NodeFiles:
    """One node's files, by path (the same calls as :class:`FleetFiles`)."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}

    async def read(self, path: str) -> bytes | None:
        return self.files.get(path)

    async def write(self, path: str, data: bytes) -> None:
        self.files[path] = data

    async def create(self, path: str, data: bytes) -> bool:
        if path in self.files:
            return False
        self.files[path] = data
        return True

    async def remove(self, path: str) -> bool:
        return self.files.pop(path, None) is not None

    async def kind(self, path: str) -> str | None:
        if path in self.files:
            return "file"
        if any(name.startswith(path.rstrip("/") + "/") for name in self.files):
            return "directory"
        return None

    async def list(self, path: str) -> list[str]:
        prefix = path.rstrip("/") + "/"
        return sorted({p[len(prefix) :].split("/")[0] for p in self.files if p.startswith(prefix)})

    async def rename(self, source: str, target: str) -> None:
        self.files[target] = self.files.pop(source)

    async def remove_tree(self, path: str) -> None:
        for name in [p for p in self.files if p.startswith(path.rstrip("/") + "/")]:
            del self.files[name]


async def fleet_files_op(nodes: dict[str, NodeFiles], request: dict[str, Any]) -> Any:
    """The fleet process's side of :class:`FleetFiles` (data travels as base64)."""
    files = nodes.setdefault(request["node"], NodeFiles())
    action, args = request["action"], request.get("args", [])
    if action in ("write", "create"):
        args = [args[0], base64.b64decode(args[1])]
    result = await getattr(files, action)(*args)
    if isinstance(result, bytes):
        return base64.b64encode(result).decode()
    return result


class FleetFiles:
    """A node's files kept by the fleet process (one round trip a call)."""

    def __init__(self, node: str, call: Callable[..., Awaitable[Any]]) -> None:
        self.node, self._call = node, call

    async def _op(self, action: str, *args: Any) -> Any:
        return await self._call(op="files", node=self.node, action=action, args=list(args))

    async def read(self, path: str) -> bytes | None:
        data = await self._op("read", path)
        return base64.b64decode(data) if data is not None else None

    async def write(self, path: str, data: bytes) -> None:
        await self._op("write", path, base64.b64encode(data).decode())

    async def create(self, path: str, data: bytes) -> bool:
        return bool(await self._op("create", path, base64.b64encode(data).decode()))

    async def remove(self, path: str) -> bool:
        return bool(await self._op("remove", path))

    async def kind(self, path: str) -> str | None:
        kind = await self._op("kind", path)
        return str(kind) if kind is not None else None

    async def list(self, path: str) -> list[str]:
        return list(await self._op("list", path))

    async def rename(self, source: str, target: str) -> None:
        await self._op("rename", source, target)

    async def remove_tree(self, path: str) -> None:
        await self._op("remove_tree", path)
