"""The direct providers' one HTTP client: a keep-alive pool per process, shared by every provider that speaks HTTP itself.

The hot path sends one POST per reply through it: no client object per request, the URL, headers and timeout
built once per provider, the body bytes handed over as they are. Failures become ProviderErrors with the reasons
the SDK transports give (`HTTP 503` with Retry-After, `timeout`, the connection error's type), so the chain and
its breakers see the same thing whichever transport a provider uses.
"""

from __future__ import annotations

import asyncio
import contextvars
import urllib.request
import weakref
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from server.ai.providers.base import ProviderError
from server.ai.providers.errors import describe_failure, retry_after_from_headers

# Connections the pool may hold open at once, as the openai SDK allows (a stream holds one for its whole answer).
CONNECTION_LIMIT = 1000
# Seconds an idle pooled connection is kept; a server closing it sooner is noticed and the connection dropped.
KEEPALIVE_SECONDS = 15.0
# Bytes of an error answer read so its connection can serve the next call; a longer body closes it instead.
ERROR_BODY_LIMIT = 64 * 1024
# Seconds to wait, after an answer's end marker, for its body to end so the connection can be pooled.
END_GRACE = 0.25
USER_AGENT = f"support-chat aiohttp/{aiohttp.__version__}"

# Whether the current call's connection came from the pool (set by the connector, read when a send fails).
_reused: contextvars.ContextVar[bool] = contextvars.ContextVar("provider_connection_reused", default=False)


class _PoolConnector(aiohttp.TCPConnector):
    """A TCP connector that tells each call whether its connection was used before.

    A server may close an idle keep-alive connection just as a call is sent on it; that call never reached
    the server, and is sent again once on a new connection instead of failing over (RFC 9112 §9.3.1).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._used: weakref.WeakSet[object] = weakref.WeakSet()

    async def connect(self, req: Any, traces: Any, timeout: aiohttp.ClientTimeout) -> Any:
        connection = await super().connect(req, traces, timeout)
        protocol = connection.protocol
        if protocol in self._used:
            _reused.set(True)
        else:
            self._used.add(protocol)
        return connection


class ProviderHTTP:
    """The shared aiohttp session of the direct providers: opened at start-up, closed at clean-up."""

    def __init__(self, *, connection_limit: int = CONNECTION_LIMIT, keepalive: float = KEEPALIVE_SECONDS) -> None:
        self._connection_limit = connection_limit
        self._keepalive = keepalive
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        """Open the pool (on the running loop); a provider called before start-up opens it on first use."""
        self._open()

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = _PoolConnector(limit=self._connection_limit, keepalive_timeout=self._keepalive)
            self._session = aiohttp.ClientSession(
                connector=connector,
                cookie_jar=aiohttp.DummyCookieJar(),  # no provider sets cookies worth keeping
                timeout=aiohttp.ClientTimeout(),  # no aiohttp timers: post() bounds the wait for headers with one
            )
        return self._session

    async def aclose(self) -> None:
        """Close every pooled connection."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def lifecycle(self, app: web.Application) -> AsyncIterator[None]:
        """An aiohttp cleanup context: the pool lives exactly as long as the app."""
        await self.start()
        yield
        await self.aclose()

    async def post(
        self, url: URL, body: bytes, headers: CIMultiDict[str], timeout: float, proxy: URL | None = None
    ) -> aiohttp.ClientResponse:
        """Send one call and wait, up to `timeout` seconds, for its answer's headers: a 2xx response whose body is the caller's.

        Anything else is a ProviderError: a status error (its body read, so the connection serves again), a
        refused, reset or timed-out connection. A call that found its pooled connection closed by the server is
        sent once more on a fresh one. The body's pace is the chain's watchdog's to judge (first token, idle): no
        timer here is rescheduled per read.
        """
        session = self._session if self._session is not None and not self._session.closed else self._open()
        error: ProviderError | None = None
        try:
            async with asyncio.timeout(timeout):
                response = await _send(session, url, body, headers, proxy)
                if response.status < 300:
                    return response
                error = ProviderError(f"HTTP {response.status}", retry_after=retry_after_from_headers(response.headers))
                await _read_error_body(response)
        except TimeoutError as err:
            if error is not None:  # the status is the failure, however slowly its body came
                raise error from None
            raise ProviderError("timeout") from err
        raise error


async def _send(
    session: aiohttp.ClientSession, url: URL, body: bytes, headers: CIMultiDict[str], proxy: URL | None
) -> aiohttp.ClientResponse:
    """One POST, sent again once if its pooled connection turned out closed; failures as ProviderErrors."""
    retried = False
    while True:
        _reused.set(False)
        try:
            return await session.post(url, data=body, headers=headers, proxy=proxy, allow_redirects=False)
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as err:
            if not retried and _reused.get() and not isinstance(err, aiohttp.ClientConnectorError):
                retried = True
                continue
            raise ProviderError(describe_failure(err)) from err
        except Exception as err:  # refused, DNS, TLS: the next provider
            raise ProviderError(describe_failure(err)) from err


async def _read_error_body(response: aiohttp.ClientResponse) -> None:
    """Read a status error's (small) body, so its connection goes back to the pool; a long one closes it."""
    try:
        read = 0
        while read <= ERROR_BODY_LIMIT:
            part = await response.content.readany()
            if not part:
                break
            read += len(part)
    except Exception:  # the status is the failure; an error while reading its body changes nothing
        pass
    finally:
        finish_response(response)


async def read_to_end(response: aiohttp.ClientResponse) -> None:
    """After an API's own end marker (`data: [DONE]`), wait briefly for the body's end, usually right behind it.

    Released before its end, a connection would be closed rather than pooled, and the next call would pay for a
    new one; a server that keeps the body open after its end marker costs at most END_GRACE, then the connection.
    """
    content = response.content
    try:
        async with asyncio.timeout(END_GRACE):
            while not content.is_eof() and await content.readany():
                pass
    except Exception:  # the answer is complete: a slow or broken end only costs the connection
        pass


def finish_response(response: aiohttp.ClientResponse) -> None:
    """After a stream: its connection goes back to the pool when the body was read to its end, else it is closed.

    Closing is also how a stream stopped early (stop-generation, failover, shutdown) tells the provider to stop.
    """
    if response.content.is_eof():
        response.release()
    else:
        response.close()


def provider_headers(pairs: Mapping[str, str]) -> CIMultiDict[str]:
    """A provider's request headers, built once (JSON in, keep-alive by HTTP/1.1's default)."""
    headers: CIMultiDict[str] = CIMultiDict({"Content-Type": "application/json", "User-Agent": USER_AGENT})
    headers.update(pairs)
    return headers


def env_proxy(url: URL) -> URL | None:
    """The proxy the environment names for this URL (HTTPS_PROXY, HTTP_PROXY, NO_PROXY), read once per provider.

    The SDKs honour these variables too; resolving them once, instead of per call as aiohttp's `trust_env` does,
    keeps the scan of the environment off the hot path.
    """
    if url.host is None or urllib.request.proxy_bypass(url.host):
        return None
    proxy = urllib.request.getproxies().get(url.scheme)
    return URL(proxy) if proxy else None
