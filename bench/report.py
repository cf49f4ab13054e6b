"""From raw rows to the summary: medians over repetitions, each figure beside its baselines and target."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

from scenarios import B6_RUNS, BASELINE_TREE, ECHO, ECHO_REDIS, FIRST_TOKEN_TIMEOUT, PEER, THIS, THIS_SDK, WS_ECHO

COLUMNS = [THIS, THIS_SDK, BASELINE_TREE, PEER, ECHO, ECHO_REDIS, WS_ECHO, "own baseline"]
SERVERS = [THIS, THIS_SDK, BASELINE_TREE, PEER, ECHO, ECHO_REDIS, WS_ECHO]
Getter = Callable[[dict[str, Any]], float | None]


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def median(rows: list[dict[str, Any]], target: str, scenario: str, get: Getter) -> float | None:
    """Median over repetitions of one figure; None when no run produced it."""
    values = []
    for r in rows:
        if r["target"] == target and r["scenario"] == scenario and "error" not in r:
            try:
                value = _num(get(r))
            except (KeyError, TypeError, IndexError, ZeroDivisionError):
                value = None
            if value is not None:
                values.append(value)
    return statistics.median(values) if values else None


def lat(key: str) -> Getter:
    """A latency percentile of a load.js row."""
    return lambda r: r["latencyMs"][key]


def cpu_ms_per_reply(r: dict[str, Any]) -> float | None:
    """Server CPU per reply: cpu% × duration / replies."""
    return r["cpuPct"]["server"] / 100 * 1000 / r["repliesPerSec"]


def level(count: int, key: str) -> Getter:
    """A figure of one B1 level."""
    return lambda r: next(lv[key] for lv in r["levels"] if lv["requested"] == count)


def summarize(rows: list[dict[str, Any]], levels: list[int], concurrency: int) -> list[dict[str, Any]]:
    """The table's lines: {metric, values{column: number}, target, pass}."""
    lines: list[dict[str, Any]] = []

    def add(metric: str, values: dict[str, float | None], target: str = "", ok: bool | None = None, digits: int = 1) -> None:
        lines.append({"metric": metric, "values": values, "target": target, "pass": ok, "digits": digits})

    def across(scenario: str, get: Getter, names: list[str] = SERVERS) -> dict[str, float | None]:
        return {name: median(rows, name, scenario, get) for name in names}

    # B1 idle memory and join latency
    top = max(levels)
    add("B1 RSS MB, 0 connections", across("B1 idle", lambda r: r["baseRssMB"]))
    for count in levels:
        add(f"B1 RSS MB, {count} connections", across("B1 idle", level(count, "rssMB")))
    kb = across("B1 idle", level(top, "kbPerConnection"))
    echo_kb = kb.get(ECHO)  # the bare echo refuses compression, as this server does by default
    limit = 1.5 * echo_kb if echo_kb else 45.0
    add(
        f"B1 KB per connection at {top}",
        kb,
        f"≤ 1.5× echo = {limit:.0f}" if echo_kb else "≤ 45",
        _le(kb[THIS], limit),
    )
    held = across("B1 idle", level(top, "open"))
    add(f"B1 connections held of {top}", held, f"= {top}", None if held[THIS] is None else held[THIS] >= top, 0)
    join = across("B1 idle", lambda r: r["joinMs"]["p99"], [s for s in SERVERS if s != WS_ECHO])
    add(f"B1 join ack p99 ms ({concurrency} in flight)", join, "< 250", _lt(join[THIS], 250))

    # B2 closed loop
    for scenario, label in [("B2 closed 100", "B2 closed 100"), ("B2 closed 100, OpenAI 500", "B2 OpenAI 500 → Gemini")]:
        rps = across(scenario, lambda r: r["repliesPerSec"])
        peer = rps.get(PEER)
        # A message refused or never answered stops its closed-loop session for the rest of the run: the figure
        # would then measure fewer sessions than the peer's. Such a run fails, whatever its rate.
        lost = across(scenario, lambda r: r.get("lostAfterGrace") or 0)
        ok = None if rps[THIS] is None else rps[THIS] >= 500 and (peer is None or rps[THIS] > peer) and not lost.get(THIS)
        add(f"{label}: replies/s", rps, "≥ 500 and > peer, none lost", ok, 0)
        add(f"{label}: messages unanswered", lost, "", None, 0)
        add(f"{label}: p50 ms", across(scenario, lat("p50")))
        add(f"{label}: p99 ms", across(scenario, lat("p99")))
        add(f"{label}: server CPU ms/reply", across(scenario, cpu_ms_per_reply), digits=2)

    # B3 fixed rates; the target is on the server-added time: end to end less the double's own median at that rate
    for rate, limit in [(100, 10), (500, 25)]:
        scenario = f"B3 rate {rate}"
        double_p50 = median(rows, "provider double", f"B3 double alone, rate {rate}", lat("p50"))
        add(f"{scenario}: p50 ms", across(scenario, lat("p50")), digits=2)
        add(f"{scenario}: p95 ms", across(scenario, lat("p95")), digits=2)
        add(f"{scenario}: p99 ms", across(scenario, lat("p99")), digits=2)
        add(f"{scenario}: the double's own p50 ms", {THIS: double_p50}, digits=2)
        p99 = across(scenario, lat("p99"))
        added = {k: (None if v is None or double_p50 is None else v - double_p50) for k, v in p99.items()}
        lost = across(scenario, lambda r: r["measuredSent"] - r["measuredReplies"])
        ok = _le(added[THIS], limit)
        if ok is not None:
            ok = ok and (added.get(PEER) is None or added[THIS] < added[PEER]) and not lost.get(THIS)
        add(f"{scenario}: server-added p99 ms", added, f"≤ {limit} and < peer, none lost", ok, 2)
        add(f"{scenario}: replies missing", lost, "", None, 0)
        add(f"{scenario}: server CPU %", across(scenario, lambda r: r["cpuPct"]["server"]))

    # B4 streaming fan-out: this server, its own baseline is the same server without coalescing
    def b4(get: Getter) -> dict[str, float | None]:
        return {
            THIS: median(rows, THIS, "B4 streams, coalescing", get),
            "own baseline": median(rows, THIS, "B4 streams, no coalescing", get),
        }

    add("B4 chunk events/s, total (baseline: no coalescing)", b4(lambda r: r["chunkEventsPerSec"]), digits=0)
    per = b4(lambda r: r["chunkEventsPerSecPerStream"])
    add("B4 chunk events/s per stream", per, "≤ 25", _le(per[THIS], 25))
    cpu = b4(lambda r: r["cpuPct"]["server"])
    add("B4 server CPU %", cpu, "< 50", _lt(cpu[THIS], 50))
    add("B4 streamed chars/s per stream", b4(lambda r: r["charsPerSecPerStream"]), digits=0)
    add("B4 answers completed/s", b4(lambda r: r["repliesPerSec"]))

    # B5 failover penalty: this server. The first request is measured against a healthy primary's first request;
    # with the breaker open every answer is Gemini's, so the baseline there is Gemini answering as the first provider.
    healthy_first = median(rows, THIS, "B5 healthy", lambda r: r["firstMs"])
    healthy_steady = median(rows, THIS, "B5 healthy", lambda r: r["steadyMedianMs"])
    fallback_steady = median(rows, THIS, "B5 fallback alone", lambda r: r["steadyMedianMs"])
    add("B5 TTFT ms, healthy: first request", {THIS: healthy_first}, digits=2)
    add("B5 TTFT ms, healthy: median", {THIS: healthy_steady}, digits=2)
    add("B5 TTFT ms, Gemini as first provider: median", {THIS: fallback_steady}, digits=2)
    first_limits = {"refused": 20.0}
    for fault in ("refused", "status 500", "hang"):
        first = median(rows, THIS, f"B5 {fault}", lambda r: r["firstMs"])
        steady = median(rows, THIS, f"B5 {fault}", lambda r: r["steadyMedianMs"])
        breaker = next((r.get("openaiBreakerAfter") for r in rows if r["scenario"] == f"B5 {fault}"), None)
        pen_first = None if first is None or healthy_first is None else first - healthy_first
        pen_open = None if steady is None or fallback_steady is None else steady - fallback_steady
        limit = first_limits.get(fault)
        note = f" (first-token timeout {FIRST_TOKEN_TIMEOUT:g} s)" if fault == "hang" else ""
        add(
            f"B5 {fault}: extra TTFT ms, first request{note}",
            {THIS: pen_first, "own baseline": healthy_first},
            f"< {limit:g}" if limit else "",
            _lt(pen_first, limit) if limit else None,
            2,
        )
        ok = _lt(pen_open, 5)
        if ok is not None and breaker != "open":
            ok = False
        add(
            f"B5 {fault}: extra TTFT ms, breaker {breaker or '?'} (median, vs Gemini first)",
            {THIS: pen_open, "own baseline": fallback_steady},
            "< 5",
            ok,
            2,
        )
    # B6 every core: B2's closed loop, one process vs WORKERS=2; server on cores 0-1, the driver sharing them (unpinned)
    b6 = {scenario: median(rows, THIS, scenario, lambda r: r["repliesPerSec"]) for scenario in B6_RUNS}
    one, one_redis, two = b6.values()
    for scenario, value in b6.items():
        label = scenario.removeprefix("B6 closed 100, ")
        add(f"B6 replies/s, {label} (cores 0-1 shared with the driver)", {THIS: value}, digits=0)
        cpu = median(rows, THIS, scenario, cpu_ms_per_reply)
        add(f"B6 server CPU ms/reply, {label} (all its processes)", {THIS: cpu}, digits=2)
    ratio = None if one is None or two is None else two / one
    add("B6 replies/s, 2 workers vs 1 process", {THIS: ratio}, "≥ 1.8", _le(1.8, ratio) if ratio is not None else None, 2)
    same_manager = None if one_redis is None or two is None else two / one_redis
    add("B6 replies/s, 2 workers vs 1 process on the Redis manager", {THIS: same_manager}, digits=2)
    return [ln for ln in lines if any(v is not None for v in ln["values"].values())]


