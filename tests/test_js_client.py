"""The official socket.io-client (node) speaks our protocol: join, send, chunks, reply."""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest

from server.settings import PROJECT_ROOT

CLIENT = PROJECT_ROOT / "tests" / "js" / "node_client.mjs"
pytestmark = pytest.mark.skipif(
    shutil.which("node") is None or not (PROJECT_ROOT / "node_modules" / "socket.io-client").exists(),
    reason="node and the socket.io-client npm package are needed (make test installs them)",
)


async def test_official_js_client_round_trip(server, double) -> None:
    double.set_mode("openai", "ok", tokens=40)
    process = await asyncio.create_subprocess_exec(
        "node", str(CLIENT), server.url, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode == 0, (stdout, stderr)
    seen = json.loads(stdout.decode().strip().splitlines()[-1])
    assert seen["join"]["ok"] is True and seen["ack"]["ok"] is True
    assert seen["joined"]["sessionId"] == seen["join"]["sessionId"]
    reply = seen["reply"]["message"]
    assert reply["role"] == "assistant" and reply["provider"] == "openai"
    assert "".join(c["delta"] for c in seen["chunks"]) == reply["content"]
    assert [c["index"] for c in seen["chunks"]] == list(range(len(seen["chunks"])))
