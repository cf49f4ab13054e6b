"""The one JSON policy for REST bodies and Socket.IO packets: what is accepted, what is refused, and how."""

from __future__ import annotations

import pytest

from server.json_codec import MAX_DEPTH, InvalidJson, MalformedPayload, SocketIOCodec, loads


def nested(depth: int) -> str:
    """`depth` levels of arrays around a number."""
    return "[" * depth + "1" + "]" * depth


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ('{"userId": "u1", "metadata": {"plan": "pro"}}', {"userId": "u1", "metadata": {"plan": "pro"}}),
        ("[1, 2.5, true, null]", [1, 2.5, True, None]),
        ('"caf\\u00e9 \\ud83d\\ude00"', "café 😀"),  # a proper surrogate pair is one character
        ('{"a": 1, "a": 2}', {"a": 2}),  # a duplicate key keeps its last value
    ],
)
def test_plain_json_is_accepted(text: str, value: object) -> None:
    assert loads(text) == value
    assert loads(text.encode()) == value


def test_bytes_like_bodies_are_accepted() -> None:
    body = b'{"message": "hi"}'
    assert loads(bytearray(body)) == loads(memoryview(body)) == {"message": "hi"}


@pytest.mark.parametrize(
    "text",
    [
        "",
        "{",
        "NaN",
        '{"n": Infinity}',
        '{"n": 1e400}',  # overflows to infinity
        '{"u": "\\ud800"}',  # a lone surrogate
        '{"u": "\\x41"}',
        "{'single': 'quotes'}",
        "[1,]",
    ],
)
def test_anything_else_is_the_clients_mistake(text: str) -> None:
    with pytest.raises(InvalidJson, match=r"^Not valid JSON: .+\.$"):
        loads(text)


@pytest.mark.parametrize("body", [b'{"u": "\xff\xfe"}', '{"u": "é"}'.encode("latin-1"), '{"u": 1}'.encode("utf-16")])
def test_only_utf8_is_accepted(body: bytes) -> None:
    with pytest.raises(InvalidJson):
        loads(body)


def test_nesting_is_limited_to_max_depth_levels() -> None:
    assert loads(nested(MAX_DEPTH)) is not None
    with pytest.raises(InvalidJson, match=f"Nested more than {MAX_DEPTH} levels deep."):
        loads(nested(MAX_DEPTH + 1))
    deep_object = '{"a":' * (MAX_DEPTH + 1) + "1" + "}" * (MAX_DEPTH + 1)
    with pytest.raises(InvalidJson):
        loads(deep_object)


def test_the_depth_limit_looks_into_every_branch() -> None:
    wide = "[" + ", ".join(["[]"] * 50 + [nested(MAX_DEPTH)]) + "]"
    with pytest.raises(InvalidJson):
        loads(wide)


def test_depth_far_beyond_what_the_parser_allows_is_refused_not_crashed() -> None:
    with pytest.raises(InvalidJson):
        loads(nested(5000))


def test_the_error_never_reports_a_position() -> None:
    with pytest.raises(InvalidJson) as refused:
        loads('{"a": 1, oops}')
    assert "line" not in str(refused.value) and "column" not in str(refused.value)


# --- Socket.IO packets -----------------------------------------------------------------------------------


def test_a_good_packet_decodes_as_is() -> None:
    assert SocketIOCodec.loads('["send-message",{"message":"hi"}]') == ["send-message", {"message": "hi"}]


def test_an_event_with_refused_arguments_still_reaches_its_handler() -> None:
    name, payload = SocketIOCodec.loads('["send-message", {"message": "\\ud800"}]')
    assert name == "send-message"
    assert isinstance(payload, MalformedPayload) and payload.reason.startswith("Not valid JSON")


def test_an_event_nested_too_deep_reaches_its_handler_and_the_packet_array_is_not_counted() -> None:
    name, payload = SocketIOCodec.loads(f'["e", {nested(MAX_DEPTH)}]')
    assert name == "e" and payload == loads(nested(MAX_DEPTH))
    name, payload = SocketIOCodec.loads(f'["e", {nested(MAX_DEPTH + 1)}]')
    assert name == "e" and payload == MalformedPayload(f"Nested more than {MAX_DEPTH} levels deep.")


def test_an_escaped_event_name_is_decoded() -> None:
    name, payload = SocketIOCodec.loads('["send-\\u006dessage", NaN]')
    assert name == "send-message" and isinstance(payload, MalformedPayload)


@pytest.mark.parametrize("packet", ["{not an event", "[NaN]", '[1, "x", NaN]', '{"a": NaN}'])
def test_a_refused_packet_without_an_event_name_is_dropped(packet: str) -> None:
    with pytest.raises(InvalidJson):
        SocketIOCodec.loads(packet)


def test_the_event_name_scan_is_bounded() -> None:
    with pytest.raises(InvalidJson):
        SocketIOCodec.loads('["' + "x" * 10_000 + '", NaN]')


def test_dumps_is_compact_and_handles_big_integers() -> None:
    assert SocketIOCodec.dumps({"a": [1, "é"]}) == '{"a":[1,"é"]}'
    assert SocketIOCodec.dumps({"n": 2**70}) == '{"n":1180591620717411303424}'
