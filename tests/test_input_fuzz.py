"""Property-based fuzzing with the input classes tests/test_fuzz.py missed, over EVERY REST route and socket event.

Classes: deep nesting, lone surrogates and other invalid escapes, huge integers and floats, NaN/Infinity,
duplicate keys, non-UTF-8 bytes, every Content-Type (and Content-Encoding). Routes and events are read from the
live server, so a route or event added later is fuzzed too. The rule: no answer >= 500, every event with an
ack id is acked, input the JSON policy refuses is `validation_error`, and nothing is stored for it.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from yarl import URL

from server.json_codec import MAX_DEPTH
from tests.clients import Http, RawSocket, open_http
from tests.servers import RunningServer
from tests.test_input_limits import AGENT_KEY, event_names, start_input_server, stored_keys

pytestmark = pytest.mark.slow  # hypothesis over every route and event

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
ERROR_CODES = {"validation_error", "unauthorized", "not_found", "payload_too_large", "rate_limited", "unavailable"}
KEYS = (
    "userId",
    "metadata",
    "sessionId",
    "message",
    "clientMessageId",
    "token",
    "messageId",
    "rating",
    "comment",
    "reason",
    "email",
    "resolution",
    "afterMessageId",
)
# The routes whose handler reads a JSON body: refused JSON there must be exactly 400 validation_error.
JSON_BODY_ROUTES = {
    ("POST", "/api/v1/chat/session"),
    ("POST", "/api/v1/chat/message"),
    ("POST", "/api/v1/chat/message/stream"),
    ("POST", "/api/v1/chat/feedback"),
    ("POST", "/api/v1/tickets/{ticket_id}/resolve"),
}
CONTENT_TYPES = (
    None,
    "application/json",
    "application/json; charset=utf-8",
    "application/json; charset=utf-16",
    "text/plain",
    "text/html; charset=latin-1",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=xyz",
    "application/octet-stream",
    "application/xml",
    "*/*",
    "invalid",
    "application/json; charset=",
)
ENCODINGS = (None, "identity", "gzip", "deflate", "gzip-garbage", "deflate-garbage", "x-unknown")

# --- JSON texts the policy refuses -------------------------------------------------------------------------------
safe_text = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters='"\\'), max_size=6)
surrogate_escape = st.integers(0xD800, 0xDFFF).map(lambda c: f"\\u{c:04x}")
reversed_pair = st.tuples(st.integers(0xDC00, 0xDFFF), st.integers(0xD800, 0xDBFF)).map(lambda p: f"\\u{p[0]:04x}\\u{p[1]:04x}")
invalid_escape = st.sampled_from(["\\x41", "\\u12", "\\u12G4", "\\uZZZZ", "\\u", "\\q", "\\U0001F600", "\\'", "\\ "])
raw_control = st.sampled_from(["\x00", "\x01", "\n", "\t", "\x1f"])  # unescaped control characters inside a string
# A "!" after the refused part: otherwise safe text could finish an invalid escape ("\\u12" + "00" is "\\u1200", valid
# JSON), and the test would expect a valid string to be refused.
bad_string = st.tuples(safe_text, st.one_of(surrogate_escape, reversed_pair, invalid_escape, raw_control), safe_text).map(
    lambda t: '"' + t[0] + t[1] + "!" + t[2] + '"'
)
huge_number = st.one_of(
    st.integers(310, 6000).map(lambda n: "9" * n),  # beyond a double: orjson says infinity; stdlib's int limit is 4300
    st.integers(310, 6000).map(lambda n: "-" + "1" * n),
    st.integers(1, 5000).map(lambda n: "1." + "5" * n + "e400"),
    st.sampled_from(["1e400", "-1e400", "1e99999", "-1E+309", "2e308"]),
)
non_finite = st.sampled_from(["NaN", "Infinity", "-Infinity", "nan", "inf", "-inf", "+1", "01", ".5", "1.", "0x10"])


def nested(depth: int, kind: str, inner: str = "1") -> str:
    """`depth` levels of arrays or objects around `inner`."""
    if kind == "array":
        return "[" * depth + inner + "]" * depth
    return '{"a":' * depth + inner + "}" * depth


too_deep = st.tuples(st.integers(MAX_DEPTH + 1, 5000), st.sampled_from(["array", "object"])).map(lambda t: nested(*t))
refused_fragment = st.one_of(bad_string, huge_number, non_finite, too_deep)


@st.composite
def refused_texts(draw: st.DrawFn) -> str:
    """A JSON-looking body with one refused fragment somewhere: top level, a field, metadata, a list, a repeat."""
    fragment = draw(refused_fragment)
    key = draw(st.sampled_from(KEYS))
    shape = draw(st.sampled_from(["top", "field", "metadata", "list", "duplicate", "key"]))
    if shape == "top":
        return fragment
    if shape == "field":
        return '{"' + key + '": ' + fragment + "}"
    if shape == "metadata":
        return '{"userId": "u", "metadata": {"' + key + '": ' + fragment + "}}"
    if shape == "list":
        return "[" + fragment + "]"
    if shape == "duplicate":
        return '{"' + key + '": "fine", "' + key + '": ' + fragment + "}"
    bad_key = draw(bad_string) if fragment.startswith('"') else '"\\ud800"'
    return "{" + bad_key + ": 1}"


# --- Odd but valid JSON: must still be answered well, never a 5xx ---------------------------------------------------
odd_value = st.one_of(
    st.integers(20, 300).map(lambda n: "7" * n),  # big integers a double can hold (orjson makes them floats)
    st.sampled_from(["1e308", "-1e308", "5e-324", "1e-400", "-0", "-0.0", "0e0", "1E+2", "18446744073709551616"]),
    st.sampled_from(['"\\ud83d\\ude00"', '"\\u0000"', '"\\u200b\\ufeff"', '"\\/"', '"\\u00e9"', '"e\\u0301"']),
    st.tuples(st.integers(1, MAX_DEPTH - 2), st.sampled_from(["array", "object"])).map(lambda t: nested(*t)),
    st.just('""'),
    st.just("null"),
)


@st.composite
def odd_texts(draw: st.DrawFn) -> str:
    """Valid JSON with duplicate keys, big or tiny numbers, escapes that are fine, nesting within the limit."""
    key = draw(st.sampled_from(KEYS))
    value = draw(odd_value)
    shape = draw(st.sampled_from(["field", "duplicate", "metadata", "top"]))
    if shape == "field":
        return '{"' + key + '": ' + value + "}"
    if shape == "duplicate":
        return '{"' + key + '": ' + value + ', "' + key + '": ' + draw(odd_value) + "}"
    if shape == "metadata":
        return '{"userId": "u", "metadata": {"' + key + '": ' + value + ', "' + key + '": 1}}'
    return value


non_utf8_bytes = st.one_of(
    st.binary(max_size=40).map(lambda b: b + b"\xff"),
    st.sampled_from([b"\xed\xa0\x80", b"\xc0\xaf", b"\xf8\x88\x80\x80\x80", b"\xe2\x82", b"\xf4\x90\x80\x80"]).map(
        lambda bad: b'{"userId": "' + bad + b'"}'
    ),
    st.sampled_from(["utf-16", "utf-16-le", "utf-32", "latin-1", "cp1252"]).map(
        lambda enc: '{"userId": "caf\u00e9 \u00ff"}'.encode(enc)
    ),
)


# --- Helpers ----------------------------------------------------------------------------------------------------
@pytest.fixture
async def server(start_server) -> RunningServer:
    return await start_input_server(start_server)


def rest_routes(server: RunningServer) -> list[tuple[str, str]]:
    """(method, path template) of every route server/rest.py add_routes registered."""
    found = set()
    for route in server.app.router.routes():
        if getattr(route.handler, "__module__", "") == "server.web.routes" and route.method not in ("HEAD", "OPTIONS"):
            found.add((route.method, route.resource.canonical))
    assert len(found) >= 17, found
    return sorted(found, key=lambda r: (r[0] == "DELETE", r))  # deleting the session last


def encode_body(body: bytes, encoding: str | None) -> tuple[bytes, dict[str, str]]:
    """The body as sent with a Content-Encoding (garbage variants claim one and do not honour it)."""
    if encoding is None:
        return body, {}
    if encoding == "gzip":
        return gzip.compress(body), {"Content-Encoding": "gzip"}
    if encoding == "deflate":
        return zlib.compress(body), {"Content-Encoding": "deflate"}
    if encoding.endswith("-garbage"):  # long enough that the header check fails (a truncated header reads as empty)
        return b"\x00\x01 not compressed " + body, {"Content-Encoding": encoding.removesuffix("-garbage")}
    return body, {"Content-Encoding": encoding}


@pytest.fixture
async def raw_http() -> AsyncIterator[Http]:
    """A client that sends bodies and URLs exactly as given and leaves answers as the server wrote them.

    A connection per call, as each hostile request deserves: the server may drop one it refused.
    """
    async with open_http(auto_decompress=False, connector=aiohttp.TCPConnector(force_close=True)) as client:
        yield client


async def request(
    http: Http,
    server: RunningServer,
    method: str,
    template: str,
    body: bytes | None,
    session: dict[str, Any],
    *,
    content_type: str | None = "application/json",
    encoding: str | None = None,
    path_value: str | None = None,
    query: str = "",
) -> tuple[int, str, bytes]:
    """Call one route with the owner's credentials (agent key for agent routes); status, content type, body."""
    value = path_value if path_value is not None else session["sessionId"]
    path = template.replace("{session_id}", value).replace("{ticket_id}", value)
    agent_route = "/tickets" in template or "/analytics" in template
    headers: dict[str, str] = {"Authorization": f"Bearer {AGENT_KEY if agent_route else session['token']}"}
    data = None
    if body is not None:
        data, extra = encode_body(body, encoding)
        headers.update(extra)
        if content_type is not None:
            headers["Content-Type"] = content_type
    url = server.url + path + (("?" + query) if query else "")
    async with http.session.request(
        method, URL(url, encoded=True), data=data, headers=headers, skip_auto_headers=["Content-Type"]
    ) as response:
        return response.status, response.headers.get("Content-Type", ""), await response.read()


