"""The Lua scripts in server/storage/lua/, registered with a client (each file's header lists its KEYS and ARGV)."""

from __future__ import annotations

from pathlib import Path

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

LUA_DIR = Path(__file__).with_name("lua")


def source(name: str, *, includes: tuple[str, ...] = ()) -> str:
    """The text of lua/<name>.lua after the files it includes (Lua functions it calls, such as trim_history)."""
    return "\n".join((LUA_DIR / f"{part}.lua").read_text(encoding="utf-8") for part in (*includes, name))


def register(redis: aioredis.Redis, name: str, *, includes: tuple[str, ...] = ()) -> AsyncScript:
    """Read a script once and register it: it runs by EVALSHA, loaded into Redis on first use (and after a restart)."""
    return redis.register_script(source(name, includes=includes))
