"""Where one reply's CPU goes: the server under cProfile for a B2 closed-loop run, reported per reply.

Timings under a profiler are inflated, but function calls per reply are exact and do not depend on a noisy
machine, so two checkouts compare reliably (`--baseline-tree`): a refactor that adds work per reply shows up as
more calls, and the functions where they are. Uses the bench stack (Redis on 6391, the provider double on 9002).

  python bench/profile_reply.py [--duration 5] [--baseline-tree DIR] [--top 25] [--mode ok|openai500]
"""

from __future__ import annotations

import argparse
import pstats
import tempfile
from pathlib import Path
from typing import Any

from harness import PY, ROOT, Stack, Target, peer_dir
from scenarios import OPENAI_500, load_js

PORT = 3311


def profile(stack: Stack, name: str, tree: Path, duration: int, mode: dict[str, Any] | None, out: Path) -> int:
    """Run one checkout under cProfile for one closed-loop run; returns the replies it served."""
    target = Target(name, [PY, "-m", "cProfile", "-o", str(out), str(tree / "run.py")], PORT, chat=True)
    with stack.serving(target, tag="profile") as proc:
        row = load_js(stack, target, proc.pid, "profile", 1, duration, ["--mode", "closed", "--sessions", "100"], mode)
    replies = row.get("measuredReplies") or round(row.get("repliesPerSec", 0) * duration)
    if not out.exists():
        raise SystemExit(f"{name}: the profiler wrote nothing (did the server exit cleanly?)")
    return int(replies)


def per_reply(path: Path, replies: int) -> tuple[float, list[tuple[str, float, float]]]:
    """Calls per reply overall, and every function by own time: (name, calls per reply, own µs per reply)."""
    stats: Any = pstats.Stats(str(path)).stats  # {(file, line, func): (prim calls, calls, tottime, cumtime, callers)}
    total_calls = sum(v[1] for v in stats.values())
    rows = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)
    named = [(f"{_package(k[0])} {k[2]}", v[1] / max(1, replies), v[2] / max(1, replies) * 1e6) for k, v in rows]
    return total_calls / max(1, replies), named


def _package(file: str) -> str:
    """A function's place without line numbers, comparable across checkouts: `server/chat/turns.py`, `redis/client.py`."""
    parts = Path(file).parts
    if "site-packages" in parts:
        return "/".join(parts[parts.index("site-packages") + 1 :])
    if "server" in parts:
        return "/".join(parts[parts.index("server") :])
    return Path(file).name


def call_differences(this: list[tuple[str, float, float]], base: list[tuple[str, float, float]], top: int) -> list[str]:
    """The functions whose calls per reply changed most between two checkouts (summed by module and name)."""
    mine: dict[str, float] = {}
    theirs: dict[str, float] = {}
    for table, rows in ((mine, this), (theirs, base)):
        for name, calls, _ in rows:
            table[name] = table.get(name, 0.0) + calls
    delta = {name: mine.get(name, 0.0) - theirs.get(name, 0.0) for name in {*mine, *theirs}}
    biggest = sorted(delta.items(), key=lambda kv: abs(kv[1]), reverse=True)[:top]
    return [f"  {name[:80]:80} {d:+10.1f}" for name, d in biggest]


def main() -> None:
    """Profile this checkout (and a baseline one) and print the per-reply tables."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--baseline-tree", default="")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--mode", choices=["ok", "openai500"], default="ok")
    args = parser.parse_args()
    mode = OPENAI_500 if args.mode == "openai500" else None
    trees = [("this server", ROOT)] + ([("baseline tree", Path(args.baseline_tree).resolve())] if args.baseline_tree else [])
    stack = Stack(peer_dir())
    stack.start()
    results = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for name, tree in trees:
                out = Path(tmp) / f"{name.replace(' ', '-')}.prof"
                replies = profile(stack, name, tree, args.duration, mode, out)
                results.append((name, replies, *per_reply(out, replies)))
    finally:
        stack.close()
    for name, replies, calls, top in results:
        print(f"\n{name}: {replies} replies, {calls:,.0f} function calls per reply")
        print(f"  {'function':70} {'calls/reply':>12} {'own µs/reply':>13}")
        for fn, n, us in top[: args.top]:
            print(f"  {fn[:70]:70} {n:12.1f} {us:13.1f}")
    if len(results) == 2:
        print(f"\ncalls per reply, this / baseline: {results[0][2] / results[1][2]:.3f}; the biggest differences:")
        print("\n".join(call_differences(results[0][3], results[1][3], args.top)))


if __name__ == "__main__":
    main()