def _le(value: float | None, limit: float) -> bool | None:
    return None if value is None else value <= limit


def _lt(value: float | None, limit: float) -> bool | None:
    return None if value is None else value < limit


def _cell(value: float | None, digits: int) -> str:
    if value is None:
        return "—"
    return f"{value:,.{digits}f}" if digits else f"{value:,.0f}"


def _verdict(ok: bool | None) -> str:
    return "" if ok is None else ("PASS" if ok else "FAIL")


def text_table(lines: list[dict[str, Any]]) -> str:
    """The table for the terminal."""
    header = ["figure", *COLUMNS, "target", "result"]
    body = [
        [ln["metric"], *(_cell(ln["values"].get(c), ln["digits"]) for c in COLUMNS), ln["target"], _verdict(ln["pass"])]
        for ln in lines
    ]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def fmt(cells: list[str]) -> str:
        last = len(cells) - 2
        return "  ".join(c.ljust(w) if i in (0, last) else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
    out = [fmt(header), rule]
    previous = ""
    for r, ln in zip(body, lines, strict=True):
        if previous and ln["metric"][:2] != previous:
            out.append("")
        previous = ln["metric"][:2]
        out.append(fmt(r))
    return "\n".join(out)


def markdown_table(lines: list[dict[str, Any]]) -> str:
    """The same table in Markdown, for docs/performance.md."""
    header = ["figure", *COLUMNS, "target", "result"]
    out = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * len(COLUMNS) + "---|---|"]
    for ln in lines:
        cells = [ln["metric"], *(_cell(ln["values"].get(c), ln["digits"]) for c in COLUMNS), ln["target"], _verdict(ln["pass"])]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)
