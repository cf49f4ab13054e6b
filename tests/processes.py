"""Whole server processes for tests: `python run.py` as the README starts it, signalled and killed for real."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from server.settings import PROJECT_ROOT
from tests.clients import open_http
from tests.servers import free_port


def rss_mb(pid: int) -> float:
    """Resident memory of a process, in MB (from /proc): the memory-bound tests compare it before and after."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class ServerProcess:
    """`python run.py` with its own environment; with a `log_path` its output is kept there to read afterwards.

    With `new_session`, the process leads its own process group, so a test can send a terminal's Ctrl-C to
    the whole group (`send(SIGINT, group=True)`) without touching the test runner.
    """

    def __init__(
        self,
        env: dict[str, str],
        *,
        log_path: Path | None = None,
        log_level: str = "WARNING",
        new_session: bool = False,
        port: int | None = None,
    ) -> None:
        self.port = port or free_port()
        self.env = {**os.environ, **env, "PORT": str(self.port), "HOST": "127.0.0.1", "LOG_LEVEL": log_level}
        self.log_path = log_path
        self.new_session = new_session
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        """Whether the process has been started and has not exited."""
        return self.process is not None and self.process.returncode is None

    async def start(self, timeout: float = 30.0) -> ServerProcess:
        """Spawn the process and wait until /health answers 200 (failing early, with its log, if it dies)."""
        output: Any = asyncio.subprocess.DEVNULL
        if self.log_path is not None:
            output = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                str(PROJECT_ROOT / "run.py"),
                env=self.env,
                cwd=str(PROJECT_ROOT),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=output,
                stderr=output,
                start_new_session=self.new_session,
            )
        finally:
            if isinstance(output, int) and output >= 0:
                os.close(output)  # the child has its own copy
        deadline = time.monotonic() + timeout
        async with open_http() as http:
            while time.monotonic() < deadline:
                if self.process.returncode is not None:
                    raise RuntimeError(f"server process exited at start:\n{self.log()[-4000:]}")
                with contextlib.suppress(aiohttp.ClientError):
                    if (await http.get(f"{self.url}/health")).status == 200:
                        return self
                await asyncio.sleep(0.1)
        raise RuntimeError(f"server process did not start:\n{self.log()[-4000:]}")

    def log(self) -> str:
        """Everything the process wrote so far (empty without a log file)."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def send(self, sig: int, *, group: bool = False) -> None:
        """Send `sig` to the process, or (like a terminal's Ctrl-C) to its whole process group."""
        assert self.process is not None
        if group:
            os.killpg(self.process.pid, sig)
        else:
            self.process.send_signal(sig)

    async def exited_within(self, seconds: float) -> bool:
        """Wait up to `seconds` for the process to exit."""
        assert self.process is not None
        try:
            await asyncio.wait_for(self.process.wait(), max(0.0, seconds))
        except TimeoutError:
            return False
        return True

    async def kill9(self) -> None:
        """kill -9 the server process alone, as an OOM kill or a lost node would."""
        self.send(signal.SIGKILL)
        assert self.process is not None
        await self.process.wait()

    async def stop(self, sig: int = signal.SIGTERM, grace: float = 30.0) -> None:
        """Teardown: `sig`, then SIGKILL (its whole group when it leads one) if it has not exited in `grace`."""
        if not self.alive:
            return
        assert self.process is not None
        self.send(sig)
        if await self.exited_within(grace):
            return
        with contextlib.suppress(ProcessLookupError):
            if self.new_session:
                os.killpg(self.process.pid, signal.SIGKILL)
            else:
                self.process.kill()
        await self.process.wait()


async def launch(started: list[ServerProcess], env: dict[str, str]) -> ServerProcess:
    """Start a server process with `env`, registered in `started` (the `processes` fixture) to be stopped after."""
    process = ServerProcess(env)
    started.append(process)
    return await process.start()
