"""OpenAI (and any OpenAI-compatible server) through the official SDK's Chat Completions API."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import httpx2
import openai
import orjson

from server.ai.providers.base import (
    AIProvider,
    Finished,
    ProviderError,
    ProviderRequest,
    StreamEvent,
    TextDelta,
    confidence_from_logprobs,
    token_count,
)
from server.ai.providers.errors import describe_failure, retry_after_from_headers


class OpenAIProvider(AIProvider):
    """The primary provider; failover is the retry, so the SDK's own retries are off."""

    name = "openai"

    def __init__(self, api_key: str | None, model: str, base_url: str | None, timeout: float) -> None:
        self.model = model
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

    def body_for(self, request: ProviderRequest) -> dict[str, Any]:
        """The streaming Chat Completions request body."""
        body: dict[str, Any] = {
            "model": self.model,
            "messages": self.messages_for(request),
            "stream": True,
            "stream_options": {"include_usage": True},
            "logprobs": True,
        }
        if request.max_tokens:
            body["max_tokens"] = request.max_tokens
        return body

    async def stream(self, request: ProviderRequest) -> AsyncGenerator[StreamEvent, None]:
        if self._client is None:
            raise ProviderError("not configured")
        logprobs: list[float] = []
        finish_reason: str | None = None
        usage: dict[str, Any] | None = None
        text_seen = False
        try:
            # The SDK sends the request (auth, base URL, timeouts, typed status errors) and hands back the raw
            # event stream: building a pydantic chunk model per token and transforming the typed request
            # parameters were over a third of a reply's CPU in profiles (docs/performance.md); the wire format is stable.
            # The JSON body is encoded here by orjson (the SDK's stdlib encoder was another 2%).
            response = await self._client.post(
                "/chat/completions", cast_to=httpx2.Response, content=orjson.dumps(self.body_for(request)), stream=True
            )
            # Read raw unless content-encoded (the decoding layer costs a generator step per token), and parse
            # the events here rather than in another generator: this loop runs once per token.
            body = response.aiter_bytes() if response.headers.get("content-encoding") else response.aiter_raw()
            pending = b""
            done = False
            try:
                async for part in body:
                    chunks, pending, done = _sse_events(pending + part if pending else part)
                    texts: list[str] = []  # what one read brought is passed on as one delta
                    read_logprobs: list[float] = []
                    for chunk in chunks:
                        if chunk.get("error"):
                            raise ProviderError("error event in stream")
                        if chunk.get("usage"):
                            usage = chunk["usage"]
                        choices = chunk.get("choices")
                        if not choices:
                            continue
                        choice = choices[0]
                        content_logprobs = (choice.get("logprobs") or {}).get("content")
                        if content_logprobs:
                            token_logprobs = [float(t["logprob"]) for t in content_logprobs]
                            logprobs.extend(token_logprobs)
                            read_logprobs.extend(token_logprobs)
                        text = (choice.get("delta") or {}).get("content")
                        if text:
                            texts.append(text)
                        if choice.get("finish_reason"):
                            finish_reason = choice["finish_reason"]
                    if texts:
                        text_seen = True
                        yield TextDelta("".join(texts), tuple(read_logprobs))
                    if done:
                        break
            finally:
                await response.aclose()
        except ProviderError:
            raise
        except openai.APIStatusError as err:
            raise ProviderError(f"HTTP {err.status_code}", retry_after=retry_after_from_headers(err.response.headers)) from err
        except Exception as err:  # any other failure (network, timeout, malformed) means: next provider
            raise ProviderError(describe_failure(err)) from err
        if finish_reason is None:
            raise ProviderError("stream ended without a finish reason")
        if not text_seen:
            raise ProviderError("empty answer")
        yield _finished(logprobs, usage)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()


def _finished(logprobs: list[float], usage: Any) -> Finished:
    """The end of an answer from its logprobs and usage; a malformed figure is this provider's failure."""
    if usage is not None and not isinstance(usage, dict):
        raise ProviderError("malformed answer: usage is not an object")
    usage = usage or {}
    return Finished(
        confidence=confidence_from_logprobs(logprobs),
        input_tokens=token_count(usage.get("prompt_tokens")),
        output_tokens=token_count(usage.get("completion_tokens")),
    )


class MalformedStream(ValueError):
    """The body was not the server-sent events of Chat Completions."""


def _sse_events(buffer: bytes) -> tuple[list[dict[str, Any]], bytes, bool]:
    """The complete `data:` events in `buffer` as JSON, the unfinished rest, and whether `[DONE]` came."""
    if b"\n" not in buffer:
        return [], buffer, False
    *lines, rest = buffer.split(b"\n")
    events: list[dict[str, Any]] = []
    for line in lines:
        if not line.startswith(b"data:"):
            continue  # blank separators, comments, `event:` and `id:` lines
        data = line[5:].strip()
        if data == b"[DONE]":
            return events, b"", True
        try:
            event = orjson.loads(data)
        except orjson.JSONDecodeError as err:
            raise MalformedStream("not JSON") from err
        if not isinstance(event, dict):
            raise MalformedStream("not an object")
        events.append(event)
    return events, rest, False