def assert_well_formed(status: int, content_type: str, raw: bytes, context: object) -> None:
    """No 5xx; a JSON error answer is the contract's `{"error": Error}` with a known code."""
    assert status < 500, (status, raw[:300], context)
    if status >= 400 and content_type.startswith("application/json"):
        body = orjson.loads(raw)
        assert set(body) == {"error"} and body["error"]["code"] in ERROR_CODES, (body, context)


def assert_validation_error(status: int, raw: bytes, context: object) -> None:
    assert status == 400, (status, raw[:300], context)
    assert orjson.loads(raw)["error"]["code"] == "validation_error", (raw[:300], context)


# --- REST -------------------------------------------------------------------------------------------------------
hostile_segment = st.one_of(
    st.sampled_from(["%ED%A0%80", "%FF%FE", "%00", "%C0%AF", "..%2F..", "%F0%9F%98%80", "%25", "a%20b", "\u00e9"]),
    st.integers(129, 3000).map(lambda n: "x" * n),
    st.text(alphabet="abcdefABCDEF0123456789-_.:@~!$&'()*+,;=", min_size=1, max_size=40),
)
hostile_query = st.lists(
    st.tuples(
        st.sampled_from(["limit", "before", "status", "x", "limit", "%ED%A0%80"]),
        st.one_of(hostile_segment, st.sampled_from(["-1", "0", "1e400", "9" * 400, "NaN", "Infinity", "", "１２"])),
    ),
    max_size=4,
).map(lambda pairs: "&".join(f"{k}={v}" for k, v in pairs))


