"""WORKERS parsing, a worker's settings and the supervisor's small decisions (backoff, exit names, port check)."""

from __future__ import annotations

import os
import socket

import pytest

from server.__main__ import parse_args, worker_settings
from server.settings import Settings, available_cpus, parse_workers
from server.supervisor import BACKOFF_FIRST, BACKOFF_MAX, describe_exit, port_problem, restart_delay


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """An empty environment to set variables on."""
    for name in list(os.environ):
        monkeypatch.delenv(name)
    return monkeypatch


def test_workers_default_to_one_process(env: pytest.MonkeyPatch) -> None:
    assert Settings.from_env(None).workers == 1


@pytest.mark.parametrize(("raw", "expected"), [("1", 1), ("4", 4), (" 2 ", 2), ("", 1), ("auto", None), ("AUTO", None)])
def test_workers_is_a_count_or_auto(env: pytest.MonkeyPatch, raw: str, expected: int | None) -> None:
    env.setenv("WORKERS", raw)
    assert Settings.from_env(None).workers == (expected or available_cpus())


def test_auto_is_the_cpus_this_process_may_use() -> None:
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert parse_workers("auto") == allowed >= 1


@pytest.mark.parametrize("raw", ["0", "-2", "two", "1.5"])
def test_a_wrong_workers_value_stops_the_start(raw: str) -> None:
    with pytest.raises(ValueError, match="WORKERS"):
        parse_workers(raw)


def test_a_worker_on_the_supervisors_embedded_redis_is_scaled_out_and_says_embedded() -> None:
    settings = worker_settings(Settings(workers=2), "unix:///data/redis.sock")
    assert settings.workers == 1 and settings.redis_url == "unix:///data/redis.sock"
    assert settings.redis_mode == "embedded" and settings.scaled_out and settings.chat.cross_process_order


def test_a_worker_on_the_operators_redis_keeps_it() -> None:
    settings = worker_settings(Settings(workers=2, redis_url="redis://db:6379/0"), None)
    assert settings.workers == 1 and settings.redis_url == "redis://db:6379/0" and settings.redis_mode == "external"


def test_a_server_started_by_hand_takes_no_options() -> None:
    options = parse_args([])
    assert options.worker is None and options.ready_fd is None and options.embedded_redis is None
    options = parse_args(["--worker", "2", "--ready-fd", "9", "--embedded-redis", "unix:///d/redis.sock"])
    assert (options.worker, options.ready_fd, options.embedded_redis) == (2, 9, "unix:///d/redis.sock")


def test_restarts_back_off_doubling_up_to_a_cap() -> None:
    delays = [restart_delay(n) for n in range(1, 12)]
    assert delays[0] == BACKOFF_FIRST and delays[1] == 2 * BACKOFF_FIRST
    assert delays == sorted(delays) and delays[-1] == BACKOFF_MAX
    assert restart_delay(10_000) == BACKOFF_MAX


def test_exit_statuses_are_named_for_the_log() -> None:
    assert describe_exit(0) == "code 0"
    assert describe_exit(3) == "code 3"
    assert describe_exit(-9) == "signal SIGKILL"
    assert describe_exit(None) == "no exit status"


def test_the_port_check_finds_a_listener_and_refuses_port_zero() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert "cannot listen on 127.0.0.1" in (port_problem("127.0.0.1", port) or "")
    assert port_problem("127.0.0.1", port) is None
    assert "fixed PORT" in (port_problem("127.0.0.1", 0) or "")
