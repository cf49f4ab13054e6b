"""The rendered pages: the message-length limit comes from the settings, scripts are ES modules, one console header."""

from __future__ import annotations

import re
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from server.app_keys import OPENAPI, SETTINGS
from server.settings import Settings
from server.web.pages import PUBLIC_DIR, agent_console, dashboard, index, setup_pages


def pages_app(**overrides: Any) -> web.Application:
    """An application with only the pages set up, over settings with `overrides`."""
    app = web.Application()
    app[SETTINGS] = Settings(**overrides)
    app[OPENAPI] = {}
    setup_pages(app)
    return app


async def render(app: web.Application, path: str) -> str:
    """The HTML the page handler for `path` answers."""
    handler = {"/": index, "/agent": agent_console, "/dashboard": dashboard}[path]
    response = await handler(make_mocked_request("GET", path, app=app))
    assert isinstance(response, web.Response) and response.text is not None
    return response.text


async def test_the_composers_take_their_limit_from_the_settings() -> None:
    app = pages_app(max_message_length=1234)
    chat, console = await render(app, "/"), await render(app, "/agent")
    assert 'id="composer" rows="2" maxlength="1234"' in chat and ">0 / 1234</span>" in chat
    assert 'id="agent-reply" rows="2" maxlength="1234"' in console
    assert "4000" not in chat + console


@pytest.mark.parametrize("path", ["/", "/agent", "/dashboard"])
async def test_page_scripts_are_modules_and_only_the_socketio_client_is_classic(path: str) -> None:
    page = await render(pages_app(), path)
    scripts = re.findall(r"<script [^>]*>", page)
    modules = [tag for tag in scripts if 'type="module"' in tag]
    assert len(modules) == 1 and "/static/" in modules[0]
    assert all("socket.io" in tag for tag in scripts if tag not in modules)


async def test_the_console_pages_share_one_header() -> None:
    app = pages_app(store_name="Acme")
    for path, title, status, form in (
        ("/agent", "Agent console", "agent-status", "sign-in-form"),
        ("/dashboard", "Support analytics", "dash-status", "dash-sign-in"),
    ):
        page = await render(app, path)
        assert f"<h1>Acme · {title}</h1>" in page
        assert f'<span id="{status}" class="status" data-state="offline" role="status">Signed out</span>' in page
        assert f'<form id="{form}" class="actions">' in page and 'id="agent-key" type="password"' in page


def test_no_script_shares_a_global_and_only_ui_js_reads_the_socketio_client() -> None:
    for script in PUBLIC_DIR.glob("*.js"):
        source = script.read_text()
        assert "4000" not in source, script.name
        allowed = {"io"} if script.name == "ui.js" else {"prompt"}  # window.prompt: the browser's own dialog
        assert set(re.findall(r"window\.(\w+)", source)) <= allowed, script.name