@pytest.mark.parametrize("classes", ["json", "bytes"])
@FUZZ
@given(
    json_text=refused_texts(),
    raw_bytes=non_utf8_bytes,
    content_type=st.sampled_from(CONTENT_TYPES),
    encoding=st.sampled_from(ENCODINGS),
)
async def test_refused_bodies_on_every_rest_route(
    server, redis_sync, classes, json_text, raw_bytes, content_type, encoding, http, raw_http
) -> None:
    session = await http.new_session(server.url, "fz")
    history = f"chat:history:{{{session['sessionId']}}}"
    body = json_text.encode() if classes == "json" else raw_bytes
    for method, template in rest_routes(server):
        before, history_before = stored_keys(redis_sync), redis_sync.llen(history)
        context = (method, template, content_type, encoding, body[:200])
        status, answer_type, raw = await request(
            raw_http, server, method, template, body, session, content_type=content_type, encoding=encoding
        )
        assert_well_formed(status, answer_type, raw, context)
        if (method, template) in JSON_BODY_ROUTES:
            assert_validation_error(status, raw, context)
        assert stored_keys(redis_sync) - before == set(), context
        assert redis_sync.llen(history) == history_before, context


@FUZZ
@given(json_text=odd_texts(), content_type=st.sampled_from(CONTENT_TYPES))
async def test_odd_but_valid_bodies_on_every_rest_route(server, json_text, content_type, http, raw_http) -> None:
    session = await http.new_session(server.url, "fz")
    for method, template in rest_routes(server):
        status, answer_type, raw = await request(
            raw_http, server, method, template, json_text.encode(), session, content_type=content_type
        )
        assert_well_formed(status, answer_type, raw, (method, template, content_type, json_text[:200]))


