"""The reply's own work (issue 13): one Redis round trip before the ack and one after, and what rides on them.

The message rate limit and the token budgets' charge ride on the append, the budgets' settlement on finish_reply;
the scripts count a prompt's tokens exactly as fit_prompt does, so the budgets are charged what is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import LockNotOwnedError, ResponseError

from devtools.provider_double import ProviderDouble
from server.chat.budgets import BudgetPolicy, Budgets, cut_message, estimate_tokens, fit_prompt
from server.chat.responder import _turns
from server.contract import Message, new_message
from server.ops.metrics import Metrics
from server.storage.errors import OverLimit
from server.storage.messages import BudgetCharge, BudgetSettlement, FinishedReply, MessageStore, Streaks
from server.storage.rate_limits import RateLimitStore
from server.storage.scripts import HotScript, SharedConnection
from server.storage.sessions import SessionStore
from tests.clients import joined_client
from tests.servers import ServerFactory

WORDS = ["parcel", "refund", "Überweisung", "配送", "😀", "", "a", "order #1234", "ça va?", "\n", '"quoted"']


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    connection = aioredis.Redis.from_url(redis_url)
    yield connection
    await connection.aclose()


async def _session(client: aioredis.Redis) -> str:
    session, _ = await SessionStore(client, 3600).create("u1", {}, client_ip="192.0.2.1")
    return session.id


def _text(rng: random.Random, longest: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, longest)))


def _charge(fixed: int, cap: int, truncated: int, counters: tuple[str, ...] = ("c:all", "c:v", "c:ip")) -> BudgetCharge:
    return BudgetCharge(
        counters=counters,
        limits=(0,) * len(counters),
        reserve=0,
        ttl_seconds=60,
        fixed=fixed,
        cap=cap,
        truncated=truncated,
        session_budget=0,
    )


async def test_the_append_charges_exactly_what_fit_prompt_counts(client: aioredis.Redis) -> None:
    """Random histories (every role, empty and non-ASCII texts) and caps: the script's count is fit_prompt's."""
    rng = random.Random(13)
    store = MessageStore(client, 3600)
    for trial in range(60):
        session_id = await _session(client)
        for _ in range(rng.randint(0, 14)):
            role = rng.choice(["user", "assistant", "agent", "system"])
            await store.append(session_id, new_message(session_id, role, _text(rng, 40)))
        system_prompt = _text(rng, 300)
        text = _text(rng, 400)
        cap = rng.choice([0, 50, 200, 600, 1200, 5000])
        context_size = rng.choice([0, 3, 10, 20])
        fixed = estimate_tokens(system_prompt) + estimate_tokens(text)
        truncated = cut_message(system_prompt, text, cap)[1] if 0 < cap < fixed else fixed
        appended = await store.append(
            session_id,
            new_message(session_id, "user", text),
            context_size=context_size,
            budget=_charge(fixed, cap, truncated, (f"c:{trial}",)),
        )
        fitted = fit_prompt(system_prompt, _turns(appended.context), text, cap)
        assert appended.budget is not None
        assert appended.budget.reserved == fitted.tokens, (trial, cap, len(appended.context))
        assert int(await client.get(f"c:{trial}") or 0) == fitted.tokens


async def test_over_its_rate_limit_a_message_is_refused_and_not_stored(client: aioredis.Redis) -> None:
    store = MessageStore(client, 3600)
    session_id = await _session(client)
    for i in range(3):
        await store.append(session_id, new_message(session_id, "user", f"m{i}"), rate_limit=3)
    with pytest.raises(OverLimit) as refused:
        await store.append(session_id, new_message(session_id, "user", "one too many"), rate_limit=3)
    assert 0 < refused.value.retry_after <= 60
    assert [m["content"] for m in (await store.history(session_id, 10)).messages] == ["m0", "m1", "m2"]
    assert await client.pttl(f"chat:ratelimit:messages:{session_id}") > 0


async def test_no_budget_is_charged_for_an_agents_session_or_one_whose_own_budget_is_spent(client: aioredis.Redis) -> None:
    store = MessageStore(client, 3600)
    held = await _session(client)
    await client.hset(f"chat:session:{{{held}}}", "state", "agent")
    spent = await _session(client)
    await client.hset(f"chat:session:{{{spent}}}", "tokens", 500)
    charge = BudgetCharge(("c:x",), (0,), 800, 60, 10, 0, 10, session_budget=500)
    for session_id in (held, spent):
        appended = await store.append(session_id, new_message(session_id, "user", "hi"), budget=charge)
        assert appended.budget is None
    assert await client.get("c:x") is None


async def test_a_reservation_is_settled_with_the_reply_even_when_the_session_is_gone(client: aioredis.Redis) -> None:
    store = MessageStore(client, 3600)
    session_id = await _session(client)
    appended = await store.append(session_id, new_message(session_id, "user", "hi"), budget=_charge(10, 0, 10, ("a", "b")))
    assert appended.budget is not None and appended.budget.reserved == 10
    reply: Message = new_message(session_id, "assistant", "hello")
    settle = BudgetSettlement(("a", "b"), -4, 60)
    bookkeeping: dict[str, Any] = {"attempts": [("openai", False)], "provider": "openai", "confidence": None}
    finished = await store.finish_reply(
        session_id, [reply], streamed_id=None, latency_ms=5, tokens=6, settle=settle, **bookkeeping
    )
    assert finished.used == 6 and [int(await client.get(k) or 0) for k in ("a", "b")] == [6, 6]
    again = await store.finish_reply(session_id, [reply], streamed_id=None, latency_ms=5, tokens=6, **bookkeeping)
    assert again.used is None
    await client.delete(f"chat:session:{{{session_id}}}")
    with pytest.raises(Exception, match=session_id):
        await store.finish_reply(session_id, [], streamed_id=None, latency_ms=5, tokens=6, settle=settle, **bookkeeping)
    assert int(await client.get("a") or 0) == 2


async def test_the_budgets_own_charge_and_the_appends_agree(client: aioredis.Redis) -> None:
    """A reply charged on its own (taken over, or buffered) is charged the same reservation as on the hot path."""
    sessions = SessionStore(client, 3600)
    budgets = Budgets(RateLimitStore(client), sessions, BudgetPolicy(max_prompt_tokens=3000), Metrics())
    store = MessageStore(client, 3600)
    session_id = await _session(client)
    charge = await budgets.charge_for(session_id, "system", "hello there")
    assert charge is not None
    appended = await store.append(session_id, new_message(session_id, "user", "hello there"), budget=charge)
    assert appended.budget is not None
    on_the_hot_path = budgets.admitted(session_id, charge, appended.budget)
    on_its_own = await budgets.admit(session_id, fit_prompt("system", [], "hello there", 3000).tokens)
    assert on_its_own.keys == on_the_hot_path.keys and on_its_own.reserved == on_the_hot_path.reserved > 800


async def test_a_reply_costs_one_round_trip_before_the_ack_and_one_after(
    start_server: ServerFactory, connect: Any, double: ProviderDouble, redis_url: str, redis_sync: redis.Redis
) -> None:
    """Every command of the session's second reply, as Redis saw it: the append and the finish, nothing else.

    One process (the bench's set-up): across processes the session's lock adds its own commands.
    """
    server = await start_server(rate_limit_messages_per_minute=100, socketio_manager="memory")
    client, session_id, _ = await joined_client(connect, server.url)
    sent = await client.call("send-message", {"sessionId": session_id, "message": "warm up"})  # budgets' names read
    await client.reply_to(sent["messageId"])
    monitor = aioredis.Redis.from_url(redis_url)
    seen: list[str] = []
    async with monitor.monitor() as commands:
        done = asyncio.Event()

        async def listen() -> None:
            async for entry in commands.listen():
                command = str(entry.get("command", ""))
                if "end-of-reply" in command:
                    done.set()
                    return
                # not the scripts' own commands, nor the leases' renewal (every few seconds, for every reply held)
                if entry.get("client_type") != "lua" and "replyleases XX" not in command:
                    seen.append(command)

        listener = asyncio.create_task(listen())
        await asyncio.sleep(0.1)
        sent = await client.call("send-message", {"sessionId": session_id, "message": "where is my parcel?"})
        await client.reply_to(sent["messageId"])
        redis_sync.echo("end-of-reply")
        await asyncio.wait_for(done.wait(), 5)
        await listener
    await monitor.aclose()
    ours = [c for c in seen if session_id in c]
    assert len(ours) == 2 and all(c.startswith("EVALSHA") for c in ours), ours
    assert not [c for c in seen if "chat:budget" in c and session_id not in c], seen


async def test_the_shared_connection_keeps_every_answer_with_its_command(redis_url: str) -> None:
    """Pipelined commands: error answers, cancelled callers, a flushed script cache and a killed connection."""
    client = aioredis.Redis.from_url(redis_url)
    shared = SharedConnection(client)
    echo = HotScript(shared, "if ARGV[1] == 'fail' then return redis.error_reply('refused') end return {KEYS[1], ARGV[1], 7}")
    assert await echo(keys=["k"], args=["é"]) == [b"k", "é".encode(), 7]
    await client.script_flush()
    assert await echo(keys=["k"], args=[b"x"]) == [b"k", b"x", 7]  # NOSCRIPT: EVAL loads it again
    with pytest.raises(ResponseError, match="refused"):
        await echo(keys=["k"], args=["fail"])
    calls = [asyncio.create_task(echo(keys=[f"k{i}"], args=[i])) for i in range(50)]
    await asyncio.sleep(0)
    for call in calls[::7]:
        call.cancel()
    for i, call in enumerate(calls):
        if i % 7:
            assert await call == [f"k{i}".encode(), str(i).encode(), 7]
        else:
            with contextlib.suppress(asyncio.CancelledError):  # unless its answer had come already
                await call
    await client.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
    with contextlib.suppress(RedisConnectionError):  # the kill may be seen by this call or only by the reader
        await echo(keys=["k"], args=["after"])
    assert await echo(keys=["k"], args=["again"]) == [b"k", b"again", 7]  # a new connection
    await shared.aclose()
    await client.aclose()


async def test_a_session_lock_is_held_renewed_and_released_by_its_holder_only(client: aioredis.Redis) -> None:
    store = MessageStore(client, 3600)
    first = store.session_lock("s1", "proc-a:1", timeout=1, wait=0.3)
    second = store.session_lock("s1", "proc-b:2", timeout=1, wait=0.3)
    assert await first.acquire()
    assert await client.get("chat:lock:{s1}") == b"proc-a:1"
    started = asyncio.get_running_loop().time()
    assert not await second.acquire()  # it stayed taken for the whole wait
    assert asyncio.get_running_loop().time() - started >= 0.2
    await client.pexpire("chat:lock:{s1}", 100)
    await first.reacquire()
    assert await client.pttl("chat:lock:{s1}") > 500
    with pytest.raises(LockNotOwnedError):
        await second.release()
    await first.release()
    assert await client.get("chat:lock:{s1}") is None
    with pytest.raises(LockNotOwnedError):
        await first.reacquire()
    waiting = asyncio.create_task(second.acquire())
    assert await first.acquire() is True
    await asyncio.sleep(0.05)
    await first.release()
    assert await waiting  # took it once the first holder let go
    await store.aclose()


async def test_the_misses_and_negatives_in_a_row_ride_on_the_finish(client: aioredis.Redis) -> None:
    """The escalation rules' counts move in finish_reply's round trip: one more, start over, untouched; a count that
    reaches its limit is reported and starts over."""
    store = MessageStore(client, 3600)
    session_id = await _session(client)
    bookkeeping: dict[str, Any] = {"attempts": [], "provider": "local", "confidence": 0.2, "latency_ms": 5, "tokens": 0}

    async def finish(streaks: Streaks | None) -> FinishedReply:
        reply: Message = new_message(session_id, "assistant", "hello")
        return await store.finish_reply(session_id, [reply], streamed_id=None, streaks=streaks, **bookkeeping)

    first = await finish(Streaks(miss=True, negative=True, misses_limit=2, negatives_limit=3))
    assert (first.misses, first.negatives) == (1, 1)
    untouched = await finish(Streaks(miss=None, negative=None, misses_limit=2, negatives_limit=3))
    assert (untouched.misses, untouched.negatives) == (1, 1)
    second = await finish(Streaks(miss=True, negative=False, misses_limit=2, negatives_limit=3))
    assert (second.misses, second.negatives) == (2, 0)  # reported at its limit, then starts over
    after = await finish(Streaks(miss=None, negative=None, misses_limit=2, negatives_limit=3))
    assert (after.misses, after.negatives) == (0, 0)
    assert (await finish(None)).misses is None
