"""The clients every integration test talks to the server through: REST over aiohttp, Socket.IO, raw Socket.IO.

One place decides how a request carries its bearer token, how an answer is read (whole, JSON when it is JSON)
and how sockets are connected and recorded; the fixtures in conftest.py open these for a test and close them
after it. A test that needs something unusual (its own connector or timeout, a WebSocket, a streamed body) goes
through `open_http(**options)` or `Http.session`; the few that drive clients of their own (load generators with
their own event handlers, a browser tab's keep-alive connection) say why where they do.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, NamedTuple

import aiohttp
import orjson
import socketio
from multidict import CIMultiDictProxy

AGENTS_NAMESPACE = "/agents"

# --- REST -------------------------------------------------------------------------------------------------------


class Reply(NamedTuple):
    """An HTTP answer read whole: its status, its body (parsed when it is JSON, else the text) and its headers."""

    status: int
    body: Any
    headers: CIMultiDictProxy[str]


def bearer(token: str | None, headers: Mapping[str, str] | None = None) -> dict[str, str]:
    """`headers` plus `Authorization: Bearer <token>` when there is a token (an empty one sends none)."""
    combined = dict(headers or {})
    if token:
        combined["Authorization"] = f"Bearer {token}"
    return combined


def parse_body(text: str, content_type: str) -> Any:
    """JSON bodies parsed (whatever their Content-Type says, when they parse), anything else as text."""
    if content_type == "application/json" or text[:1] in ("{", "["):
        try:
            return json.loads(text)
        except ValueError:
            if content_type == "application/json":
                raise
    return text


class Http:
    """REST calls on one aiohttp session: bearer tokens, JSON bodies, answers read whole into a `Reply`."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session

    async def request(
        self,
        method: str,
        url: str,
        body: Any = None,
        token: str | None = None,
        *,
        headers: Mapping[str, str] | None = None,
        data: bytes | str | None = None,
        params: Mapping[str, str] | None = None,
    ) -> Reply:
        """Send `body` as JSON (None: no body) or `data` as it is, with the token if any; the answer read whole."""
        async with self.session.request(
            method, url, json=body, data=data, params=params, headers=bearer(token, headers)
        ) as response:
            text = await response.text()
            return Reply(response.status, parse_body(text, response.content_type), response.headers)

    async def get(
        self,
        url: str,
        token: str | None = None,
        *,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
    ) -> Reply:
        """GET with the token, if any."""
        return await self.request("GET", url, token=token, headers=headers, params=params)

    async def get_text(self, url: str, token: str | None = None) -> tuple[int, str]:
        """GET with the token, if any: the status and the body as text (what a scraper or a probe reads)."""
        async with self.session.get(url, headers=bearer(token)) as response:
            return response.status, await response.text()

    async def post(
        self,
        url: str,
        body: Any = None,
        token: str | None = None,
        *,
        headers: Mapping[str, str] | None = None,
        data: bytes | str | None = None,
    ) -> Reply:
        """POST a JSON body (or raw `data`) with the token, if any."""
        return await self.request("POST", url, body, token, headers=headers, data=data)

    async def delete(self, url: str, token: str | None = None, *, headers: Mapping[str, str] | None = None) -> Reply:
        """DELETE with the token, if any."""
        return await self.request("DELETE", url, token=token, headers=headers)

    async def new_session(
        self, base_url: str, user_id: str = "u1", *, headers: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        """POST /api/v1/chat/session, which must succeed: the answer (sessionId, token, ...)."""
        status, body, _ = await self.post(f"{base_url}/api/v1/chat/session", {"userId": user_id}, headers=headers)
        assert status == 201 and isinstance(body, dict), body
        return body


def parse_sse(text: str) -> list[tuple[str, Any]]:
    """A text/event-stream body as (event name, parsed JSON data) pairs, in order."""
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        name, data = "message", []
        for line in block.splitlines():
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
        if data:
            events.append((name, json.loads("\n".join(data))))
    return events


@contextlib.asynccontextmanager
async def open_http(**options: Any) -> AsyncIterator[Http]:
    """An `Http` on a session of its own (`options` go to aiohttp.ClientSession: timeout, connector, ...)."""
    async with aiohttp.ClientSession(**options) as session:
        yield Http(session)


async def request(
    method: str, url: str, body: Any = None, token: str | None = None, *, timeout: float | None = None, **options: Any
) -> Reply:
    """One call on a connection of its own (within `timeout` seconds, if given), for helpers outside the `http` fixture."""
    async with open_http(**({} if timeout is None else {"timeout": aiohttp.ClientTimeout(total=timeout)})) as http:
        return await http.request(method, url, body, token, **options)


# --- Socket.IO --------------------------------------------------------------------------------------------------


class Recorder:
    """A python-socketio AsyncClient that keeps every event it receives, for assertions."""

    def __init__(self, namespace: str = "/") -> None:
        self.client = socketio.AsyncClient(reconnection=False)
        self.namespace = namespace
        self.events: list[tuple[str, Any]] = []
        self._changed = asyncio.Event()

        async def catch_all(event: str, *args: Any) -> None:
            self.events.append((event, args[0] if len(args) == 1 else list(args)))
            self._changed.set()

        self.client.on("*", catch_all, namespace=namespace)

    async def connect(self, url: str, **kwargs: Any) -> Recorder:
        """Connect over WebSocket (in `kwargs`: auth, headers, namespaces, a shorter wait_timeout, ...)."""
        kwargs.setdefault("transports", ["websocket"])
        kwargs.setdefault("wait_timeout", 5)
        if self.namespace != "/":
            kwargs.setdefault("namespaces", [self.namespace])
        await self.client.connect(url, **kwargs)
        return self

    async def call(self, event: str, data: Any = None, timeout: float = 10) -> Any:
        """Emit `event` in this recorder's namespace and wait for its ack."""
        return await self.client.call(event, data, namespace=self.namespace, timeout=timeout)

    async def emit(self, event: str, data: Any = None) -> None:
        """Emit `event` in this recorder's namespace without waiting for an ack."""
        await self.client.emit(event, data, namespace=self.namespace)

    def of(self, event: str) -> list[Any]:
        """Every payload received for `event` so far."""
        return [data for name, data in self.events if name == event]

    async def wait_for(
        self, event: str, predicate: Callable[[Any], bool] = lambda _: True, timeout: float = 10, count: int = 1
    ) -> list[Any]:
        """Wait until `count` events named `event` match `predicate`; returns them."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            found = [data for data in self.of(event) if predicate(data)]
            if len(found) >= count:
                return found
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise AssertionError(f"timed out waiting for {count} x {event}; got {self.events[-10:]}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    async def reply_to(self, message_id: str | None = None, timeout: float = 10) -> dict[str, Any]:
        """The next assistant/system message-received (optionally answering a given user message)."""
        found = await self.wait_for(
            "message-received",
            lambda d: (
                d["message"]["role"] in ("assistant", "system")
                and (message_id is None or d["message"].get("replyTo") == message_id)
            ),
            timeout=timeout,
        )
        first: dict[str, Any] = found[0]
        return first

    async def disconnect(self) -> None:
        """Disconnect, ignoring a connection that is already gone."""
        with contextlib.suppress(Exception):
            await self.client.disconnect()


ConnectFactory = Callable[..., Awaitable[Recorder]]
"""What the `connect` fixture is: open a Recorder on a URL (closed after the test)."""


async def joined_client(connect: ConnectFactory, url: str, user_id: str = "u1") -> tuple[Recorder, str, str]:
    """A client that started a new session: (client, sessionId, token)."""
    client = await connect(url)
    ack = await client.call("join-chat", {"userId": user_id})
    assert ack["ok"], ack
    await client.wait_for("chat-joined")
    return client, ack["sessionId"], ack["token"]


async def agent_client(url: str, key: str) -> Recorder:
    """A Recorder signed in to the agents' namespace with `key` (the caller disconnects it)."""
    return await Recorder(AGENTS_NAMESPACE).connect(url, auth={"key": key})


async def agent_call(agent: Recorder, event: str, data: Any = None) -> Any:
    """An agent's event and its ack."""
    return await agent.call(event, data)


class RawSocket:
    """A Socket.IO client speaking the wire protocol by hand over a WebSocket, to send packets no library would."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, http: aiohttp.ClientSession, namespace: str) -> None:
        self.ws = ws
        self.http = http
        self.namespace = namespace
        self._ids = itertools.count(1)

    @classmethod
    async def open(cls, url: str, namespace: str = "/", auth: dict[str, Any] | None = None) -> RawSocket:
        """Connect at the Engine.IO level, then join `namespace` (with `auth`)."""
        http = aiohttp.ClientSession()
        try:
            ws = await http.ws_connect(f"{url}/socket.io/?EIO=4&transport=websocket", max_msg_size=0)
        except BaseException:
            await http.close()
            raise
        raw = cls(ws, http, namespace)
        opened = await raw._next_text()
        assert opened.startswith("0"), opened
        prefix = "" if namespace == "/" else namespace + ","
        await ws.send_str("40" + prefix + (orjson.dumps(auth).decode() if auth else ""))
        connected = await raw._next_text()
        assert connected.startswith("40" + prefix), connected
        return raw

    @property
    def prefix(self) -> str:
        """The namespace part of a packet (`/agents,`), empty for the default namespace."""
        return "" if self.namespace == "/" else self.namespace + ","

    async def _next_text(self, timeout: float = 10) -> str:
        """The next Engine.IO text packet, answering pings on the way."""
        while True:
            message = await self.ws.receive(timeout=timeout)
            if message.type != aiohttp.WSMsgType.TEXT:
                raise ConnectionError(f"socket closed: {message.type} {message.data!r}")
            if message.data == "2":
                await self.ws.send_str("3")
                continue
            return str(message.data)

    async def call_raw(self, event: str, payload_text: str, timeout: float = 10) -> Any:
        """Send `42<id>["event",<payload_text>]` verbatim and return the ack's first argument."""
        ack_id = next(self._ids)
        head = "42" + self.prefix + str(ack_id) + "[" + orjson.dumps(event).decode() + ","
        await self.ws.send_str(head + payload_text + "]")
        return await self.ack(ack_id, timeout)

    async def send_text(self, text: str) -> None:
        """Send one Engine.IO text frame as is."""
        await self.ws.send_str(text)

    async def ack(self, ack_id: int, timeout: float = 10) -> Any:
        """Wait for the ack with this id; other packets (events) are skipped."""
        expected = "43" + self.prefix + str(ack_id) + "["
        async with asyncio.timeout(timeout):
            while True:
                text = await self._next_text(timeout)
                if text.startswith(expected):
                    return orjson.loads(text[len(expected) - 1 :])[0]

    async def close(self) -> None:
        """Close the WebSocket and its session."""
        with contextlib.suppress(Exception):
            await self.ws.close()
        await self.http.close()
