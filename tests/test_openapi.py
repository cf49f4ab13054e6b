"""The OpenAPI document describes the live API: schemathesis finds no 500 and no answer that breaks it."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from tests.processes import launch


async def test_openapi_document_and_docs_page(server, http) -> None:
    _, spec, _ = await http.get(f"{server.url}/api/v1/openapi.json")
    _, page, _ = await http.get(f"{server.url}/api/v1/docs")
    assert spec["openapi"].startswith("3.1")
    assert {"/api/v1/chat/session", "/api/v1/chat/message", "/api/v1/chat/history/{sessionId}"} <= set(spec["paths"])
    send = spec["components"]["schemas"]["SendMessage"]
    assert send["properties"]["message"]["maxLength"] == 4000 and send["additionalProperties"] is False
    assert "POST /api/v1/chat/session" in page and "SendMessage" in page


async def test_schemathesis_finds_no_server_error_and_no_undocumented_answer(processes, redis_url, double) -> None:
    env = {
        "REDIS_URL": redis_url,
        "SOCKETIO_MANAGER": "memory",
        "AI_PROVIDERS": "local",
        "AGENT_API_KEYS": "schema:schema-agent-key-3141-59ab",
        "RATE_LIMIT_SESSIONS_PER_MINUTE": "0",
        "RATE_LIMIT_MESSAGES_PER_MINUTE": "0",
    }
    server = await launch(processes, env)
    st = Path(sys.executable).parent / "st"
    process = await asyncio.create_subprocess_exec(
        str(st),
        "run",
        f"{server.url}/api/v1/openapi.json",
        "--checks",
        "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
        "--max-examples",
        "25",
        "--seed",
        "1",
        "--request-timeout",
        "10",
        "--no-color",
        "-H",
        "Authorization: Bearer schema-agent-key-3141-59ab",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 300)
    text = output.decode(errors="replace")
    assert process.returncode == 0, text[-4000:]
    assert json.dumps("passed") and "passed" in text.lower()
