"""Process plumbing for the benchmarks: Redis and the provider double, targets pinned to core 0, drivers on core 1."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
DRIVERS = BENCH / "drivers"
RESULTS = BENCH / "results"
RAW = RESULTS / "raw"
LOGS = RESULTS / "logs"
PEER_SRC = ROOT.parent / "shared" / "bench" / "node-peer"
PY = sys.executable
REDIS_PORT = 6391
DOUBLE_PORT = 9002
SERVER_CORE = "0"
LOAD_CORE = "1"


@dataclass
class Target:
    """One server under test: how to start it on `port` and what it speaks."""

    name: str
    command: list[str]
    port: int
    protocol: str = "socketio"
    chat: bool = False
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """Base HTTP URL on loopback."""
        return f"http://127.0.0.1:{self.port}"


def _die_with_parent() -> None:
    """In a child before exec: get SIGTERM when the harness dies, so no server or double outlives a killed run."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def popen(command: list[str], **kwargs: Any) -> subprocess.Popen:
    """subprocess.Popen for a child that must not outlive the harness."""
    return subprocess.Popen(command, preexec_fn=_die_with_parent, **kwargs)


def raise_nofile() -> int:
    """Lift the soft open-files limit to the hard one (children inherit it); returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        new = 1_048_576 if hard == resource.RLIM_INFINITY else hard
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def wait_http(url: str, seconds: float = 30, proc: subprocess.Popen | None = None) -> None:
    """Poll `url` until it answers; fail early when `proc` exits."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {seconds:.0f} s")


def get_json(url: str) -> Any:
    """GET a JSON document."""
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def peer_dir() -> Path:
    """A writable copy of the Node peer with its modules installed (npm ci once)."""
    target = Path(os.environ.get("PEER_DIR", "/tmp/support-chat-peer"))
    if not (target / "node_modules").exists():
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(PEER_SRC, target)
        for path in target.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=target, check=True)
    return target


def stop(proc: subprocess.Popen, grace: float = 10) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


class Stack:
    """The shared back end every target uses: one redis-server and one provider double, on loopback."""

    def __init__(self, peer: Path) -> None:
        self.peer = peer
        self.double = f"http://127.0.0.1:{DOUBLE_PORT}"
        self.redis_url = f"redis://127.0.0.1:{REDIS_PORT}/0"
        self.procs: list[subprocess.Popen] = []
        LOGS.mkdir(parents=True, exist_ok=True)
        RAW.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        """Start redis-server and the double, and wait for both."""
        redis_bin = subprocess.check_output(
            [PY, "-c", "from server.storage.redis import redis_server_binary as r; print(r())"], cwd=ROOT, text=True
        ).strip()
        self.redis = popen([redis_bin, "--port", str(REDIS_PORT), "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
        self.double_log = (LOGS / "double.log").open("w")
        self.fake = popen(
            [PY, "-m", "devtools.provider_double", "--port", str(DOUBLE_PORT)],
            cwd=ROOT,
            stdout=self.double_log,
            stderr=subprocess.STDOUT,
        )
        self.procs = [self.redis, self.fake]
        wait_http(self.double + "/_control/requests", proc=self.fake)
        self.flush_redis()

    def close(self) -> None:
        """Stop what `start` started."""
        for proc in self.procs:
            stop(proc, 5)
        self.double_log.close()

    def flush_redis(self) -> None:
        """Empty Redis between targets."""
        import redis

        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis.from_url(self.redis_url).flushall()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def control(self, body: dict[str, Any] | None = None) -> None:
        """Reset the double, then apply one provider mode when given."""
        for path, payload in [("reset", {}), *([("mode", body)] if body else [])]:
            request = urllib.request.Request(
                f"{self.double}/_control/{path}",
                data=json.dumps(payload).encode(),
                method="POST",
                headers={"Content-Type": "application/json"},
            )
            urllib.request.urlopen(request, timeout=5).read()

    def env(self) -> dict[str, str]:
        """Environment shared by this server and the Node peer: same Redis, same double, limits off."""
        return {
            **os.environ,
            "REDIS_URL": self.redis_url,
            "OPENAI_API_KEY": "sk-test",
            "OPENAI_BASE_URL": self.double + "/v1",
            "GEMINI_API_KEY": "g-test",
            "GEMINI_BASE_URL": self.double,
            "LOG_LEVEL": "WARNING",
            "HOST": "127.0.0.1",
            "SOCKETIO_MANAGER": "memory",
            "SHUTDOWN_GRACE": "1",
            "RATE_LIMIT_SESSIONS_PER_MINUTE": "0",
            "RATE_LIMIT_MESSAGES_PER_MINUTE": "0",
            "RATE_LIMIT_CONNECTIONS_PER_MINUTE": "0",
            # 100 sessions from one address: the per-client cap on messages not yet stored (50 in one process)
            # would refuse half of the first burst, and a closed-loop session that was refused never sends again.
            "MAX_PENDING_PER_CLIENT": "0",
            "PEER_DIR": str(self.peer),
        }

    def extra_pids(self) -> str:
        """load.js --extra-pids value: the double's and Redis' CPU beside the server's."""
        return f"double:{self.fake.pid},redis:{self.redis.pid}"

    @contextlib.contextmanager
    def serving(
        self, target: Target, extra_env: dict[str, str] | None = None, tag: str = "", cores: str = SERVER_CORE
    ) -> Iterator[subprocess.Popen]:
        """Run `target` on the server core (or `cores`) until the block ends (fresh Redis, double reset)."""
        self.flush_redis()
        self.control()
        env = {**self.env(), **target.env, **(extra_env or {}), "PORT": str(target.port)}
        log = (LOGS / f"{slug(target.name)}{('-' + tag) if tag else ''}.log").open("w")
        proc = popen(["taskset", "-c", cores, *target.command], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_http(target.url + "/api/v1/health", proc=proc)
            time.sleep(0.5)
            yield proc
        finally:
            stop(proc)
            log.close()

    def drive(self, script: str, args: list[str], timeout: float, cores: str | None = LOAD_CORE) -> dict[str, Any]:
        """Run one driver (load.js, bench/drivers/*.mjs or *.py) on the load core (None: unpinned); its last JSON line."""
        path = self.peer / script if script == "load.js" else DRIVERS / script
        runtime = sys.executable if script.endswith(".py") else "node"
        try:
            out = subprocess.run(
                [*(["taskset", "-c", cores] if cores else []), runtime, str(path), *args],
                capture_output=True,
                preexec_fn=_die_with_parent,
                text=True,
                timeout=timeout,
                env={**os.environ, "PEER_DIR": str(self.peer)},
            )
        except subprocess.TimeoutExpired:
            return {"error": f"{script} timed out after {timeout:.0f} s"}
        line = next((ln for ln in reversed(out.stdout.splitlines()) if ln.startswith("{")), None)
        if line is None:
            return {"error": f"{script} exited {out.returncode}: {out.stderr.strip()[-400:]}"}
        return json.loads(line)


def slug(name: str) -> str:
    """A file-name-safe form of a target or scenario name."""
    return "".join(ch if ch.isalnum() else "-" for ch in name.lower()).strip("-").replace("--", "-")
