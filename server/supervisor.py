"""WORKERS above 1: one supervisor process runs N server processes on one port and keeps them running.

Each worker is a whole server (`run.py --worker I`) listening on the same HOST:PORT with SO_REUSEPORT, so the
kernel spreads new connections over them. They share what several processes on one Redis share (rooms through
the Socket.IO Redis manager, per-session order, handoff): the operator's REDIS_URL, or, without one, the embedded
Redis the supervisor starts and hands to every worker. The supervisor serves nothing itself; it starts the
workers (and fails, non-zero, when they cannot start), forwards SIGTERM/SIGINT and waits for their graceful
shutdown, and restarts a worker that dies, with backoff so a crash loop does not spin. Workers run in their own
sessions (a terminal's Ctrl-C reaches the supervisor alone, which then signals each worker once) and get SIGTERM
from the kernel if the supervisor itself is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

from loguru import logger

from server.ops.logging import configure_logging
from server.settings import PROJECT_ROOT, Settings
from server.storage.redis import EmbeddedRedis, parent_death_signal

START_TIMEOUT = 60.0  # seconds a worker gets from its start to listening on the port
STOP_MARGIN = 15.0  # seconds beyond SHUTDOWN_GRACE a worker gets to finish its shutdown before SIGKILL
BACKOFF_FIRST = 0.5  # seconds before restarting a worker that died after running well
BACKOFF_MAX = 30.0  # the longest wait between restarts of a worker that keeps dying
STABLE_AFTER = 30.0  # a worker that served this long before it died starts its backoff over


@dataclasses.dataclass
class Worker:
    """One slot of the pool: its index (kept across restarts), its current process, its recent deaths."""

    index: int
    process: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    failures: int = 0  # deaths in a row, each within STABLE_AFTER of its start

    @property
    def pid(self) -> int | None:
        """The current process's pid, None before the first start."""
        return self.process.pid if self.process is not None else None

    @property
    def alive(self) -> bool:
        """Whether the current process has not exited."""
        return self.process is not None and self.process.returncode is None


def restart_delay(failures: int) -> float:
    """Seconds before the next start of a worker that died `failures` times in a row: doubling, capped."""
    return min(BACKOFF_MAX, BACKOFF_FIRST * float(1 << max(0, min(failures - 1, 16))))


def describe_exit(returncode: int | None) -> str:
    """`code 1` or `signal SIGKILL`, for log lines."""
    if returncode is None:
        return "no exit status"
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-returncode).name}"
        return f"signal {-returncode}"
    return f"code {returncode}"


def port_problem(host: str, port: int) -> str | None:
    """Why HOST:PORT cannot be served (in use, or not an address of this machine), None when it can.

    Workers bind with SO_REUSEPORT, which would let them join a port another server of this user already holds
    with it; this bind, without it, fails on any listener there.
    """
    if port == 0:
        return "WORKERS above 1 needs a fixed PORT (each worker would get a port of its own)"
    try:
        addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as err:
        return f"cannot resolve HOST {host!r}: {err}"
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp binds: TIME_WAIT is no conflict
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(address)
            except OSError as err:
                return f"cannot listen on {address[0]}:{port}: {err.strerror or err}"
    return None


