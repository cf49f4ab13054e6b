"""The official socket.io-client (node) speaks our protocol: join, send, chunks, reply."""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest

from server.settings import PROJECT_ROOT

CLIENT = PROJECT_ROOT / "tests" / "js" / "node_client.mjs"
pytestmark = [
    pytest.mark.slow,  # node clients against server processes
    pytest.mark.skipif(
        shutil.which("node") is None or not (PROJECT_ROOT / "node_modules" / "socket.io-client").exists(),
        reason="node and the socket.io-client npm package are needed (make test installs them)",
    ),
]


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


@pytest.mark.parametrize("transports", ["websocket", "polling", "polling,websocket"])
async def test_a_node_client_notices_a_shutdown_at_once_and_would_reconnect(transports, redis_url, tmp_path) -> None:
    import signal
    import time

    from tests.processes import ServerProcess

    server = await ServerProcess({"REDIS_URL": redis_url, "AI_PROVIDERS": "local", "DATA_DIR": str(tmp_path)}).start()
    watcher = await asyncio.create_subprocess_exec(
        "node",
        str(PROJECT_ROOT / "tests" / "js" / "shutdown_watch.mjs"),
        server.url,
        transports,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert (await asyncio.wait_for(watcher.stdout.readline(), 15)).strip() == b"ready"
        await asyncio.sleep(0.3)  # let a polling client settle into its next long poll
        signalled = time.time() * 1000
        server.process.send_signal(signal.SIGTERM)
        seen = json.loads(await asyncio.wait_for(watcher.stdout.readline(), 10))
        assert seen.get("reason") in ("transport close", "transport error"), seen  # not "io server disconnect"
        assert seen["active"] is True  # socket.io-client reconnects by itself after this
        assert seen["at"] - signalled < 2000, seen  # not the 25-45 s of a ping timeout
        await asyncio.wait_for(server.process.wait(), 5)
    finally:
        if watcher.returncode is None:
            watcher.kill()
        await server.stop()
