"""Chats go on through a Redis outage (issue 10, item 3), seen from outside with an external Redis.

Sessions authenticated before the outage keep chatting (sockets and REST), the AI answers with the context the
process holds, and everything reaches Redis when it returns: nothing lost, nothing twice, order kept, never
`internal`. What cannot be answered safely gets `unavailable` with a retry hint. Escalations made during the
outage reach the agents' queue, and acknowledged messages survive a restart of their process during the outage.
The default Socket.IO manager is used: with an external Redis that is python-socketio's Redis manager and the
per-session Redis locks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis
import socketio

from devtools.provider_double import ProviderDouble
from tests.clients import Http, Recorder, agent_call, agent_client, joined_client, open_http
from tests.processes import ServerProcess
from tests.servers import AGENT_KEYS, RedisProcess, ServerFactory

pytestmark = pytest.mark.slow  # Redis stopped and restarted under live chats

TURNS = 8
BEFORE = 2  # turns 0-1 before the outage
DURING = 4  # turns 2-5 while Redis is stopped, turns 6-7 once it is back
OUTAGE_AT_LEAST = 2.0  # seconds Redis stays down
DEADLINE = 20.0  # for anything the server should do soon
MAX_HISTORY = 10  # the settings' max_conversation_history (the contract's default)

Connect = Callable[..., Awaitable[Recorder]]


# Helpers -------------------------------------------------------------------------------------------------------
async def health(http: Http, url: str) -> dict[str, Any]:
    """The server's health answer (whatever its status code)."""
    _, body, _ = await http.get(f"{url}/api/v1/health")
    return body if isinstance(body, dict) else {"unparsed": body}


async def wait_until_flushed(http: Http, url: str, timeout: float = DEADLINE) -> dict[str, Any]:
    """Poll health until Redis answers again and the write-behind buffer is empty."""
    deadline = time.monotonic() + timeout
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            last = await health(http, url)
        except aiohttp.ClientError as err:
            last = {"unreachable": repr(err)}
        if (last.get("redis") or {}).get("status") == "ok" and (last.get("writeBehind") or {}).get("depth") == 0:
            return last
        await asyncio.sleep(0.1)
    raise AssertionError(f"the write-behind buffer did not empty within {timeout} s after Redis returned: {last}")


def stored_history(client: redis.Redis, session_id: str) -> list[dict[str, Any]]:
    """A session's history exactly as Redis holds it."""
    return [orjson.loads(item) for item in client.lrange(f"chat:history:{{{session_id}}}", 0, -1)]


def error_code(answer: Any) -> str | None:
    """The contract error code of a socket ack or a REST body, if it is an error."""
    if isinstance(answer, dict) and isinstance(answer.get("error"), dict):
        return answer["error"].get("code")
    return None


@pytest.fixture
async def redis_store(tmp_path: Path) -> AsyncIterator[RedisProcess]:
    """An external Redis of this test's own, persistent (AOF, fsync always) so a stop and start loses nothing."""
    store = RedisProcess(data_dir=tmp_path / "redis", persistent=True)
    store.start()
    yield store
    await asyncio.to_thread(store.stop)


@pytest.fixture
async def http() -> AsyncIterator[Http]:
    """The test's HTTP client, with a deadline: a hung request is a failure, not a hang."""
    async with open_http(timeout=aiohttp.ClientTimeout(total=DEADLINE)) as client:
        yield client


# 1. Joined sockets and REST clients chat on -----------------------------------------------------------------------
@dataclasses.dataclass
class Turn:
    """One message of a conversation and what came back for it."""

    n: int
    phase: str
    text: str
    answer: Any = None
    user_id: str | None = None
    reply: dict[str, Any] | None = None
    problem: str | None = None


@dataclasses.dataclass
class Conversation:
    """A visitor talking over a socket or over REST; `exchange` sends one message and waits for its answer."""

    name: str
    session_id: str
    token: str
    exchange: Callable[[str], Awaitable[tuple[Any, str | None, dict[str, Any] | None, str | None]]]
    socket: Recorder | None = None
    turns: list[Turn] = dataclasses.field(default_factory=list)