class Supervisor:
    """Starts WORKERS server processes on one port, restarts the ones that die, stops them all on a signal."""

    def __init__(self, settings: Settings, command: list[str] | None = None) -> None:
        self.settings = settings
        self.command = command or [sys.executable, str(PROJECT_ROOT / "run.py")]
        self.workers = [Worker(index) for index in range(1, settings.workers + 1)]
        self.embedded: EmbeddedRedis | None = None if settings.redis_url else EmbeddedRedis(settings.data_dir)
        self.route_dir: Path | None = None  # the workers' private sockets (server/realtime/affinity.py)
        self._stopping = asyncio.Event()
        self._signals = 0

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT; 0 after a clean stop, 1 when the workers cannot start or stop cleanly."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            problem = self._problem()
            if problem is not None:
                logger.error("cannot start {} workers: {}", len(self.workers), problem)
                return 1
            if self.embedded is not None:
                await self.embedded.start()
            self.route_dir = Path(tempfile.mkdtemp(prefix="support-chat-"))  # mode 0700: this user's alone
            return await self._serve()
        finally:
            if self.embedded is not None:
                await self.embedded.stop()
            if self.route_dir is not None:
                shutil.rmtree(self.route_dir, ignore_errors=True)
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            logger.info("supervisor: stopped")

    def _problem(self) -> str | None:
        """A setting that makes N workers impossible, or the port being taken."""
        if self.settings.socketio_manager == "memory":
            return "SOCKETIO_MANAGER=memory keeps rooms inside one process; workers need the Redis manager (auto)"
        return port_problem(self.settings.host, self.settings.port)

    async def _serve(self) -> int:
        """Start every worker, watch them until asked to stop, then stop them."""
        started = await asyncio.gather(*(self._start(worker) for worker in self.workers))
        if not all(started) and not self._stopping.is_set():
            logger.error(
                "supervisor: {} of {} workers did not start: stopping the others", started.count(False), len(self.workers)
            )
            await self._stop_workers()
            return 1
        watchers = [asyncio.create_task(self._watch(worker), name=f"worker-{worker.index}") for worker in self.workers]
        if not self._stopping.is_set():
            logger.info(
                "supervisor pid {}: {} workers serving on {}:{} (pids {}), redis {}",
                os.getpid(),
                len(self.workers),
                self.settings.host,
                self.settings.port,
                ", ".join(str(worker.pid) for worker in self.workers),
                self.settings.redis_mode,
            )
            await self._stopping.wait()
        for watcher in watchers:
            watcher.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
        return 0 if await self._stop_workers() else 1

    async def _stopped(self) -> bool:
        """Returns once a stop has been asked for."""
        await self._stopping.wait()
        return True

    def _on_signal(self, sig: signal.Signals) -> None:
        self._signals += 1
        if self._signals == 1:
            logger.info("supervisor: {} received: stopping {} workers", sig.name, len(self.workers))
        else:
            logger.info("supervisor: {} received again: the workers are already stopping", sig.name)
        self._stopping.set()

    def _worker_args(self, worker: Worker, ready_fd: int) -> list[str]:
        args = [*self.command, "--worker", str(worker.index), "--ready-fd", str(ready_fd)]
        if self.route_dir is not None:
            args += ["--route-dir", str(self.route_dir)]
        if self.embedded is not None:
            args += ["--embedded-redis", self.embedded.url]
        return args

    async def _start(self, worker: Worker) -> bool:
        """Start the worker's process and wait until it listens; False when it does not (gone, or left to a stop)."""
        loop = asyncio.get_running_loop()
        worker.started_at = time.monotonic()  # a start that fails at once counts as a quick death
        read_fd, write_fd = os.pipe()
        try:
            try:
                process = await asyncio.create_subprocess_exec(
                    *self._worker_args(worker, write_fd),
                    stdin=asyncio.subprocess.DEVNULL,
                    pass_fds=(write_fd,),
                    start_new_session=True,
                    preexec_fn=parent_death_signal(),
                )
            finally:
                os.close(write_fd)  # the worker holds the only write end: end of file means it exited
        except OSError as err:
            os.close(read_fd)
            logger.error("worker {} could not be started: {}", worker.index, err)
            return False
        worker.process, worker.started_at = process, time.monotonic()
        logger.info("worker {} started: pid {}", worker.index, process.pid)
        ready: asyncio.Future[bool] = loop.create_future()

        def readable() -> None:
            data = b""
            with contextlib.suppress(OSError):
                data = os.read(read_fd, 64)
            if not ready.done():
                ready.set_result(bool(data))

        loop.add_reader(read_fd, readable)
        stopping = asyncio.ensure_future(self._stopped())
        try:
            await asyncio.wait({ready, stopping}, timeout=START_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            loop.remove_reader(read_fd)
            os.close(read_fd)
        if ready.done() and ready.result():
            logger.info("worker {} (pid {}) is listening", worker.index, process.pid)
            return True
        if self._stopping.is_set():
            return False  # the stop that follows signals it
        if not ready.done():
            logger.error("worker {} (pid {}) did not listen within {:g} s: killing it", worker.index, process.pid, START_TIMEOUT)
            with contextlib.suppress(ProcessLookupError):
                process.kill()
        returncode = await process.wait()
        logger.error("worker {} (pid {}) exited at start with {}", worker.index, process.pid, describe_exit(returncode))
        return False

    async def _watch(self, worker: Worker) -> None:
        """Restart the worker whenever its process dies, waiting longer after each quick death."""
        while worker.process is not None:
            returncode = await worker.process.wait()
            if self._stopping.is_set():
                return
            lived = time.monotonic() - worker.started_at
            worker.failures = 1 if lived >= STABLE_AFTER else worker.failures + 1
            delay = restart_delay(worker.failures)
            logger.error(
                "worker {} (pid {}) exited unexpectedly with {} after {:.1f} s: starting a new one in {:g} s",
                worker.index,
                worker.process.pid,
                describe_exit(returncode),
                lived,
                delay,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            if self._stopping.is_set():
                return
            await self._start(worker)  # one that fails to start is seen dead at the top of the loop

    async def _stop_workers(self) -> bool:
        """SIGTERM every live worker, wait for their graceful shutdown, SIGKILL any left; True when all exited 0."""
        live = [worker for worker in self.workers if worker.alive]
        for worker in live:
            assert worker.process is not None
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(signal.SIGTERM)
        if not live:
            return True
        timeout = self.settings.shutdown_grace + STOP_MARGIN
        waits = {asyncio.ensure_future(worker.process.wait()): worker for worker in live if worker.process is not None}
        _, late = await asyncio.wait(waits, timeout=timeout)
        for task in late:
            worker = waits[task]
            logger.warning("worker {} (pid {}) still runs {:g} s after SIGTERM: killing it", worker.index, worker.pid, timeout)
            assert worker.process is not None
            with contextlib.suppress(ProcessLookupError):
                worker.process.kill()
        if late:
            await asyncio.wait(late)
        clean = not late
        for worker in live:
            assert worker.process is not None
            code = worker.process.returncode
            logger.info("worker {} (pid {}) stopped with {}", worker.index, worker.pid, describe_exit(code))
            clean = clean and code == 0
        return clean


def supervise(settings: Settings, loop: asyncio.AbstractEventLoop | None = None) -> int:
    """Run the supervisor on `loop` (a new asyncio loop when None) until it stops; its exit status."""
    configure_logging(settings)
    loop = loop or asyncio.new_event_loop()
    try:
        return loop.run_until_complete(Supervisor(settings).run())
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
