"""Nodes: where commands run, files live and monitor sockets open."""

from kvmflow.node.base import CommandResult, Node, NodeError, NodeInfo
from kvmflow.node.local import LocalNode
from kvmflow.node.ssh import SSHConnectError, SSHNode, SSHTarget

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
