"""The direct transport's read loop, shared by the providers that speak their API over the shared HTTP pool."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import AsyncGenerator
from typing import Protocol

from multidict import CIMultiDict
from yarl import URL

from server.ai.http import ProviderHTTP, env_proxy, finish_response, read_to_end
from server.ai.providers.base import AIProvider, Finished, ProviderError, ProviderRequest, StreamEvent, TextDelta
from server.ai.providers.errors import describe_failure


class WireStream(Protocol):
    """One answer's event stream as an API sends it: deltas per read, then the end."""

    done: bool

    def read(self, data: bytes) -> TextDelta | None:
        """The delta in one piece of the body, or None."""

    def end(self) -> TextDelta | None:
        """The delta in what the body's end completes, or None."""

    def finished(self) -> Finished:
        """The answer's proper end, or a ProviderError."""


class DirectProvider(AIProvider):
    """A provider that sends one POST per answer over the shared pool and reads the event stream from its bytes."""

    def __init__(self, http: ProviderHTTP, url: URL, headers: CIMultiDict[str] | None, timeout: float) -> None:
        self._http = http
        self._url = url
        self._headers = headers
        # AI_REQUEST_TIMEOUT: the connect and the wait for the answer's headers; the chain's watchdog times the body.
        self._timeout = timeout
        self._proxy = env_proxy(url)

    @property
    def configured(self) -> bool:
        return self._headers is not None

    @abstractmethod
    def encode(self, request: ProviderRequest) -> bytes:
        """The JSON body of one call."""

    @abstractmethod
    def wire_stream(self) -> WireStream:
        """A reader for one answer's event stream."""

    async def stream(self, request: ProviderRequest) -> AsyncGenerator[StreamEvent, None]:
        if self._headers is None:
            raise ProviderError("not configured")
        response = await self._http.post(self._url, self.encode(request), self._headers, self._timeout, self._proxy)
        reader = self.wire_stream()
        try:
            content = response.content
            while not reader.done:  # once per read of the body: a token, or a burst of them
                data = await content.readany()
                delta = reader.read(data) if data else reader.end()
                if delta is not None:
                    yield delta
                if not data:
                    break
            if not content.is_eof():  # the API's end marker came first (OpenAI's [DONE]): the body's end is near
                await read_to_end(response)
        except ProviderError:
            raise
        except Exception as err:  # a cut or timed-out body, a malformed stream: the next provider
            raise ProviderError(describe_failure(err)) from err
        finally:
            finish_response(response)
        yield reader.finished()
