"""`make bench`: this server beside its baselines and the Node peer, in one run, on loopback.

Every server under test runs alone on core 0 (taskset); the load drivers run on core 1: the peer's load.js (the
official socket.io-client) for B2/B3, bench/drivers/*.mjs for the rest. One redis-server (port 6391) and one provider
double (devtools.provider_double, port 9002) serve every target.

  B1 idle memory and join latency     bench/drivers/idle_join.mjs  (all targets)
  B2 closed-loop throughput           load.js closed / drivers/ws_echo.mjs (raw WebSocket baseline)
  B3 latency at fixed rates           load.js rate
  B4 streaming fan-out                bench/drivers/stream_load.mjs (this server, coalescing on and off)
  B5 failover penalty                 bench/drivers/ttft.mjs (this server, fresh server per fault)
  B6 every core (WORKERS)             load.js closed: one process vs WORKERS=2, the server on cores 0-1 and the
                                      driver, Redis and the double unpinned (they share the two cores)

Prints one table, writes bench/results/latest.json (raw rows + summary), latest.md and the PNG plots.
Usage: python bench/run.py [--duration 8] [--reps 1] [--idle 1000,5000,10000] [--only B1,B2,B3,B4,B5,B6] [--targets ...]
       [--baseline-tree DIR]  (an earlier checkout, e.g. `git worktree add /tmp/base HEAD~1`, measured in the same rounds)
"""

from __future__ import annotations

import argparse
import json
import platform
import signal
import sys
import time
from typing import Any

from harness import RAW, RESULTS, Stack, peer_dir, raise_nofile
from plots import plot_all
from report import markdown_table, summarize, text_table
from scenarios import (
    THIS,
    WS_ECHO,
    b1_idle,
    b2_b3,
    b4_stream,
    b5_failover,
    b6_workers,
    double_alone,
    log,
    targets,
    ws_echo_closed,
)


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=8, help="measured seconds per B2/B3/B4 run (plus warm-up)")
    parser.add_argument("--reps", type=int, default=1, help="repetitions of B2/B3/B4; the table shows medians")
    parser.add_argument("--idle", default="1000,5000,10000", help="B1 connection levels (cumulative)")
    parser.add_argument("--join-concurrency", type=int, default=50, help="B1 connects+joins in flight")
    parser.add_argument("--only", default="B1,B2,B3,B4,B5,B6", help="scenarios to run (B2 and B3 run together)")
    parser.add_argument("--targets", default="", help="comma-separated target names (default: all)")
    parser.add_argument("--baseline-tree", default="", help="another checkout of this server, run beside it (regressions)")
    return parser.parse_args()


def main() -> None:
    """Run the scenarios, print the table, write the results."""
    args = parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up servers and drivers when terminated
    started = time.monotonic()
    only = {s.strip().upper() for s in args.only.split(",")}
    levels = sorted(int(n) for n in args.idle.split(",") if n.strip())
    nofile = raise_nofile()
    if levels and nofile < max(levels) + 100:
        log(f"open-files limit {nofile} is too low for {max(levels)} connections; B1 capped")
        levels = [n for n in levels if n + 100 <= nofile] or [nofile - 100]
    RESULTS.mkdir(parents=True, exist_ok=True)
    RAW.mkdir(parents=True, exist_ok=True)
    for old in RAW.glob("*.txt"):
        old.unlink()
    peer = peer_dir()
    stack = Stack(peer)
    all_targets = targets(str(peer / "server.js"), stack.redis_url, args.baseline_tree)
    wanted = {t.strip() for t in args.targets.split(",") if t.strip()}
    chosen = [t for t in all_targets if not wanted or t.name in wanted]
    rows: list[dict[str, Any]] = []

    def attempt(what: str, fn: Any, *fn_args: Any) -> None:
        try:
            rows.extend(fn(*fn_args))
        except Exception as err:  # one target failing to start must not lose the others' figures
            log(f"{what} failed: {err}")
            rows.append({"target": what, "scenario": "error", "rep": 0, "error": str(err)})

    stack.start()
    try:
        for target in chosen:
            if "B1" in only and levels:
                attempt(f"{target.name} B1", b1_idle, stack, target, levels, args.join_concurrency)
            if "B2" in only or "B3" in only:
                if target.name == WS_ECHO:
                    attempt(f"{target.name} B2", ws_echo_closed, stack, target, args.reps, args.duration)
                else:
                    attempt(f"{target.name} B2/B3", b2_b3, stack, target, args.reps, args.duration)
        if "B3" in only:
            attempt("provider double B3", double_alone, stack, args.reps, args.duration)
        this = next((t for t in chosen if t.name == THIS), None)
        if this is not None and "B4" in only:
            attempt("B4", b4_stream, stack, this, args.reps, args.duration)
        if this is not None and "B5" in only:
            attempt("B5", b5_failover, stack, this)
        if this is not None and "B6" in only:
            attempt("B6", b6_workers, stack, this, args.reps, args.duration)
    finally:
        stack.close()

    lines = summarize(rows, levels or [0], args.join_concurrency)
    wall = round(time.monotonic() - started, 1)
    meta = {
        "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "wallSeconds": wall,
        "duration": args.duration,
        "reps": args.reps,
        "idleLevels": levels,
        "joinConcurrency": args.join_concurrency,
        "host": platform.node(),
        "python": platform.python_version(),
        "cores": {"server": 0, "load": 1, "b6": {"server": "0,1", "load": "any"}},
    }
    # Only a full run replaces the figures docs/performance.md shows; a partial one (--only, --targets) goes beside them.
    name = "latest" if only >= {"B1", "B2", "B3", "B4", "B5"} and not wanted and not args.baseline_tree else "partial"
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "summary": lines, "rows": rows}, indent=1))
    md = markdown_table(lines)
    (RESULTS / f"{name}.md").write_text(
        f"`make bench` ({meta['at']}, {args.duration} s per run, median of {args.reps}, server on core 0, load on core 1; "
        "B6: the server's processes on cores 0-1, the load driver unpinned, sharing them)\n\n"
        f"{md}\n"
    )
    pngs = plot_all(rows) if name == "latest" else []
    print()
    print(text_table(lines))
    print()
    print(f"wrote {RESULTS / (name + '.json')}, {RESULTS / (name + '.md')}" + "".join(f", {p}" for p in pngs))
    print(f"wall time {wall:.0f} s")


if __name__ == "__main__":
    main()
