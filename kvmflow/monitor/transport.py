"""Where monitor byte streams come from.

A :class:`Connector` opens one anyio byte stream to a monitor and names it for error
messages. The monitor clients only ever see the stream, so a unix socket on this machine and
a socket forwarded through SSH from another node look the same to them.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import anyio
import anyio.abc

from kvmflow.errors import MisuseError, TransportError


@runtime_checkable
class Connector(Protocol):
    """Opens a fresh byte stream to one monitor each time :meth:`connect` is awaited."""

    @property
    def description(self) -> str:
        """A short human name for the monitor, used in errors and logs."""
        ...

    async def connect(self) -> anyio.abc.ByteStream:
        """Open the stream; raise :class:`TransportError` if the monitor cannot be reached."""
        ...


@dataclass(frozen=True, slots=True)
class UnixSocketConnector:
    """A monitor listening on a unix socket of this machine."""

    path: str

    @property
    def description(self) -> str:
        return self.path

    async def connect(self) -> anyio.abc.ByteStream:
        try:
            return await anyio.connect_unix(self.path)
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise TransportError(
                f"cannot connect to monitor socket: {reason}", monitor=self.path
            ) from exc


@dataclass(frozen=True, slots=True)
class StreamFactoryConnector:
    """A monitor reached by any coroutine that returns a byte stream (for example over SSH)."""

    name: str
    factory: Callable[[], Awaitable[anyio.abc.ByteStream]]

    @property
    def description(self) -> str:
        return self.name

    async def connect(self) -> anyio.abc.ByteStream:
        try:
            return await self.factory()
        except TransportError:
            raise
        except OSError as exc:
            raise TransportError(f"cannot open monitor stream: {exc}", monitor=self.name) from exc


MonitorAddress = Connector | str | os.PathLike[str]


def as_connector(address: MonitorAddress) -> Connector:
    """Accept a connector or a unix socket path and return a connector."""
    if isinstance(address, (str, os.PathLike)):
        return UnixSocketConnector(os.fspath(address))
    if isinstance(address, Connector):
        return address
    raise MisuseError(f"a monitor address is a socket path or a Connector, got {address!r}")


@dataclass(frozen=True, slots=True)
class FirstReachable:
    """The first of several connectors that connects (a monitor with a spare socket, and
    a QEMU of older days without it)."""

    connectors: tuple[Connector, ...]

    @property
    def description(self) -> str:
        return self.connectors[0].description

    async def connect(self) -> anyio.abc.ByteStream:
        for connector in self.connectors[:-1]:
            try:
                return await connector.connect()
            except TransportError:
                continue
        return await self.connectors[-1].connect()