def socket_exchange(client: Recorder, session_id: str) -> Callable[[str], Awaitable[Any]]:
    """send-message with an ack, then the reply's message-received (replyTo the acked id)."""

    async def exchange(text: str) -> tuple[Any, str | None, dict[str, Any] | None, str | None]:
        try:
            ack = await client.call("send-message", {"sessionId": session_id, "message": text}, timeout=DEADLINE)
        except socketio.exceptions.TimeoutError:
            return None, None, None, f"no ack within {DEADLINE} s"
        if not isinstance(ack, dict) or not ack.get("ok"):
            return ack, None, None, f"ack not ok: {ack}"
        try:
            received = await client.reply_to(ack["messageId"], timeout=DEADLINE)
        except AssertionError:
            return ack, ack["messageId"], None, f"no message-received reply within {DEADLINE} s"
        return ack, ack["messageId"], received["message"], None

    return exchange


def rest_exchange(http: Http, url: str, session_id: str, token: str) -> Callable[[str], Awaitable[Any]]:
    """POST /api/v1/chat/message with the session's Bearer token; the reply comes in the answer."""

    async def exchange(text: str) -> tuple[Any, str | None, dict[str, Any] | None, str | None]:
        try:
            status, body, _ = await http.request(
                "POST", f"{url}/api/v1/chat/message", {"sessionId": session_id, "message": text}, token
            )
        except (TimeoutError, aiohttp.ClientError) as err:
            return None, None, None, f"request failed: {err!r}"
        answer = {"status": status, **(body if isinstance(body, dict) else {"body": body})}
        if status != 200:
            return answer, None, None, f"HTTP {status}: {body}"
        return answer, body["userMessage"]["id"], body.get("reply"), None

    return exchange


def expected_model_messages(previous: list[Turn], current: Turn) -> list[dict[str, str]]:
    """What the contract says the model receives after the system prompt: the last MAX_HISTORY messages, then the new one."""
    earlier: list[dict[str, str]] = []
    for turn in previous:
        earlier.append({"role": "user", "content": turn.text})
        if turn.reply is not None:
            earlier.append({"role": "assistant", "content": turn.reply["content"]})
    return [*earlier[-MAX_HISTORY:], {"role": "user", "content": current.text}]


def model_request_for(double: ProviderDouble, text: str) -> dict[str, Any] | None:
    """The provider request whose new user message is `text`."""
    for record in double.requests["openai"]:
        messages = (record.get("body") or {}).get("messages") or []
        if messages and messages[-1].get("role") == "user" and messages[-1].get("content") == text:
            return record["body"]
    return None


