"""kvmflow: an async engine for QEMU/KVM fleets.

Monitors (QMP and HMP) are spoken with non-blocking I/O over one shared connection per
monitor; see :mod:`kvmflow.monitor`. Errors all derive from :class:`KvmflowError`.
"""

from kvmflow.errors import (
    CommandError,
    ConnectionLostError,
    DeadlineError,
    FieldProblem,
    KvmflowError,
    MalformedReplyError,
    MisuseError,
    MonitorError,
    TransportError,
    ValidationError,
)
from kvmflow.monitor import (
    ConnectionState,
    Event,
    EventSubscription,
    HMPClient,
    QMPClient,
    RunState,
    hmp_via_qmp,
    query_kvm,
    query_status,
    query_version,
)

__version__ = "0.1.0"

__all__ = [
    "CommandError",
    "ConnectionLostError",
    "ConnectionState",
    "DeadlineError",
    "Event",
    "EventSubscription",
    "FieldProblem",
    "HMPClient",
    "KvmflowError",
    "MalformedReplyError",
    "MisuseError",
    "MonitorError",
    "QMPClient",
    "RunState",
    "TransportError",
    "ValidationError",
    "__version__",
    "hmp_via_qmp",
    "query_kvm",
    "query_status",
    "query_version",
]
