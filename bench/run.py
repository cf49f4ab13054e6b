"""`make bench`: this server beside its baselines and the Node peer, same double, same Redis, server on core 0 and the
load driver (the peer's load.js, the official socket.io-client) on core 1. Prints a table, writes bench/results/.

Covers: B1 idle memory (load.js idle mode), B2 closed-loop throughput (with OpenAI healthy and failing), B3 fixed
rates. Not yet: B4 streaming fan-out, B5 failover penalty, PNG plots.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEER_SRC = ROOT.parent / "shared" / "bench" / "node-peer"
RESULTS = ROOT / "bench" / "results"
PY = sys.executable


def wait_http(url: str, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer")


def control(double: str, body: dict) -> None:
    request = urllib.request.Request(double + "/_control/" + ("reset" if not body else "mode"),
                                     data=json.dumps(body).encode(), method="POST")
    urllib.request.urlopen(request, timeout=5).read()


def peer_dir() -> Path:
    """A writable copy of the Node peer with its modules installed."""
    target = Path(os.environ.get("PEER_DIR", "/tmp/support-chat-peer"))
    if not (target / "node_modules").exists():
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(PEER_SRC, target)
        for path in target.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=target, check=True)
    return target


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=int, default=12)
    parser.add_argument("--idle", default="1000,5000")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    peer = peer_dir()
    redis_bin = subprocess.check_output([PY, "-c", "from server.redis_backend import redis_server_binary as r; print(r())"],
                                        cwd=ROOT, text=True).strip()
    procs = [subprocess.Popen([redis_bin, "--port", "6390", "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL),
             subprocess.Popen([PY, "-m", "tests.fake_providers", "--port", "9001"], cwd=ROOT, stdout=subprocess.DEVNULL)]
    double = "http://127.0.0.1:9001"
    env = {**os.environ, "REDIS_URL": "redis://127.0.0.1:6390/0", "OPENAI_API_KEY": "sk-test",
           "OPENAI_BASE_URL": double + "/v1", "GEMINI_API_KEY": "g-test", "GEMINI_BASE_URL": double,
           "LOG_LEVEL": "WARNING", "HOST": "127.0.0.1", "SOCKETIO_MANAGER": "memory",
           "RATE_LIMIT_SESSIONS_PER_MINUTE": "0", "RATE_LIMIT_MESSAGES_PER_MINUTE": "0",
           "RATE_LIMIT_CONNECTIONS_PER_MINUTE": "0"}
    targets = {
        "this server": [PY, str(ROOT / "run.py")],
        "node peer": ["node", str(peer / "server.js")],
        "socketio echo": [PY, str(ROOT / "bench/baselines/socketio_echo.py")],
        "socketio echo + redis": [PY, str(ROOT / "bench/baselines/socketio_echo.py"), "--redis", env["REDIS_URL"]],
    }
    rows: list[dict] = []
    try:
        time.sleep(1)
        for port, (name, command) in enumerate(targets.items(), start=3301):
            command = [*command, "--port", str(port)] if "echo" in name else command
            server = subprocess.Popen(["taskset", "-c", "0", *command], cwd=ROOT, env={**env, "PORT": str(port)},
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                wait_http(f"http://127.0.0.1:{port}/api/v1/health")
                scenarios = [("B2 closed 100", ["--mode", "closed", "--sessions", "100"], None),
                             ("B2 closed 100, OpenAI 500", ["--mode", "closed", "--sessions", "100"],
                              {"provider": "openai", "mode": "status", "options": {"status": 500}}),
                             ("B3 rate 100", ["--mode", "rate", "--rate", "100", "--sessions", "50"], None),
                             ("B3 rate 500", ["--mode", "rate", "--rate", "500", "--sessions", "100"], None)]
                scenarios += [(f"B1 idle {n}", ["--mode", "idle", "--sockets", n], None) for n in args.idle.split(",") if n]
                for label, extra, mode in scenarios:
                    control(double, {})
                    if mode:
                        control(double, mode)
                    out = subprocess.run(["taskset", "-c", "1", "node", str(peer / "load.js"), "--url",
                                          f"http://127.0.0.1:{port}", "--duration", str(args.duration),
                                          "--server-pid", str(server.pid), "--tree", "0", *extra],
                                         capture_output=True, text=True, timeout=args.duration * 4 + 120)
                    line = next((ln for ln in reversed(out.stdout.splitlines()) if ln.startswith("{")), "{}")
                    rows.append({"target": name, "scenario": label, **json.loads(line)})
            finally:
                server.terminate()
                server.wait(timeout=30)
    finally:
        for proc in procs:
            proc.terminate()
    (RESULTS / "latest.json").write_text(json.dumps(rows, indent=1))
    header = ("scenario", "target", "replies/s", "p50 ms", "p99 ms", "cpu %", "rss MB", "KB/sock")
    print(f"{header[0]:28} {header[1]:24} " + " ".join(f"{h:>8}" for h in header[2:]))
    for row in rows:
        lat = row.get("latencyMs") or {}
        print(f"{row['scenario']:28} {row['target']:24} {row.get('repliesPerSec', row.get('sentRate', '-'))!s:>10} "
              f"{lat.get('p50', '-')!s:>8} {lat.get('p99', '-')!s:>8} {(row.get('cpuPct') or {}).get('server', '-')!s:>6} "
              f"{row.get('serverRssMB', row.get('serverRssAfterMB', '-'))!s:>7} {row.get('kbPerSocket', '-')!s:>8}")


if __name__ == "__main__":
    main()
