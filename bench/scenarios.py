"""The scenarios B1-B5; each returns raw rows `{target, scenario, rep, ...driver output}`."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from harness import LOAD_CORE, PY, RAW, ROOT, Stack, Target, get_json, slug

THIS = "this server"
THIS_SDK = "this server (sdk)"  # the same server with both providers on their SDK transports (OPENAI_CLIENT=sdk ...)
SDK_ENV = {"OPENAI_CLIENT": "sdk", "GEMINI_CLIENT": "sdk"}
BASELINE_TREE = "baseline tree"  # another checkout of this server (--baseline-tree), for regressions
PEER = "node peer"
ECHO = "socketio echo"
ECHO_REDIS = "socketio echo + redis"
WS_ECHO = "aiohttp ws echo"

OPENAI_500 = {"provider": "openai", "mode": "status", "options": {"status": 500}}
STREAMING = {"provider": "openai", "mode": "ok", "options": {"tokens": 300, "chunk_delay": 0.01}}
NO_COALESCING = {"STREAM_FLUSH_MS": "0", "STREAM_FLUSH_CHARS": "1"}  # reply_stream.py: flush_ms 0 flushes every delta
FIRST_TOKEN_TIMEOUT = 2.0
BREAKER_THRESHOLD = 3
B5_ENV = {
    **NO_COALESCING,
    "AI_FIRST_TOKEN_TIMEOUT": str(FIRST_TOKEN_TIMEOUT),
    "PROVIDER_FAILURE_THRESHOLD": str(BREAKER_THRESHOLD),
    "PROVIDER_COOLDOWN": "120",
}
B5_FAULTS: dict[str, tuple[dict[str, str], dict[str, Any] | None]] = {
    "healthy": ({}, None),
    # Gemini answering as if it were first: the baseline for "breaker open", when every answer comes from Gemini
    "fallback alone": ({"AI_PROVIDERS": "gemini,local"}, None),
    "refused": ({"OPENAI_BASE_URL": "http://127.0.0.1:9/v1"}, None),
    "status 500": ({}, OPENAI_500),
    "hang": ({}, {"provider": "openai", "mode": "hang"}),
}


def targets(peer_server: str, redis_url: str, baseline_tree: str = "") -> list[Target]:
    """Every server under test, each on its own port (an earlier checkout of this server too, when given)."""
    echo = ["-m", "bench.baselines.socketio_echo"]  # as a module from the repo root: it imports the server's middleware
    return [
        Target(THIS, [PY, "-m", "run"], 3301, chat=True),  # `-m run` with the repo root as cwd
        Target(THIS_SDK, [PY, "-m", "run"], 3307, chat=True, env=SDK_ENV),
        Target(PEER, ["node", peer_server], 3302, chat=True),
        Target(ECHO, [PY, *echo, "--port", "3303"], 3303),
        Target(ECHO_REDIS, [PY, *echo, "--port", "3304", "--redis", redis_url], 3304),
        Target(WS_ECHO, [PY, str(ROOT / "bench/baselines/aiohttp_ws_echo.py"), "--port", "3305"], 3305, protocol="ws"),
    ] + ([Target(BASELINE_TREE, [PY, str(Path(baseline_tree).resolve() / "run.py")], 3306, chat=True)] if baseline_tree else [])


def row(target: str, scenario: str, rep: int, out: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """One raw result row."""
    return {"target": target, "scenario": scenario, "rep": rep, **extra, **out}


def log(message: str) -> None:
    """Progress on stderr-like stdout, flushed."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def b1_idle(stack: Stack, target: Target, levels: list[int], concurrency: int) -> list[dict[str, Any]]:
    """B1: RSS at 0 and at each level of held connections (joined, for Socket.IO targets) and the join latency."""
    with stack.serving(target, tag="b1") as proc:
        out = stack.drive(
            "idle_join.mjs",
            [
                "--url",
                target.url,
                "--protocol",
                target.protocol,
                "--server-pid",
                str(proc.pid),
                "--levels",
                ",".join(map(str, levels)),
                "--concurrency",
                str(concurrency),
            ],
            timeout=120 + max(levels) / 20,
        )
    log(
        f"B1 {target.name}: "
        + ", ".join(f"{lv['open']} conns {lv['rssMB']} MB" for lv in out.get("levels", []))
        + (f" ERROR {out['error']}" if "error" in out else "")
    )
    return [row(target.name, "B1 idle", 1, out)]


