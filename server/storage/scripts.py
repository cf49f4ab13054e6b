"""The Lua scripts in server/storage/lua/, registered with a client (each file's header lists its KEYS and ARGV)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis._parsers.base import BaseParser
from redis.asyncio.connection import AbstractConnection
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, NoScriptError, ResponseError

LUA_DIR = Path(__file__).with_name("lua")
HIGH_WATER_BYTES = 1 << 20  # commands written but not yet sent beyond which a caller waits for the socket

Arg = str | bytes | int


def source(name: str, *, includes: tuple[str, ...] = ()) -> str:
    """The text of lua/<name>.lua after the files it includes (Lua functions it calls, such as trim_history)."""
    return "\n".join((LUA_DIR / f"{part}.lua").read_text(encoding="utf-8") for part in (*includes, name))


def register(redis: aioredis.Redis, name: str, *, includes: tuple[str, ...] = ()) -> AsyncScript:
    """Read a script once and register it: it runs by EVALSHA, loaded into Redis on first use (and after a restart)."""
    return redis.register_script(source(name, includes=includes))


class SharedConnection:
    """One connection that the hot path's commands share, pipelined: written as they come, answered in order.

    Through redis-py each command takes a connection from the pool (a lock, a condition, a timer, observability
    recorders), writes, reads its own answer and gives the connection back: about 45 µs of client CPU per command
    with 20 replies at once, against 12 here, where concurrent commands also share their socket writes and
    reads (as node-redis pipelines: the commands of one turn of the event loop go out in one write). The
    connection is taken from the client's own pool, so it is opened with the client's settings (address or unix
    socket, password, database, TLS, keepalive) and counts against its size. A lost connection fails every command
    waiting on it with redis-py's ConnectionError (STORAGE_DOWN) and the next command opens another. A caller
    cancelled while it waits leaves its answer to be read and dropped (its command was sent: it runs, as it would
    have with redis-py, which instead drops the whole connection).
    """

    def __init__(self, redis: aioredis.Redis) -> None:
        self._pool = redis.connection_pool
        self._link: _Link | None = None
        self._opening = asyncio.Lock()

    async def execute(self, command: bytes) -> Any:
        """Send one packed command and return its answer (an error answer raised as redis-py raises it)."""
        link = self._link
        if link is None:
            link = await self._open()
        return await link.execute(command)

    async def _open(self) -> _Link:
        async with self._opening:
            if self._link is None:
                connection = await self._pool.get_connection()
                reader, writer = connection._reader, connection._writer  # its streams, once redis-py connected it
                if reader is None or writer is None:
                    await self._pool.release(connection)
                    raise RedisConnectionError("Redis connection not open")
                link = self._link = _Link(writer)
                link.reading = asyncio.create_task(self._read(link, connection, reader), name="redis-shared-connection")
            return self._link

    async def _read(self, link: _Link, connection: AbstractConnection, reader: asyncio.StreamReader) -> None:
        """Hand each answer to the oldest waiter, until the connection ends; then fail whoever still waits."""
        parser = hiredis.Reader(protocolError=InvalidResponse, replyError=ResponseError)
        waiters = link.waiters
        error: RedisConnectionError = RedisConnectionError("Connection closed by server.")
        try:
            while data := await reader.read(65536):
                parser.feed(data)
                while (answer := parser.gets()) is not False:
                    waiter = waiters.popleft()
                    if waiter.done():  # its caller was cancelled
                        continue
                    if isinstance(answer, ResponseError):
                        waiter.set_exception(BaseParser.parse_error(str(answer)))
                    else:
                        waiter.set_result(answer)
        except asyncio.CancelledError:
            error = RedisConnectionError("Connection closed.")
            raise
        except Exception as err:  # OSError, a protocol error, an answer nobody waited for
            error = RedisConnectionError(f"Error while reading from Redis: {err!r}")
        finally:
            if self._link is link:
                self._link = None
            link.fail(error)
            with contextlib.suppress(Exception):
                await connection.disconnect(nowait=True)
            with contextlib.suppress(Exception):
                await self._pool.release(connection)

    async def aclose(self) -> None:
        """Close the connection (waiting commands fail), at shutdown."""
        link, self._link = self._link, None
        if link is not None and link.reading is not None and not link.reading.done():
            link.reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await link.reading


class _Link:
    """One open connection of a SharedConnection: its writer, its waiters in order, what this turn will write."""

    __slots__ = ("closed", "reading", "unsent", "waiters", "writer")

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.waiters: deque[asyncio.Future[Any]] = deque()
        self.unsent: list[bytes] = []
        self.reading: asyncio.Task[None] | None = None
        self.closed = False

    async def execute(self, command: bytes) -> Any:
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self.waiters.append(waiter)
        if not self.unsent:
            loop.call_soon(self.send)
        self.unsent.append(command)
        if self.writer.transport.get_write_buffer_size() > HIGH_WATER_BYTES:
            try:
                await self.writer.drain()
            except OSError as err:  # its reader fails the waiters too; this caller hears it now
                raise RedisConnectionError(f"Error while writing to Redis: {err!r}") from err
        return await waiter

    def send(self) -> None:
        """Write the commands gathered this turn in one go (none once closed: their waiters have failed)."""
        unsent, self.unsent = self.unsent, []
        if not self.closed:
            self.writer.writelines(unsent)

    def fail(self, error: RedisConnectionError) -> None:
        """The connection is gone: every command still waiting on it fails with `error`."""
        self.closed = True
        waiters, self.waiters = self.waiters, deque()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(error)


class HotScript:
    """A script of the hot path (a reply's two writes): EVALSHA packed by hiredis over the shared connection.

    redis-py's Script call goes through execute_command: command-name parsing, event dispatch, observability
    recorders, a retry wrapper (with no retries on our pool) and a pure-Python packer that rebuilds its buffer once
    per argument; in profiles that cost about as much client CPU as the round trip itself. NOSCRIPT (a restarted
    Redis) is answered with EVAL, which loads the script again. Arguments are str, bytes or int (no floats:
    hiredis formats them its own way); errors are redis-py's own, so STORAGE_DOWN catches an outage as before.
    """

    def __init__(self, connection: SharedConnection, text: str) -> None:
        self._connection = connection
        self._source = text
        self.sha = hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()

    async def __call__(self, keys: Sequence[Arg] = (), args: Sequence[Arg] = ()) -> Any:
        try:
            return await self._connection.execute(pack(("EVALSHA", self.sha, len(keys), *keys, *args)))
        except NoScriptError:
            return await self._connection.execute(pack(("EVAL", self._source, len(keys), *keys, *args)))


def pack(command: tuple[Arg, ...]) -> bytes:
    """One command in the Redis protocol (hiredis' packer; its type stub only admits 1-tuples)."""
    packed: bytes = hiredis.pack_command(command)  # type: ignore[arg-type]
    return packed


def register_hot(connection: SharedConnection, name: str, *, includes: tuple[str, ...] = ()) -> HotScript:
    """`register` for a script of the hot path (see HotScript)."""
    return HotScript(connection, source(name, includes=includes))
