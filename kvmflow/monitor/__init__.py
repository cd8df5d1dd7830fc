"""Talking to QEMU monitors: sans-IO QMP protocol, async QMP and HMP clients."""

from kvmflow.monitor.connection import ConnectionState
from kvmflow.monitor.events import EndOfSubscription, EventSubscription
from kvmflow.monitor.hmp import HMPClient, hmp_via_qmp
from kvmflow.monitor.protocol import Event, Greeting, QemuVersion, QMPProtocol
from kvmflow.monitor.qmp import QMPClient
from kvmflow.monitor.queries import (
    Accelerator,
    RunState,
    Status,
    query_kvm,
    query_status,
    query_version,
)
from kvmflow.monitor.transport import Connector, StreamFactoryConnector, UnixSocketConnector

__all__ = [
    "Accelerator",
    "ConnectionState",
    "Connector",
    "EndOfSubscription",
    "Event",
    "EventSubscription",
    "Greeting",
    "HMPClient",
    "QMPClient",
    "QMPProtocol",
    "QemuVersion",
    "RunState",
    "Status",
    "StreamFactoryConnector",
    "UnixSocketConnector",
    "hmp_via_qmp",
    "query_kvm",
    "query_status",
    "query_version",
]