@pytest.mark.parametrize("manager", ["auto", "memory"], ids=["redis-manager", "memory-manager"])
async def test_sockets_and_rest_keep_chatting_through_an_outage(
    start_server: ServerFactory,
    connect: Connect,
    double: ProviderDouble,
    redis_store: RedisProcess,
    http: Http,
    manager: str,
) -> None:
    server = await start_server(redis_url=redis_store.url, socketio_manager=manager)
    conversations: list[Conversation] = []
    for i in range(3):
        client, session_id, token = await joined_client(connect, server.url, f"outage-socket-{i}")
        conversations.append(Conversation(f"socket-{i}", session_id, token, socket_exchange(client, session_id), client))
    for i in range(2):
        status, created, _ = await http.request("POST", f"{server.url}/api/v1/chat/session", {"userId": f"outage-rest-{i}"})
        assert status == 201, created
        conversations.append(
            Conversation(
                f"rest-{i}",
                created["sessionId"],
                created["token"],
                rest_exchange(http, server.url, created["sessionId"], created["token"]),
            )
        )

    before_done = [asyncio.Event() for _ in conversations]
    during_done = [asyncio.Event() for _ in conversations]
    redis_down, redis_up = asyncio.Event(), asyncio.Event()
    health_during: dict[str, Any] = {}

    async def converse(index: int, conversation: Conversation) -> None:
        try:
            for n in range(TURNS):
                if n == BEFORE:
                    before_done[index].set()
                    await redis_down.wait()
                if n == BEFORE + DURING:
                    during_done[index].set()
                    await redis_up.wait()
                phase = "before" if n < BEFORE else "during" if n < BEFORE + DURING else "after"
                turn = Turn(n, phase, f"{conversation.name} message {n} about my order")
                turn.answer, turn.user_id, turn.reply, turn.problem = await conversation.exchange(turn.text)
                conversation.turns.append(turn)
                if turn.problem is not None:
                    return
                if phase == "during":
                    await asyncio.sleep(0.3)  # keep sending for a while the outage lasts
        finally:
            before_done[index].set()
            during_done[index].set()

    async def outage() -> None:
        try:
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in before_done)), 60)
            await asyncio.to_thread(redis_store.stop)
            stopped = time.monotonic()
            redis_down.set()
            health_during.update(await health(http, server.url))
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in during_done)), 90)
            await asyncio.sleep(max(0.0, stopped + OUTAGE_AT_LEAST - time.monotonic()))
        finally:
            redis_down.set()
            await asyncio.to_thread(redis_store.start)
            redis_up.set()

    await asyncio.gather(outage(), *(converse(i, c) for i, c in enumerate(conversations)))

    assert (health_during.get("redis") or {}).get("status") == "down", f"Redis was not down for the server: {health_during}"
    every_turn = [(c.name, t) for c in conversations for t in c.turns]
    internal = [(name, t.n, t.phase, t.answer) for name, t in every_turn if error_code(t.answer) == "internal"]
    assert not internal, f"answered `internal`: {internal}"
    problems = [(name, t.n, t.phase, t.problem) for name, t in every_turn if t.problem is not None]
    assert not problems, f"turns that did not get an ok ack / 200 and a reply: {problems}"
    for conversation in conversations:
        assert len(conversation.turns) == TURNS, conversation.name
        for turn in conversation.turns:
            assert turn.reply is not None and turn.reply["role"] == "assistant", (conversation.name, turn.n, turn.reply)
            assert turn.reply.get("replyTo") == turn.user_id, (conversation.name, turn.n, turn.reply)

    # The model saw the conversation so far while Redis was away.
    for conversation in conversations:
        for k, turn in enumerate(conversation.turns):
            if turn.phase != "during":
                continue
            body = model_request_for(double, turn.text)
            assert body is not None, f"{conversation.name} turn {turn.n}: no provider request carried this message"
            assert body["messages"][0]["role"] == "system"
            assert body["messages"][1:] == expected_model_messages(conversation.turns[:k], turn), (
                f"{conversation.name} turn {turn.n} (during the outage): the model did not get the earlier turns"
            )

    await wait_until_flushed(http, server.url)
    client = redis.Redis.from_url(redis_store.url)
    try:
        for conversation in conversations:
            stored = stored_history(client, conversation.session_id)
            ids = [m["id"] for m in stored]
            assert len(ids) == len(set(ids)), f"{conversation.name}: duplicate ids in Redis history: {ids}"
            assert [m["role"] for m in stored] == ["user", "assistant"] * TURNS, (
                f"{conversation.name}: roles in Redis {[(m['role'], m['content']) for m in stored]}"
            )
            assert [m["id"] for m in stored[0::2]] == [t.user_id for t in conversation.turns], conversation.name
            assert [m["content"] for m in stored[0::2]] == [t.text for t in conversation.turns], conversation.name
            assert [m["id"] for m in stored[1::2]] == [t.reply["id"] for t in conversation.turns if t.reply], conversation.name
            assert [m["replyTo"] for m in stored[1::2]] == [m["id"] for m in stored[0::2]], conversation.name
            status, page, _ = await http.request(
                "GET", f"{server.url}/api/v1/chat/history/{conversation.session_id}?limit=50", token=conversation.token
            )
            assert status == 200 and [m["id"] for m in page["messages"]] == ids, (conversation.name, status, page)
    finally:
        client.close()

    # Each socket was told of every reply once, in order: none missed, none delivered twice.
    for conversation in conversations:
        if conversation.socket is None:
            continue
        delivered = [d["message"]["id"] for d in conversation.socket.of("message-received") if d["message"]["role"] != "user"]
        replies = [t.reply["id"] for t in conversation.turns if t.reply]
        assert delivered == replies, f"{conversation.name}: message-received {delivered}, replies {replies}"


