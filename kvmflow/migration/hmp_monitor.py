"""The explicit HMP fallback for migrating a source that has no QMP socket.

:class:`HmpMigrationMonitor` speaks the few QMP commands the migration coroutine needs by
translating them to HMP lines on an :class:`~kvmflow.monitor.hmp.HMPClient` (QEMU 7.2's
``migrate_set_parameter``/``migrate_set_capability``, ``migrate -d``, ``info migrate``,
``info status``) and parsing the text back into QMP-shaped answers. HMP has no events, so
its subscriptions never deliver anything and the watcher falls back to polling. The
ancestor's ``migrate_set_speed``/``migrate_set_downtime`` no longer exist in QEMU 7.2.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any

from kvmflow.errors import ConnectionLostError, MisuseError
from kvmflow.monitor.events import EventSubscription
from kvmflow.monitor.hmp import HMPClient

_STATUS = re.compile(r"VM status: (\w+)(?: \(([\w-]+)\))?")
_INT_FIELDS = {
    "total time": ("total-time", 1),
    "downtime": ("downtime", 1),
    "expected downtime": ("expected-downtime", 1),
}
_RAM_FIELDS = {
    "transferred ram": ("transferred", 1024),
    "remaining ram": ("remaining", 1024),
    "total ram": ("total", 1024),
    "dirty sync count": ("dirty-sync-count", 1),
    "page size": ("page-size", 1024),
    "dirty pages rate": ("dirty-pages-rate", 1),
}


def parse_info_status(text: str) -> dict[str, Any]:
    """``VM status: paused (postmigrate)`` -> ``{"status": "postmigrate", "running": False}``."""
    match = _STATUS.search(text)
    if match is None:
        return {}
    state, detail = match.group(1), match.group(2)
    return {"status": detail or state, "running": state == "running"}


def parse_info_migrate(text: str) -> dict[str, Any]:
    """The text of ``info migrate`` as a ``query-migrate`` answer (``{}`` before any)."""
    answer: dict[str, Any] = {}
    ram: dict[str, Any] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip().lower(), value.strip()
        number = value.split()[0] if value else ""
        if key == "migration status":
            answer["status"] = value
        elif key in _INT_FIELDS and number.isdigit():
            name, scale = _INT_FIELDS[key]
            answer[name] = int(number) * scale
        elif key in _RAM_FIELDS and number.isdigit():
            name, scale = _RAM_FIELDS[key]
            ram[name] = int(number) * scale
        elif key == "throughput":
            with contextlib.suppress(ValueError):
                ram["mbps"] = float(number)
        elif key.startswith("error"):
            answer["error-desc"] = value
    if ram and "status" in answer:
        answer["ram"] = ram
    return answer


class HmpMigrationMonitor:
    """Looks like the part of a QMP client that migration uses; speaks HMP underneath."""

    def __init__(self, hmp: HMPClient) -> None:
        self.hmp = hmp
        self.name = hmp.name

    async def reconnect(self) -> None:
        await self.hmp.reconnect()

    def subscribe(self, *names: str, max_buffered: int = 1000) -> EventSubscription:
        """HMP has no events: a subscription that stays empty (the watcher polls)."""
        return EventSubscription(names, max_buffered, lambda _: None)

    async def execute(
        self, command: str, arguments: dict[str, Any] | None = None, *, timeout: float | None = None
    ) -> Any:
        args = arguments or {}
        run = self.hmp.run
        if command == "query-status":
            return parse_info_status(await run("info status", timeout=timeout))
        if command == "query-migrate":
            return parse_info_migrate(await run("info migrate", timeout=timeout))
        if command == "migrate-set-capabilities":
            for item in args.get("capabilities", []):
                state = "on" if item["state"] else "off"
                await run(f"migrate_set_capability {item['capability']} {state}", timeout=timeout)
            return {}
        if command == "migrate-set-parameters":
            for name, value in args.items():
                if isinstance(value, str):
                    text = value or '""'  # an empty string (no TLS credentials)
                elif name in ("max-bandwidth", "xbzrle-cache-size"):
                    text = f"{int(value)}B"
                else:
                    text = str(int(value))
                await run(f"migrate_set_parameter {name} {text}", timeout=timeout)
            return {}
        if command == "migrate":
            resume = " -r" if args.get("resume") else ""
            await run(f"migrate -d{resume} {args['uri']}", timeout=timeout)
            return {}
        simple = {
            "migrate_cancel": "migrate_cancel",
            "stop": "stop",
            "cont": "cont",
            "quit": "quit",
            "system_powerdown": "system_powerdown",
            "migrate-start-postcopy": "migrate_start_postcopy",
        }
        if command in simple:
            if command == "quit":
                await self._quit(timeout)
            else:
                await run(simple[command], timeout=timeout)
            return {}
        raise MisuseError(f"{command!r} is not available through the HMP fallback")

    async def _quit(self, timeout: float | None) -> None:
        # QEMU closes the monitor as it exits: that is the answer.
        with contextlib.suppress(ConnectionLostError):
            await self.hmp.run("quit", timeout=timeout)
