"""OpenAI (and any OpenAI-compatible server) through the official SDK's Chat Completions API."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import openai

from server.providers.base import (
    AIProvider,
    Finished,
    ProviderError,
    ProviderRequest,
    StreamEvent,
    TextDelta,
    confidence_from_logprobs,
)
from server.providers.errors import describe_failure, retry_after_from_headers


class OpenAIProvider(AIProvider):
    """The primary provider; failover is the retry, so the SDK's own retries are off."""

    name = "openai"

    def __init__(self, api_key: str | None, model: str, base_url: str | None, timeout: float) -> None:
        self.model = model
        self._api_key = api_key
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

    def messages_for(self, request: ProviderRequest) -> list[dict[str, str]]:
        """The Chat Completions message list: system prompt, earlier turns, the new message."""
        messages = [{"role": "system", "content": request.system_prompt}]
        messages.extend({"role": turn.role, "content": turn.content} for turn in request.history)
        messages.append({"role": "user", "content": request.message})
        return messages

    async def stream(self, request: ProviderRequest) -> AsyncIterator[StreamEvent]:
        if self._client is None:
            raise ProviderError("not configured")
        logprobs: list[float] = []
        finish_reason: str | None = None
        usage: Any = None
        text_seen = False
        try:
            response = await self._client.chat.completions.create(
                model=self.model,
                # The messages travel in extra_body: the SDK's recursive TypedDict transform of `messages`
                # cost ~20% of a reply's CPU in profiles, and plain role/content dicts need no transform.
                messages=[],
                extra_body={"messages": self.messages_for(request)},
                stream=True,
                stream_options={"include_usage": True},
                logprobs=True,
                **({"max_tokens": request.max_tokens} if request.max_tokens else {}),
            )
            async with response:
                async for chunk in response:
                    if chunk.usage is not None:
                        usage = chunk.usage
                    if not chunk.choices:
                        continue
                    choice = chunk.choices[0]
                    token_logprobs: tuple[float, ...] = ()
                    if choice.logprobs is not None and choice.logprobs.content:
                        token_logprobs = tuple(t.logprob for t in choice.logprobs.content)
                        logprobs.extend(token_logprobs)
                    text = choice.delta.content if choice.delta is not None else None
                    if text:
                        text_seen = True
                        yield TextDelta(text, token_logprobs)
                    if choice.finish_reason:
                        finish_reason = choice.finish_reason
        except openai.APIStatusError as err:
            raise ProviderError(
                f"HTTP {err.status_code}", retry_after=retry_after_from_headers(err.response.headers)
            ) from err
        except Exception as err:  # any other failure (network, timeout, malformed) means: next provider
            raise ProviderError(describe_failure(err)) from err
        if finish_reason is None:
            raise ProviderError("stream ended without a finish reason")
        if not text_seen:
            raise ProviderError("empty answer")
        yield Finished(
            confidence=confidence_from_logprobs(logprobs),
            input_tokens=getattr(usage, "prompt_tokens", 0) or 0,
            output_tokens=getattr(usage, "completion_tokens", 0) or 0,
        )

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