def load_js(
    stack: Stack,
    target: Target,
    pid: int,
    scenario: str,
    rep: int,
    duration: int,
    extra: list[str],
    mode: dict[str, Any] | None = None,
    dump: bool = False,
    tree: bool = False,
    driver_cores: str | None = LOAD_CORE,
) -> dict[str, Any]:
    """One load.js run (B2/B3/B6) with the double in `mode` (`tree`: the server's CPU includes its child processes)."""
    stack.control(mode)
    args = [
        "--url",
        target.url,
        "--duration",
        str(duration),
        "--warmup",
        "2",
        "--server-pid",
        str(pid),
        "--tree",
        "1" if tree else "0",
        "--extra-pids",
        stack.extra_pids(),
        "--label",
        f"{target.name}: {scenario}",
        "--rep",
        str(rep),
        *extra,
    ]
    if dump:
        args += ["--dump-latencies", str(latency_dump(target.name, scenario, rep))]
    out = stack.drive("load.js", args, timeout=duration * 4 + 120, cores=driver_cores)
    stack.control()
    lat = out.get("latencyMs") or {}
    log(
        f"{scenario} {target.name} rep {rep}: {out.get('repliesPerSec', out.get('sentRate'))}/s "
        f"p50 {lat.get('p50')} p99 {lat.get('p99')} cpu {(out.get('cpuPct') or {}).get('server')}%"
        + (f" ERROR {out['error']}" if "error" in out else "")
    )
    return row(target.name, scenario, rep, out)


def latency_dump(target: str, scenario: str, rep: int) -> Any:
    """Where load.js writes the per-reply latencies of one B3 run."""
    return RAW / f"{slug(scenario)}-{slug(target)}-rep{rep}.txt"


def b2_b3(stack: Stack, target: Target, reps: int, duration: int) -> list[dict[str, Any]]:
    """B2 closed loop (healthy; OpenAI 500 for chat servers) and B3 fixed rates 100 and 500 msgs/s."""
    rows: list[dict[str, Any]] = []
    with stack.serving(target, tag="b2b3") as proc:
        closed = ["--mode", "closed", "--sessions", "100"]
        for rep in range(1, reps + 1):
            rows.append(load_js(stack, target, proc.pid, "B2 closed 100", rep, duration, closed))
            for rate, sessions in ((100, 50), (500, 100)):
                rate_args = ["--mode", "rate", "--rate", str(rate), "--sessions", str(sessions)]
                rows.append(load_js(stack, target, proc.pid, f"B3 rate {rate}", rep, duration, rate_args, dump=True))
        # The OpenAI-500 runs come last: afterwards this server's breaker keeps OpenAI out for its cooldown, which
        # would turn any healthy run after them into a Gemini run.
        if target.chat:
            for rep in range(1, reps + 1):
                rows.append(load_js(stack, target, proc.pid, "B2 closed 100, OpenAI 500", rep, duration, closed, OPENAI_500))
    return rows


def double_alone(stack: Stack, reps: int, duration: int) -> list[dict[str, Any]]:
    """B3's correction: the double's own time for the same requests at the same rates, with no chat server between."""
    rows = []
    stack.control()
    for rep in range(1, reps + 1):
        for rate in (100, 500):
            out = stack.drive(
                "double_rate.py",
                ["--url", stack.double, "--rate", str(rate), "--duration", str(duration)],
                timeout=duration * 3 + 60,
            )
            rows.append(row("provider double", f"B3 double alone, rate {rate}", rep, out))
    return rows
    return rows


def ws_echo_closed(stack: Stack, target: Target, reps: int, duration: int) -> list[dict[str, Any]]:
    """B2 for the raw WebSocket baseline: closed-loop echo, 100 connections."""
    rows = []
    with stack.serving(target, tag="b2") as proc:
        for rep in range(1, reps + 1):
            out = stack.drive(
                "ws_echo.mjs",
                ["--url", target.url, "--sessions", "100", "--duration", str(duration), "--server-pid", str(proc.pid)],
                timeout=duration * 3 + 60,
            )
            cpu = (out.get("cpuPct") or {}).get("server")
            log(f"B2 closed 100 {target.name} rep {rep}: {out.get('repliesPerSec')}/s cpu {cpu}%")
            rows.append(row(target.name, "B2 closed 100", rep, out))
    return rows