# 2. What cannot be answered safely is refused, with a retry hint -------------------------------------------------
def assert_unavailable_response(what: str, status: int, body: Any, headers: Mapping[str, str]) -> None:
    """503 `unavailable` with a Retry-After header."""
    assert status == 503, f"{what}: expected 503 unavailable, got {status} {body}"
    assert error_code(body) == "unavailable", f"{what}: {body}"
    assert headers.get("Retry-After", "").isdigit() and int(headers["Retry-After"]) >= 1, f"{what}: {dict(headers)}"


def assert_unavailable_ack(what: str, ack: Any) -> None:
    """`{ok: false, error: {code: 'unavailable'}, retryAfter}`."""
    assert isinstance(ack, dict) and ack.get("ok") is False, f"{what}: {ack}"
    assert error_code(ack) == "unavailable", f"{what}: {ack}"
    assert isinstance(ack.get("retryAfter"), int | float) and ack["retryAfter"] > 0, f"{what}: {ack}"


async def test_what_cannot_be_answered_safely_gets_unavailable(
    start_server: ServerFactory, connect: Connect, redis_store: RedisProcess, http: Http
) -> None:
    server = await start_server(redis_url=redis_store.url)
    elsewhere = await start_server(redis_url=redis_store.url)  # another instance: `server` never verifies its session
    status, stranger, _ = await http.request("POST", f"{elsewhere.url}/api/v1/chat/session", {"userId": "elsewhere"})
    assert status == 201, stranger
    status, known, _ = await http.request("POST", f"{server.url}/api/v1/chat/session", {"userId": "known"})
    assert status == 201, known
    status, first, _ = await http.request(
        "POST", f"{server.url}/api/v1/chat/message", {"sessionId": known["sessionId"], "message": "hello"}, known["token"]
    )
    assert status == 200, first
    newcomer = await connect(server.url)
    rejoiner = await connect(server.url)
    made_up = {"sessionId": "3f0c8a53-5d8e-4b8e-9a49-2f1e0c1d2b3a", "token": "x" * 43}

    await asyncio.to_thread(redis_store.stop)

    status, body, headers = await http.request("POST", f"{server.url}/api/v1/chat/session", {"userId": "new-visitor"})
    assert_unavailable_response("POST /chat/session during the outage", status, body, headers)

    assert_unavailable_ack("join-chat {userId} during the outage", await newcomer.call("join-chat", {"userId": "new-visitor"}))
    assert_unavailable_ack(
        "join-chat with a session and token this process never verified",
        await rejoiner.call("join-chat", {"sessionId": stranger["sessionId"], "token": stranger["token"]}),
    )

    status, body, headers = await http.request(
        "POST",
        f"{server.url}/api/v1/chat/message",
        {"sessionId": stranger["sessionId"], "message": "hello from a token never seen here"},
        stranger["token"],
    )
    assert_unavailable_response("REST message with a token this process never verified", status, body, headers)

    status, body, headers = await http.request(
        "POST", f"{server.url}/api/v1/chat/message", {"sessionId": made_up["sessionId"], "message": "hi"}, made_up["token"]
    )
    assert_unavailable_response("REST message with a made-up session and token", status, body, headers)

    # A session this process knows, with a wrong token: never accepted (401, or 503 while it cannot tell).
    status, body, _ = await http.request(
        "POST",
        f"{server.url}/api/v1/chat/message",
        {"sessionId": known["sessionId"], "message": "forged during the outage"},
        "y" * 43,
    )
    assert status in (401, 503) and error_code(body) in ("unauthorized", "unavailable"), (status, body)

    await asyncio.to_thread(redis_store.start)
    await wait_until_flushed(http, server.url)

    # The refusals were only for the outage: the same requests work (or are refused for what they are) again.
    deadline = time.monotonic() + DEADLINE
    while True:
        status, body, _ = await http.request(
            "POST",
            f"{server.url}/api/v1/chat/message",
            {"sessionId": stranger["sessionId"], "message": "hello again after the outage"},
            stranger["token"],
        )
        if status == 200 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert status == 200 and body["reply"]["role"] == "assistant", (status, body)
    deadline = time.monotonic() + DEADLINE
    while True:  # a pooled connection that broke with the restart may answer `unavailable` once: clients retry
        status, body, _ = await http.request(
            "POST",
            f"{server.url}/api/v1/chat/message",
            {"sessionId": made_up["sessionId"], "message": "hi"},
            made_up["token"],
        )
        if status != 503 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert status == 401 and error_code(body) == "unauthorized", (status, body)
    client = redis.Redis.from_url(redis_store.url)
    try:
        contents = [m["content"] for m in stored_history(client, known["sessionId"])]
        assert "forged during the outage" not in contents, contents
    finally:
        client.close()