@FUZZ
@given(segment=hostile_segment, query=hostile_query)
async def test_hostile_paths_and_queries_on_every_rest_route(server, redis_sync, segment, query, http, raw_http) -> None:
    session = await http.new_session(server.url, "fz")
    for method, template in rest_routes(server):
        before = stored_keys(redis_sync)
        status, answer_type, raw = await request(
            raw_http, server, method, template, b"{}", session, path_value=segment, query=query
        )
        assert_well_formed(status, answer_type, raw, (method, template, segment, query))
        assert stored_keys(redis_sync) - before == set()


# --- Socket.IO --------------------------------------------------------------------------------------------------
NAMESPACES = ("/", "/agents")


async def call_every_event(server: RunningServer, send: Any) -> list[tuple[str, str, Any]]:
    """(namespace, event, ack) for every event of both namespaces, one fresh raw socket per namespace."""
    answers = []
    for namespace in NAMESPACES:
        raw = await RawSocket.open(server.url, namespace, {"key": AGENT_KEY} if namespace != "/" else None)
        try:
            for event in event_names(server, namespace):
                answers.append((namespace, event, await send(raw, event)))
        finally:
            await raw.close()
    assert {ns for ns, _, _ in answers} == set(NAMESPACES)
    return answers


@FUZZ
@given(text=refused_texts())
async def test_refused_payloads_on_every_socket_event_are_acked_validation_error(server, redis_sync, text) -> None:
    before = stored_keys(redis_sync) | {b"chat:agents:online"}  # an agent's presence is stored when it connects
    for namespace, event, ack in await call_every_event(server, lambda raw, event: raw.call_raw(event, text)):
        assert ack["ok"] is False and ack["error"]["code"] == "validation_error", (namespace, event, text[:200], ack)
    assert stored_keys(redis_sync) - before == set()


@FUZZ
@given(text=odd_texts())
async def test_odd_but_valid_payloads_on_every_socket_event_are_acked(server, text) -> None:
    for namespace, event, ack in await call_every_event(server, lambda raw, event: raw.call_raw(event, text)):
        assert isinstance(ack, dict) and isinstance(ack.get("ok"), bool), (namespace, event, text[:200], ack)
        if not ack["ok"]:
            assert ack["error"]["code"] in ERROR_CODES, (namespace, event, text[:200], ack)


@FUZZ
@given(attachment=st.one_of(non_utf8_bytes, st.binary(max_size=64)))
async def test_binary_attachments_on_every_socket_event_are_acked_validation_error(server, attachment) -> None:
    async def send(raw: RawSocket, event: str) -> Any:
        head = orjson.dumps([event, {"sessionId": "s", "message": {"_placeholder": True, "num": 0}}]).decode()
        await raw.send_text("451-" + raw.prefix + "7" + head)
        await raw.ws.send_bytes(attachment)
        return await raw.ack(7)

    for namespace, event, ack in await call_every_event(server, send):
        assert ack["ok"] is False and ack["error"]["code"] == "validation_error", (namespace, event, ack)
