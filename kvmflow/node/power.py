"""The node's power cycle: the fence of last resort, as the ancestor's ``PowercycleNode``.

The disks are flushed (``sync``), then the machine is reset at once through the kernel's
sysrq trigger: no clean shutdown, no process gets a say, so that a node that cannot be
trusted any more (it stopped answering, but its QEMUs may still write to shared disks) is
certainly down before its instances start elsewhere. Over SSH the connection dies with the
machine; that is the expected end, not an error.

The controller's own machine is refused unless asked for explicitly: a LocalNode, or an SSH
node whose host is one of this machine's addresses (loopback included).
"""

from __future__ import annotations

import ipaddress
import socket

import psutil

from kvmflow._logging import get_logger
from kvmflow.errors import MisuseError, NodeError
from kvmflow.node.base import Node
from kvmflow.node.local import LocalNode
from kvmflow.node.ssh import SSHNode

_log = get_logger("kvmflow.node")

#: Enable sysrq, then ``b``: reboot immediately, without syncing or unmounting.
SYSRQ_RESET = ["sh", "-c", "echo 1 > /proc/sys/kernel/sysrq && echo b > /proc/sysrq-trigger"]


def is_this_machine(node: Node) -> bool:
    """Whether power-cycling ``node`` would reset the machine kvmflow runs on."""
    if isinstance(node, LocalNode):
        return True
    if isinstance(node, SSHNode):
        return _is_local_host(node.target.host)
    return False  # another kind of node (a test's fake): it says where it is itself


def _is_local_host(host: str) -> bool:
    try:
        resolved = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return True  # cannot tell: assume the worst
    mine = {
        address.address.split("%")[0]
        for addresses in psutil.net_if_addrs().values()
        for address in addresses
    }
    return any(ipaddress.ip_address(a).is_loopback or a in mine for a in resolved)


async def powercycle(node: Node, *, allow_this_machine: bool = False) -> None:
    """Flush the disks of ``node`` and reset it at once (see the module)."""
    if is_this_machine(node) and not allow_this_machine:
        raise MisuseError(
            f"node {node.name} is the machine kvmflow runs on: it is not power-cycled unless "
            "that is asked for explicitly (allow_this_machine)"
        )
    _log.warning("power-cycling node: sync, then an immediate reset", node=node.name)
    synced = await node.run(["sync"], timeout=120)
    if not synced.ok:
        _log.warning("sync failed before the reset", node=node.name, error=synced.error_text())
    try:
        result = await node.run(SYSRQ_RESET, timeout=10)
    except (NodeError, TimeoutError) as exc:  # the connection died with the machine
        _log.warning("node went down during its power cycle", node=node.name, detail=str(exc))
        return
    if not result.ok:
        raise NodeError(f"the sysrq reset was refused: {result.error_text()}", node=node.name)


__all__ = ["SYSRQ_RESET", "is_this_machine", "powercycle"]
