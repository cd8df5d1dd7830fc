"""Public test helpers for embedders: fake monitors that misbehave on cue, a simulated
fleet (:mod:`kvmflow.testing.fleet`) and real sshd servers on loopback
(:mod:`kvmflow.testing.sshd`)."""

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
]
