"""The per-minute limits: which address they apply to (X-Forwarded-For only from a trusted proxy), what a client
over a limit is told, and that a Redis outage never stops conversations."""

from __future__ import annotations

from typing import Any, cast

import pytest
import redis

from server.errors import ApiError
from server.web.rate_limits import RateLimits


class FakeCounters:
    """Stands in for the Redis counters: answers every check with `wait` (seconds over the limit, None if under)."""

    def __init__(self, wait: float | None = None, down: bool = False) -> None:
        self.wait = wait
        self.down = down
        self.checked: list[tuple[str, str, int]] = []

    async def over_limit(self, bucket: object, owner: str, limit: int) -> float | None:
        """Record the check; Redis's own ConnectionError when down."""
        self.checked.append((str(bucket), owner, limit))
        if self.down:
            raise redis.exceptions.ConnectionError("Redis is down")
        return self.wait


def limits(*trusted: str, counters: FakeCounters | None = None) -> RateLimits:
    """Limits trusting `trusted` proxies, over fake counters."""
    return RateLimits(
        cast(Any, counters or FakeCounters()),
        sessions_per_minute=3,
        messages_per_minute=5,
        connections_per_minute=7,
        events_per_minute=9,
        trusted_proxies=trusted,
    )


def test_without_trusted_proxies_the_header_is_ignored() -> None:
    assert limits().client_ip("203.0.113.9", "10.0.0.1") == "203.0.113.9"


def test_a_spoofed_header_from_an_untrusted_peer_is_ignored() -> None:
    assert limits("10.0.0.0/8").client_ip("203.0.113.9", "198.51.100.7") == "203.0.113.9"


def test_behind_a_trusted_proxy_the_client_is_the_last_untrusted_hop() -> None:
    proxies = limits("10.0.0.0/8", "127.0.0.1")
    # The client may prepend anything; only the hops our proxies appended are believed, right to left.
    assert proxies.client_ip("127.0.0.1", "1.2.3.4, 198.51.100.7, 10.0.0.2") == "198.51.100.7"
    assert proxies.client_ip("10.1.2.3", "198.51.100.7") == "198.51.100.7"


def test_whitespace_and_empty_hops_are_skipped() -> None:
    assert limits("127.0.0.1/32").client_ip("127.0.0.1", " ,  198.51.100.7 ,, ") == "198.51.100.7"


def test_when_every_hop_is_trusted_the_first_one_is_the_client() -> None:
    assert limits("10.0.0.0/8").client_ip("10.0.0.1", "10.0.0.5, 10.0.0.6") == "10.0.0.5"


def test_a_header_of_only_separators_leaves_the_peer() -> None:
    assert limits("10.0.0.0/8").client_ip("10.0.0.1", " , ,") == "10.0.0.1"


def test_a_garbage_hop_is_never_trusted_so_it_is_what_limits_apply_to() -> None:
    assert limits("10.0.0.0/8").client_ip("10.0.0.1", "198.51.100.7, not-an-ip") == "not-an-ip"


def test_ipv6_proxies_and_clients() -> None:
    proxies = limits("::1", "fd00::/8")
    assert proxies.client_ip("::1", "2001:db8::7, fd00::1") == "2001:db8::7"
    assert proxies.client_ip("2001:db8::9", "2001:db8::7") == "2001:db8::9"


@pytest.mark.parametrize("peer", [None, ""])
def test_an_unknown_peer_is_reported_as_unknown_and_never_trusted(peer: str | None) -> None:
    assert limits("0.0.0.0/0").client_ip(peer, "198.51.100.7") == "unknown"


def test_a_missing_header_leaves_the_peer() -> None:
    assert limits("127.0.0.1").client_ip("127.0.0.1", None) == "127.0.0.1"
    assert limits("127.0.0.1").client_ip("127.0.0.1", "") == "127.0.0.1"


# --- the limits themselves ------------------------------------------------------------------------------------


async def test_under_every_limit_nothing_is_raised_and_each_check_counts_its_own_bucket() -> None:
    counters = FakeCounters(wait=None)
    subject = limits(counters=counters)
    await subject.check_session_creation("198.51.100.7")
    await subject.check_message("s-1")
    await subject.check_event("s-1")
    await subject.check_connection("198.51.100.7")
    assert counters.checked == [
        ("sessions", "198.51.100.7", 3),
        ("messages", "s-1", 5),
        ("events", "s-1", 9),
        ("connections", "198.51.100.7", 7),
    ]


@pytest.mark.parametrize(
    ("check", "owner", "words"),
    [
        ("check_session_creation", "198.51.100.7", "Too many new conversations"),
        ("check_message", "s-1", "Too many messages"),
        ("check_event", "s-1", "Too many requests"),
        ("check_connection", "198.51.100.7", "Too many connections"),
    ],
)
async def test_over_a_limit_the_client_is_told_rate_limited_and_when_to_retry(check: str, owner: str, words: str) -> None:
    subject = limits(counters=FakeCounters(wait=41.6))
    with pytest.raises(ApiError) as refused:
        await getattr(subject, check)(owner)
    assert refused.value.code == "rate_limited" and refused.value.status == 429
    assert refused.value.retry_after == 41.6
    assert refused.value.message == f"{words}; try again in 42 s."


async def test_a_redis_outage_lets_everyone_through() -> None:
    subject = limits(counters=FakeCounters(down=True))
    await subject.check_session_creation("198.51.100.7")
    await subject.check_message("s-1")
    await subject.check_connection("198.51.100.7")
