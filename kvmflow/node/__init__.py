"""Nodes: where commands run, files live and monitor sockets open."""

from kvmflow.errors import NodeError, SSHConnectError
from kvmflow.node.base import CommandResult, Node, NodeInfo
from kvmflow.node.local import LocalNode
from kvmflow.node.ssh import SSHNode, SSHTarget

__all__ = [
    "CommandResult",
    "LocalNode",
    "Node",
    "NodeError",
    "NodeInfo",
    "SSHConnectError",
    "SSHNode",
    "SSHTarget",
]
