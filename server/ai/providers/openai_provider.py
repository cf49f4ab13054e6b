"""OpenAI (and any OpenAI-compatible server) through the official SDK's Chat Completions API (OPENAI_CLIENT=sdk)."""

from __future__ import annotations

from collections.abc import AsyncGenerator

import httpx2
import openai

from server.ai.providers.base import AIProvider, ProviderError, ProviderRequest, StreamEvent
from server.ai.providers.errors import describe_failure, retry_after_from_headers
from server.ai.providers.openai_wire import ChatCompletionsBody, ChatCompletionsStream


class OpenAIProvider(AIProvider):
    """The primary provider; failover is the retry, so the SDK's own retries are off."""

    name = "openai"

    def __init__(self, api_key: str | None, model: str, base_url: str | None, timeout: float) -> None:
        self.model = model
        self._body = ChatCompletionsBody(model)
        self._client = (
            openai.AsyncOpenAI(
                api_key=api_key,
                base_url=base_url,
                max_retries=0,
                timeout=timeout,
                http_client=openai.DefaultAioHttpClient(timeout=timeout),
            )
            if api_key
            else None
        )

    @property
    def configured(self) -> bool:
        return self._client is not None

    def body_for(self, request: ProviderRequest) -> bytes:
        """The streaming Chat Completions request body, as the direct transport sends it."""
        return self._body.encode(request)

    async def stream(self, request: ProviderRequest) -> AsyncGenerator[StreamEvent, None]:
        if self._client is None:
            raise ProviderError("not configured")
        reader = ChatCompletionsStream()
        try:
            # The SDK sends the request (auth, base URL, timeouts, typed status errors) and hands back the raw
            # event stream: building a pydantic chunk model per token and transforming the typed request
            # parameters were over a third of a reply's CPU in profiles (docs/performance.md); the wire format is stable.
            # The JSON body is encoded here by orjson (the SDK's stdlib encoder was another 2%), and the events are
            # read by the same code as the direct transport's (openai_wire.py), so the two cannot drift.
            response = await self._client.post(
                "/chat/completions", cast_to=httpx2.Response, content=self.body_for(request), stream=True
            )
            # Read raw unless content-encoded (the decoding layer costs a generator step per token).
            body = response.aiter_bytes() if response.headers.get("content-encoding") else response.aiter_raw()
            try:
                async for part in body:
                    delta = reader.read(part)
                    if delta is not None:
                        yield delta
                    if reader.done:
                        break
                else:
                    delta = reader.end()
                    if delta is not None:
                        yield delta
            finally:
                await response.aclose()
        except ProviderError:
            raise
        except openai.APIStatusError as err:
            raise ProviderError(f"HTTP {err.status_code}", retry_after=retry_after_from_headers(err.response.headers)) from err
        except Exception as err:  # any other failure (network, timeout, malformed) means: next provider
            raise ProviderError(describe_failure(err)) from err
        yield reader.finished()

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
