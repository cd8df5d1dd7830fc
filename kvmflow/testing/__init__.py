"""Public test helpers for embedders: fake monitors that misbehave on cue, a simulated
fleet (:mod:`kvmflow.testing.fleet`), real sshd servers on loopback
(:mod:`kvmflow.testing.sshd`), several local nodes (:mod:`kvmflow.testing.nodes`), hosts in
network namespaces with shaped links (:mod:`kvmflow.testing.netns`) and a second QEMU build
beside the system's (:mod:`kvmflow.testing.qemu_builds`)."""

from kvmflow.testing.fake_monitor import (
    DEFAULT_GREETING,
    Answer,
    Close,
    Emit,
    Error,
    FakeQMPServer,
    Hang,
    RawLine,
    ReceivedCommand,
    Return,
    default_answer,
    event_line,
)
from kvmflow.testing.nodes import local_hypervisors, local_nodes

__all__ = [
    "DEFAULT_GREETING",
    "Answer",
    "Close",
    "Emit",
    "Error",
    "FakeQMPServer",
    "Hang",
    "RawLine",
    "ReceivedCommand",
    "Return",
    "default_answer",
    "event_line",
    "local_hypervisors",
    "local_nodes",
]
