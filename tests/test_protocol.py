"""The sans-IO QMP protocol, tested with bytes alone."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmflow.errors import CommandError, KvmflowError, MalformedReplyError, MisuseError
from kvmflow.monitor.protocol import (
    ErrorReply,
    Event,
    Garbage,
    Greeting,
    Phase,
    QemuVersion,
    QMPProtocol,
    Reply,
    decode_message,
)

GREETING = (
    b'{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, '
    b'"package": "Debian 1:7.2+dfsg-7"}, "capabilities": ["oob"]}}\r\n'
)


def ready_protocol(**options: int) -> QMPProtocol:
    protocol = QMPProtocol(**options)
    [greeting] = protocol.feed(GREETING)
    assert isinstance(greeting, Greeting)
    line = protocol.start_negotiation()
    assert json.loads(line) == {"execute": "qmp_capabilities", "id": 1}
    [reply] = protocol.feed(b'{"return": {}, "id": 1}\r\n')
    assert reply == Reply(1, {})
    assert protocol.phase is Phase.READY
    return protocol


def test_greeting_and_negotiation() -> None:
    protocol = QMPProtocol()
    phases = [protocol.phase]
    messages = protocol.feed(GREETING)
    phases.append(protocol.phase)
    assert phases == [Phase.AWAITING_GREETING, Phase.NEGOTIATING]
    assert messages == [Greeting(QemuVersion(7, 2, 22, "Debian 1:7.2+dfsg-7"), ("oob",))]
    assert str(messages[0].version) == "7.2.22"  # type: ignore[union-attr]
    protocol.start_negotiation()
    protocol.feed(b'{"return": {}, "id": 1}\r\n')
    assert protocol.phase is Phase.READY


def test_commands_before_negotiation_are_refused() -> None:
    protocol = QMPProtocol()
    with pytest.raises(MisuseError, match="awaiting-greeting"):
        protocol.encode_command("query-status")
    with pytest.raises(MisuseError, match="cannot negotiate"):
        protocol.start_negotiation()


def test_negotiation_error_is_a_command_error() -> None:
    protocol = QMPProtocol()
    protocol.feed(GREETING)
    protocol.start_negotiation()
    with pytest.raises(CommandError) as info:
        protocol.feed(b'{"error": {"class": "GenericError", "desc": "nope"}, "id": 1}\n')
    assert info.value.error_class == "GenericError"
    assert info.value.command == "qmp_capabilities"


@pytest.mark.parametrize(
    "line",
    [
        b"not json at all\r\n",
        b'{"return": {}}\r\n',
        b"[1, 2, 3]\r\n",
        b'{"QMP": {"capabilities": []}}\r\n',
        b'{"QMP": "seven"}\r\n',
    ],
    ids=["non-json", "reply-first", "array", "no-version", "greeting-not-object"],
)
def test_anything_but_a_greeting_first_is_fatal(line: bytes) -> None:
    protocol = QMPProtocol()
    with pytest.raises(MalformedReplyError) as info:
        protocol.feed(line)
    assert info.value.raw.startswith(line.strip()[:10])


def test_command_encoding_assigns_increasing_ids() -> None:
    protocol = ready_protocol()
    first_id, first = protocol.encode_command("query-status")
    second_id, second = protocol.encode_command("migrate-set-parameters", {"downtime-limit": 50})
    assert (first_id, second_id) == (2, 3)
    assert json.loads(first) == {"execute": "query-status", "id": 2}
    assert json.loads(second) == {
        "execute": "migrate-set-parameters",
        "arguments": {"downtime-limit": 50},
        "id": 3,
    }
    assert first.endswith(b"\n")
    assert second.endswith(b"\n")


def test_unusual_command_names_are_json_escaped() -> None:
    protocol = ready_protocol()
    _, line = protocol.encode_command('evil", "id": 0, "x": "')
    assert json.loads(line)["execute"] == 'evil", "id": 0, "x": "'


@pytest.mark.parametrize(
    ("command", "arguments", "match"),
    [
        ("", None, "non-empty string"),
        ("query-status", ["not", "a", "dict"], "must be a dict"),
        ("query-status", {"bad": object()}, "not JSON-serialisable"),
        ("query-status", {"nan": float("nan")}, "not JSON-serialisable"),
    ],
)
def test_bad_commands_are_misuse(command: str, arguments: object, match: str) -> None:
    protocol = ready_protocol()
    with pytest.raises(MisuseError, match=match):
        protocol.encode_command(command, arguments)  # type: ignore[arg-type]
    # A refused command does not use up an id.
    assert protocol.encode_command("query-status")[0] == 2


def test_replies_errors_and_events_interleave() -> None:
    protocol = ready_protocol()
    stream = (
        b'{"timestamp": {"seconds": 10, "microseconds": 500000}, "event": "STOP"}\r\n'
        b'{"return": {"status": "paused", "running": false}, "id": 2}\r\n'
        b'{"event": "RESUME", "data": {"x": 1}, '
        b'"timestamp": {"seconds": 11, "microseconds": 0}}\r\n'
        b'{"id": 3, "error": {"class": "CommandNotFound", "desc": "no such command"}}\r\n'
        b'{"return": 7}\r\n'
    )
    assert protocol.feed(stream) == [
        Event("STOP", {}, 10.5),
        Reply(2, {"status": "paused", "running": False}),
        Event("RESUME", {"x": 1}, 11.0),
        ErrorReply(3, "CommandNotFound", "no such command"),
        Reply(None, 7),
    ]


@pytest.mark.parametrize(
    ("line", "reason", "message_id"),
    [
        (b"garbage", "not JSON", None),
        (b'{"return": {}, "id": 5', "not JSON", None),
        (b'"just a string"', "a JSON str, not an object", None),
        (b"42", "a JSON int, not an object", None),
        (b"null", "a JSON NoneType, not an object", None),
        (b'{"id": 4}', "neither return, error, event nor greeting", 4),
        (b'{"error": "bad", "id": 6}', "error reply without a class and description", 6),
        (b'{"event": 5}', "event without a name or with non-object data", None),
        (b'{"event": "X", "data": [1]}', "event without a name or with non-object data", None),
        (b"\xff\xfe\x00", "not JSON", None),
        (b"[" * 100000, "not JSON", None),
    ],
    ids=[
        "non-json",
        "truncated",
        "string",
        "number",
        "null",
        "no-return-or-error",
        "error-not-object",
        "event-name-not-string",
        "event-data-not-object",
        "binary",
        "deeply-nested",
    ],
)
def test_malformed_lines_become_garbage_not_exceptions(
    line: bytes, reason: str, message_id: object
) -> None:
    protocol = ready_protocol(max_line_bytes=1 << 20)
    [message] = protocol.feed(line + b"\r\n")
    assert isinstance(message, Garbage)
    assert message.reason == reason
    assert message.id == message_id
    assert message.raw == line
    assert isinstance(message.error("m"), MalformedReplyError)
    # The session goes on after a bad line.
    assert protocol.feed(b'{"return": 1, "id": 2}\r\n') == [Reply(2, 1)]


def test_over_long_line_is_dropped_without_buffering_it() -> None:
    protocol = ready_protocol(max_line_bytes=200)
    out = protocol.feed(b"x" * 150)
    assert out == []
    out = protocol.feed(b"y" * 100)  # now past the limit: discarding
    assert out == []
    assert protocol._buffer == b""  # nothing of the long line is held
    out = protocol.feed(b"z" * 5000)
    assert out == []
    out = protocol.feed(b'zz\r\n{"return": 1, "id": 2}\r\n')
    assert len(out) == 2
    assert isinstance(out[0], Garbage)
    assert "exceeds the 200-byte limit" in out[0].reason
    assert out[1] == Reply(2, 1)


def test_over_long_complete_line_in_one_chunk() -> None:
    protocol = ready_protocol(max_line_bytes=200)
    out = protocol.feed(b"{" + b" " * 300 + b"}\n" + b'{"return": 2, "id": 2}\n')
    assert isinstance(out[0], Garbage)
    assert out[1] == Reply(2, 2)


def test_blank_lines_are_ignored() -> None:
    protocol = ready_protocol()
    assert protocol.feed(b"\r\n\n  \r\n") == []


def test_eof_returns_partial_line_and_closes() -> None:
    protocol = ready_protocol()
    assert protocol.feed(b'{"return": {"status": "run') == []
    assert protocol.feed_eof() == b'{"return": {"status": "run'
    assert protocol.phase is Phase.CLOSED
    with pytest.raises(MisuseError, match="closed"):
        protocol.feed(b"more")


def test_timestamp_tolerates_odd_shapes() -> None:
    assert decode_message(b'{"event": "X", "timestamp": "yesterday"}') == Event("X", {}, 0.0)
    assert decode_message(b'{"event": "X", "timestamp": {"seconds": "1"}}') == Event("X", {}, 0.0)


def test_max_line_bytes_must_be_sane() -> None:
    with pytest.raises(MisuseError):
        QMPProtocol(max_line_bytes=3)


VALID_STREAM = (
    GREETING
    + b'{"return": {}, "id": 1}\r\n'
    + b'{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"}\r\n'
    + b'{"return": {"status": "paused", "singlestep": false, "running": false}, "id": 2}\r\n'
    + b'{"id": 3, "error": {"class": "GenericError", "desc": "x \\u00e9 \\r\\n"}}\r\n'
    + b'{"event": "MIGRATION", "data": {"status": "active"}, '
    + b'"timestamp": {"seconds": 3, "microseconds": 4}}\r\n'
    + b'{"return": "VM status: running\\r\\n", "id": 4}\r\n'
)


def decode_in_chunks(chunks: list[bytes]) -> list[object]:
    protocol = QMPProtocol()
    out: list[object] = []
    for chunk in chunks:
        for message in protocol.feed(chunk):
            out.append(message)
            if isinstance(message, Greeting):
                protocol.start_negotiation()
    return out


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(VALID_STREAM)), max_size=40))
def test_any_split_of_a_valid_stream_decodes_the_same(cuts: list[int]) -> None:
    points = sorted(set(cuts))
    chunks = [
        VALID_STREAM[a:b] for a, b in zip([0, *points], [*points, len(VALID_STREAM)], strict=True)
    ]
    assert decode_in_chunks(chunks) == decode_in_chunks([VALID_STREAM])
    assert len(decode_in_chunks(chunks)) == 7


@settings(max_examples=500, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=10))
def test_random_bytes_raise_only_kvmflow_errors(chunks: list[bytes]) -> None:
    for start_ready in (False, True):
        protocol = (
            ready_protocol(max_line_bytes=256) if start_ready else QMPProtocol(max_line_bytes=256)
        )
        try:
            for chunk in chunks:
                for message in protocol.feed(chunk):
                    assert isinstance(message, (Greeting, Reply, ErrorReply, Event, Garbage))
            protocol.feed_eof()
        except KvmflowError:
            pass


def containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Lists and QMP-looking objects of ``children`` (a named function: hypothesis reads a
    multi-line lambda's source wrongly and warns that it does not recurse)."""
    keys = ["return", "error", "event", "id", "data", "QMP", "class", "desc", "timestamp"]
    return st.lists(children, max_size=3) | st.dictionaries(
        st.sampled_from(keys), children, max_size=4
    )


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    containers,
    max_leaves=10,
)


@settings(max_examples=500, deadline=None)
@given(json_values)
def test_random_json_values_never_raise_foreign_errors(value: object) -> None:
    protocol = ready_protocol()
    [message] = protocol.feed(json.dumps(value).encode() + b"\r\n")
    assert isinstance(message, (Greeting, Reply, ErrorReply, Event, Garbage))