# 3. An escalation during the outage reaches the agents' queue -----------------------------------------------------
@pytest.mark.parametrize("how", ["keyword", "escalate-event"])
async def test_an_escalation_during_an_outage_is_queued_when_redis_returns(
    start_server: ServerFactory, connect: Connect, redis_store: RedisProcess, http: Http, how: str
) -> None:
    server = await start_server(redis_url=redis_store.url, agent_api_keys=AGENT_KEYS, agent_wait_timeout=60.0)
    agent = await agent_client(server.url, "alex-key-123-4567-89ab")
    try:
        customer, session_id, _ = await joined_client(connect, server.url, "wants-a-person")
        sent = await customer.call("send-message", {"sessionId": session_id, "message": "Where is my parcel?"})
        assert sent["ok"], sent
        await customer.reply_to(sent["messageId"])
        assert (await agent_call(agent, "get-queue"))["queue"] == []

        await asyncio.to_thread(redis_store.stop)
        stopped = time.monotonic()
        if how == "keyword":
            text = "I want to talk to a human please"
            ack = await customer.call("send-message", {"sessionId": session_id, "message": text}, timeout=DEADLINE)
            assert ack.get("ok") is True, f"send-message with an escalation keyword during the outage: {ack}"
            reply = await customer.reply_to(ack["messageId"], timeout=DEADLINE)
            assert reply["message"]["role"] == "assistant", reply
            trigger = "keyword"
        else:
            ack = await customer.call("escalate", {"sessionId": session_id, "reason": "please get me a person"}, timeout=DEADLINE)
            assert ack.get("ok") is True, f"escalate during the outage: {ack}"
            trigger = "user_request"
        await asyncio.sleep(max(0.0, stopped + OUTAGE_AT_LEAST - time.monotonic()))
        await asyncio.to_thread(redis_store.start)

        deadline = time.monotonic() + DEADLINE
        queue: list[dict[str, Any]] = []
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = await agent_call(agent, "get-queue")
            except socketio.exceptions.TimeoutError:
                last = "no ack"
            queue = [e for e in (last.get("queue") or []) if e.get("sessionId") == session_id] if isinstance(last, dict) else []
            if queue:
                break
            await asyncio.sleep(0.2)
        assert len(queue) == 1, f"the session never reached the agents' queue after Redis returned: {last}"
        assert queue[0]["trigger"] == trigger, queue[0]

        await wait_until_flushed(http, server.url)
        client = redis.Redis.from_url(redis_store.url)
        try:
            assert client.zscore("chat:queue", session_id) is not None
            escalations = [orjson.loads(e) for e in client.lrange(f"chat:escalations:{{{session_id}}}", 0, -1)]
            assert [e["trigger"] for e in escalations] == [trigger], escalations
            if how == "keyword":
                users = [m["content"] for m in stored_history(client, session_id) if m["role"] == "user"]
                assert users == ["Where is my parcel?", text], users
        finally:
            client.close()
    finally:
        await agent.disconnect()


# 4. Acknowledged during an outage, then the process is restarted: nothing lost, nothing twice -------------------
@pytest.fixture
async def server_processes() -> AsyncIterator[list[ServerProcess]]:
    """Every server process a test started; stopped at its end."""
    started: list[ServerProcess] = []
    yield started
    for process in started:
        await process.stop()


