"""Public fakes for embedders: test controllers without QEMU, or against bad monitors."""

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
