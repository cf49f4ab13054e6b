"""The pages (chat, agent console, analytics, API docs) rendered from templates, with their headers, and the static files."""

from __future__ import annotations

import re
from pathlib import Path

import aiohttp_jinja2
import jinja2
from aiohttp import web

from server import __version__
from server.app_keys import OPENAPI, SETTINGS
from server.settings import PROJECT_ROOT

PUBLIC_DIR = PROJECT_ROOT / "public"  # static files only: served as they are under /static/
TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"  # pages: rendered, never served raw
SOCKETIO_CLIENT = PROJECT_ROOT / "node_modules" / "socket.io-client" / "dist" / "socket.io.min.js"
SOCKETIO_CDN = "https://cdn.socket.io/4.8.1/socket.io.min.js"
# Subresource Integrity of that pinned file (socket.io's published value; the npm package's copy hashes the same).
SOCKETIO_INTEGRITY = "sha384-mkQ3/7FUtcGyoppY6bz/PORYoGqOl7/aSUMn2ymDOJcapfS6PHqxhRTMh1RR0Q6+"
CSP_KEY = web.AppKey("pages.csp", str)


def content_security_policy(connect_sources: tuple[str, ...] = ()) -> str:
    """The pages' policy: scripts from here and the one pinned CDN file; connections to this origin and configured ones.

    `'self'` covers the page's own ws:/wss: origin (CSP Level 3); `connect_sources` (CSP_CONNECT_SRC) adds
    others, for a Socket.IO endpoint on another host.
    """
    # A source is one token: whitespace, ';' or ',' in a configured value could not widen or add directives.
    connect = " ".join(("'self'", *(src for src in connect_sources if re.fullmatch(r"[^\s;,']+", src))))
    return (
        f"default-src 'self'; script-src 'self' {SOCKETIO_CDN}; style-src 'self'; img-src 'self' data:; "
        f"connect-src {connect}; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    )


CSP = content_security_policy()


def _page_headers(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
    response.headers["Content-Security-Policy"] = request.app.get(CSP_KEY, CSP)
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


def _render(template: str, request: web.Request) -> web.StreamResponse:
    """A page with the Socket.IO client served locally when npm installed it, else from the CDN (with SRI).

    The composers' `maxlength` comes from MAX_MESSAGE_LENGTH, so the page never offers more than the server accepts.
    """
    settings = request.app[SETTINGS]
    response = aiohttp_jinja2.render_template(
        template,
        request,
        {
            "socketio_src": "/vendor/socket.io.min.js" if SOCKETIO_CLIENT.exists() else "",
            "socketio_cdn": SOCKETIO_CDN,
            "socketio_integrity": SOCKETIO_INTEGRITY,
            "store_name": settings.store_name,
            "max_message_length": settings.max_message_length,
            # an answer below it offers "Talk to a person" on the chat page (ESCALATION_CONFIDENCE_THRESHOLD)
            "confidence_threshold": settings.escalation_confidence_threshold,
            "version": __version__,
        },
    )
    return _page_headers(request, response)


async def index(request: web.Request) -> web.StreamResponse:
    """The customer chat page."""
    return _render("index.html", request)


async def agent_console(request: web.Request) -> web.StreamResponse:
    """The agents' console."""
    return _render("agent.html", request)


async def dashboard(request: web.Request) -> web.StreamResponse:
    """Charts of the analytics (the data needs an agent key)."""
    return _render("dashboard.html", request)


async def api_docs(request: web.Request) -> web.StreamResponse:
    """A readable page of the REST API, rendered from the same OpenAPI document."""
    response = aiohttp_jinja2.render_template(
        "docs.html", request, {"spec": request.app[OPENAPI], "store_name": request.app[SETTINGS].store_name}
    )
    return _page_headers(request, response)


async def socketio_client(request: web.Request) -> web.StreamResponse:
    """The browser client library from the npm package."""
    if not SOCKETIO_CLIENT.exists():
        raise web.HTTPNotFound()
    return _page_headers(request, web.FileResponse(SOCKETIO_CLIENT, headers={"Cache-Control": "public, max-age=86400"}))


def setup_pages(app: web.Application, public_dir: Path = PUBLIC_DIR, templates_dir: Path = TEMPLATES_DIR) -> None:
    """Templates from server/web/templates/ (rendered with the pages' headers), static files from public/ under /static/."""
    aiohttp_jinja2.setup(app, loader=jinja2.FileSystemLoader(str(templates_dir)), autoescape=True)
    app[CSP_KEY] = content_security_policy(app[SETTINGS].csp_connect_src)
    app.router.add_get("/", index)
    app.router.add_get("/agent", agent_console)
    app.router.add_get("/agent.html", agent_console)
    app.router.add_get("/api/v1/docs", api_docs)
    app.router.add_get("/dashboard", dashboard)
    app.router.add_get("/dashboard.html", dashboard)
    app.router.add_get("/vendor/socket.io.min.js", socketio_client)
    app.router.add_static("/static/", public_dir, show_index=False)
    app.on_response_prepare.append(_static_headers)


async def _static_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Static files get the same no-sniff header as pages."""
    if request.path.startswith("/static/"):
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
