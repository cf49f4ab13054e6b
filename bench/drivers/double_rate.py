"""B3's correction: the provider double's own time at a fixed rate, with no chat server in between.

Sends streaming Chat Completions requests like the chat servers' (a system prompt and the load driver's message text)
straight to the double at --rate per second, over aiohttp like this server's openai client, and times each from its
scheduled send to the end of the streamed body. Prints one JSON line with the latency summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import aiohttp


def percentiles(values: list[float]) -> dict[str, float | int | None]:
    """n, p50/p95/p99/max and mean in ms, like the node drivers' summary()."""
    ordered = sorted(values)

    def pct(p: float) -> float | None:
        if not ordered:
            return None
        return round(ordered[min(len(ordered) - 1, max(0, -(-int(p * len(ordered)) // 100) - 1))], 2)

    mean = round(sum(ordered) / len(ordered), 2) if ordered else None
    return {"n": len(ordered), "p50": pct(50), "p95": pct(95), "p99": pct(99), "max": pct(100), "mean": mean}


async def run(url: str, rate: float, duration: float, warmup: float) -> dict[str, object]:
    """Offer `rate` requests/s for warmup + duration seconds; latencies after the warm-up only."""
    latencies: list[float] = []
    errors = 0
    start = time.perf_counter()

    async def one(session: aiohttp.ClientSession, n: int, scheduled: float) -> None:
        nonlocal errors
        body = {
            "model": "gpt-4o-mini",
            "stream": True,
            "stream_options": {"include_usage": True},
            "logprobs": True,
            "messages": [
                {"role": "system", "content": "You are a helpful support assistant."},
                {"role": "user", "content": f"[m{n}] hello {'x' * 32}"},
            ],
        }
        try:
            async with session.post(url, json=body, headers={"Authorization": "Bearer sk-test"}) as response:
                await response.read()
        except aiohttp.ClientError:
            errors += 1
            return
        if scheduled - start >= warmup:
            latencies.append((time.perf_counter() - scheduled) * 1000)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1000)) as session:
        tasks = []
        sent = 0
        total = int((warmup + duration) * rate)
        while sent < total:
            scheduled = start + sent / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(session, sent, scheduled)))
            sent += 1
        await asyncio.gather(*tasks)
    return {"driver": "double_rate", "url": url, "rate": rate, "latencyMs": percentiles(latencies), "errors": errors}


def main() -> None:
    """Command line: --url (the double) --rate --duration --warmup."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:9002")
    parser.add_argument("--rate", type=float, default=100)
    parser.add_argument("--duration", type=float, default=8)
    parser.add_argument("--warmup", type=float, default=2)
    args = parser.parse_args()
    out = asyncio.run(run(args.url.rstrip("/") + "/v1/chat/completions", args.rate, args.duration, args.warmup))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