def b4_stream(stack: Stack, target: Target, reps: int, duration: int) -> list[dict[str, Any]]:
    """B4: 100 concurrent streams at ~100 tokens/s, with the default coalescing and without it."""
    rows = []
    for scenario, env in [("B4 streams, coalescing", {}), ("B4 streams, no coalescing", NO_COALESCING)]:
        with stack.serving(target, env, tag=slug(scenario)) as proc:
            for rep in range(1, reps + 1):
                stack.control(STREAMING)
                out = stack.drive(
                    "stream_load.mjs",
                    [
                        "--url",
                        target.url,
                        "--sessions",
                        "100",
                        "--duration",
                        str(duration),
                        "--warmup",
                        "3",
                        "--server-pid",
                        str(proc.pid),
                    ],
                    timeout=duration * 3 + 90,
                )
                stack.control()
                log(
                    f"{scenario} rep {rep}: {out.get('chunkEventsPerSec')} chunks/s, "
                    f"{out.get('chunkEventsPerSecPerStream')} per stream, "
                    f"cpu {(out.get('cpuPct') or {}).get('server')}%" + (f" ERROR {out['error']}" if "error" in out else "")
                )
                rows.append(row(target.name, scenario, rep, out, env=env, doubleMode=STREAMING))
    return rows


def b5_failover(stack: Stack, target: Target, requests: int = 40) -> list[dict[str, Any]]:
    """B5: time to first token with the primary healthy, refusing, answering 500, hanging; fresh server for each."""
    rows = []
    for fault, (env, mode) in B5_FAULTS.items():
        healthy = fault in ("healthy", "fallback alone")
        count = 1 + requests if healthy else BREAKER_THRESHOLD + requests
        with stack.serving(target, {**B5_ENV, **env}, tag=f"b5-{slug(fault)}"):
            stack.control(mode)
            out = stack.drive("ttft.mjs", ["--url", target.url, "--requests", str(count)], timeout=count * 5 + 60)
            try:
                health = get_json(target.url + "/api/v1/health")
                breaker = next((p.get("state") for p in health.get("providers", []) if p.get("name") == "openai"), None)
            except (OSError, ValueError):
                breaker = None
            stack.control()
        ttfts = [r.get("ttftMs") for r in out.get("requests", [])]
        skip = 1 if healthy else BREAKER_THRESHOLD
        steady = [t for t in ttfts[skip:] if t is not None]
        summary = {
            "firstMs": ttfts[0] if ttfts else None,
            "steadyMedianMs": statistics.median(steady) if steady else None,
            "steadyN": len(steady),
            "openaiBreakerAfter": breaker,
            "providers": sorted({str(r.get("provider")) for r in out.get("requests", [])[skip:]}),
        }
        log(
            f"B5 {fault}: first {summary['firstMs']} ms, steady median {summary['steadyMedianMs']} ms, breaker {breaker}"
            + (f" ERROR {out['error']}" if "error" in out else "")
        )
        rows.append(row(target.name, f"B5 {fault}", 1, out, env={**B5_ENV, **env}, doubleMode=mode, **summary))
    return rows


B6_CORES = "0,1"  # the server's processes may use both cores; the load driver, Redis and the double are not pinned
# B6 runs: the default single process (in-memory Socket.IO manager, as in B2), the same process with the Redis manager
# every worker needs, and WORKERS=2 (a supervisor and two workers on one port).
B6_RUNS = {
    "B6 closed 100, 1 process": {"WORKERS": "1"},
    "B6 closed 100, 1 process, redis manager": {"WORKERS": "1", "SOCKETIO_MANAGER": "auto"},
    "B6 closed 100, 2 workers": {"WORKERS": "2", "SOCKETIO_MANAGER": "auto"},
}


def b6_workers(stack: Stack, target: Target, reps: int, duration: int) -> list[dict[str, Any]]:
    """B6: B2's closed loop against one process and against WORKERS=2, on both cores, the driver sharing them.

    The configurations take turns in each round (a fresh server each time), so a slower spell of the shared machine
    falls on all of them; the server's CPU counts the supervisor and its workers (load.js --tree 1).
    """
    rows = []
    closed = ["--mode", "closed", "--sessions", "100"]
    for rep in range(1, reps + 1):
        for scenario, env in B6_RUNS.items():
            with stack.serving(target, env, tag=slug(scenario), cores=B6_CORES) as proc:
                out = load_js(stack, target, proc.pid, scenario, rep, duration, closed, tree=True, driver_cores=None)
                rows.append({**out, "env": env, "serverCores": B6_CORES, "driverCores": "any"})
    return rows