@pytest.mark.slow
async def test_acknowledged_messages_survive_a_restart_during_an_outage(
    server_processes: list[ServerProcess],
    connect: Connect,
    double: ProviderDouble,
    redis_store: RedisProcess,
    http: Http,
    tmp_path: Path,
) -> None:
    env = {
        "REDIS_URL": redis_store.url,
        "DATA_DIR": str(tmp_path / "data"),
        "OPENAI_API_KEY": "sk-test",
        "OPENAI_BASE_URL": double.openai_base_url,
        "GEMINI_API_KEY": "g-test",
        "GEMINI_BASE_URL": double.gemini_base_url,
        "AI_REQUEST_TIMEOUT": "5",
        "SHUTDOWN_GRACE": "5",
    }

    async def launch(name: str) -> ServerProcess:
        process = ServerProcess(env, log_path=tmp_path / f"{name}.log", log_level="INFO")
        server_processes.append(process)
        return await process.start()

    first = await launch("first")
    customer = await connect(first.url)
    joined = await customer.call("join-chat", {"userId": "restarted-during-outage"})
    assert joined["ok"], joined
    session_id, token = joined["sessionId"], joined["token"]
    sent = await customer.call("send-message", {"sessionId": session_id, "message": "before the outage"})
    assert sent["ok"], sent
    await customer.reply_to(sent["messageId"])

    await asyncio.to_thread(redis_store.stop)
    texts = [f"during the outage {i}" for i in range(3)]
    acks = [await customer.call("send-message", {"sessionId": session_id, "message": text}, timeout=DEADLINE) for text in texts]
    assert all(isinstance(a, dict) and a.get("ok") for a in acks), f"acks during the outage: {acks}\n{first.log()[-4000:]}"
    acked_ids = [a["messageId"] for a in acks]

    assert first.process is not None
    first.process.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(first.process.wait(), 30)
    except TimeoutError:
        first.process.kill()
        await first.process.wait()
        raise AssertionError(
            f"the server did not exit within 30 s of SIGTERM while Redis was down\n{first.log()[-4000:]}"
        ) from None
    await customer.disconnect()
    await asyncio.to_thread(redis_store.start)

    second = await launch("second")
    client = redis.Redis.from_url(redis_store.url)
    try:
        deadline = time.monotonic() + DEADLINE
        stored = stored_history(client, session_id)
        while time.monotonic() < deadline and not set(texts) <= {m["content"] for m in stored}:
            await asyncio.sleep(0.2)
            stored = stored_history(client, session_id)
        await wait_until_flushed(http, second.url)
        stored = stored_history(client, session_id)
        users = [m for m in stored if m["role"] == "user"]
        assert [m["content"] for m in users] == ["before the outage", *texts], (
            f"user messages in Redis after the restart: {[m['content'] for m in users]}\n"
            f"first process:\n{first.log()[-4000:]}\nsecond process:\n{second.log()[-4000:]}"
        )
        assert [m["id"] for m in users] == [sent["messageId"], *acked_ids]
        ids = [m["id"] for m in stored]
        assert len(ids) == len(set(ids)), f"duplicate ids: {ids}"
        reply_to = [m.get("replyTo") for m in stored if m["role"] == "assistant"]
        assert len(reply_to) == len(set(reply_to)), f"a user message answered twice: {reply_to}"
        assert sent["messageId"] in reply_to
        await second.stop()

        # The same DATA_DIR on a third start replays nothing again.
        third = await launch("third")
        await wait_until_flushed(http, third.url)
        again = await connect(third.url)
        rejoined = await again.call("join-chat", {"sessionId": session_id, "token": token})
        assert rejoined["ok"], rejoined
        last = await again.call("send-message", {"sessionId": session_id, "message": "after the restarts"}, timeout=DEADLINE)
        assert last["ok"], last
        await again.reply_to(last["messageId"], timeout=DEADLINE)
        await wait_until_flushed(http, third.url)
        final = stored_history(client, session_id)
        assert [m["id"] for m in final[: len(stored)]] == ids, "history changed on the third start"
        assert [(m["role"], m["content"]) for m in final[len(stored) :]] == [
            ("user", "after the restarts"),
            ("assistant", "Echo: after the restarts"),
        ], [(m["role"], m["content"]) for m in final[len(stored) :]]
    finally:
        client.close()
