"""No network at run time: a real server process, every outbound connection refused and recorded, answers offline
(hybrid retrieval with the WordLlama model from its wheel) and tries to reach nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from server.ai.providers.local import SCOPE_ANSWER
from tests.clients import Http
from tests.processes import launch

NETGUARD = Path(__file__).resolve().parent / "netguard"


def guarded_env(log: Path, redis_url: str, data_dir: Path) -> dict[str, str]:
    """A server with no key (only the offline provider can answer) behind the network guard."""
    path = os.pathsep.join(p for p in (str(NETGUARD), os.environ.get("PYTHONPATH", "")) if p)
    env = {
        "PYTHONPATH": path,
        "NETGUARD_LOG": str(log),
        "REDIS_URL": redis_url,
        "DATA_DIR": str(data_dir),
        "OPENAI_API_KEY": "",
        "GEMINI_API_KEY": "",
    }
    return env


def test_the_guard_records_and_refuses_outbound_connections(tmp_path: Path) -> None:
    log = tmp_path / "net.log"
    code = (
        "import socket\n"
        "try:\n    socket.socket().connect(('192.0.2.1', 443))\nexcept PermissionError:\n    print('refused')\n"
        "try:\n    socket.getaddrinfo('huggingface.co', 443)\nexcept PermissionError:\n    print('refused')\n"
        "import uvloop\n"
    )
    env = {**os.environ, "PYTHONPATH": str(NETGUARD), "NETGUARD_LOG": str(log)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30)
    assert done.stdout.split() == ["refused", "refused"] and "import of uvloop halted" in done.stderr
    assert "connect 192.0.2.1:443" in log.read_text() and "resolve huggingface.co" in log.read_text()


async def test_a_server_answers_offline_and_reaches_for_no_network(processes, redis_url: str, tmp_path: Path, http: Http) -> None:
    log = tmp_path / "net.log"
    server = await launch(processes, guarded_env(log, redis_url, tmp_path / "data"))
    session = await http.new_session(server.url, "offline-visitor")
    answers: dict[str, dict] = {}
    for question in (
        "I want to return a lamp I bought two weeks ago. How do I do that?",
        "Can I send back a lamp I don't like?",
        "Do you sell gift cards?",
        "What is the capital of France?",
    ):
        status, body, _ = await http.post(
            f"{server.url}/api/v1/chat/message",
            {"sessionId": session["sessionId"], "message": question},
            session["token"],
        )
        assert status == 200, body
        assert body["reply"]["provider"] == "local"
        answers[question] = body
    for lamp in ("I want to return a lamp I bought two weeks ago. How do I do that?", "Can I send back a lamp I don't like?"):
        reply = answers[lamp]["reply"]
        assert "Orders > Return items" in reply["content"] and reply["confidence"] >= 0.5
        assert answers[lamp]["escalation"] is None
    gift = answers["Do you sell gift cards?"]
    assert "gift cards come in amounts" in gift["reply"]["content"] and gift["escalation"] is None
    assert answers["What is the capital of France?"]["reply"]["content"] == SCOPE_ANSWER
    await server.stop()
    assert not log.exists() or log.read_text() == "", f"outbound network attempts:\n{log.read_text()}"
