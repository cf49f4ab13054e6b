"""OpenAI Chat Completions on the wire: the streaming request body and the event stream, for both transports."""

from __future__ import annotations

from typing import Any

import orjson

from server.ai.providers.base import (
    Finished,
    ProviderError,
    ProviderRequest,
    TextDelta,
    confidence_from_logprobs,
    token_count,
)
from server.ai.providers.sse import MalformedStream, SSEParser


def messages_for(request: ProviderRequest) -> list[dict[str, str]]:
    """The Chat Completions message list: system prompt, earlier turns, the new message."""
    messages = [{"role": "system", "content": request.system_prompt}]
    messages.extend({"role": turn.role, "content": turn.content} for turn in request.history)
    messages.append({"role": "user", "content": request.message})
    return messages


class ChatCompletionsBody:
    """The streaming request body, its fixed part serialised once per provider and the conversation once per call."""

    __slots__ = ("_head",)

    def __init__(self, model: str) -> None:
        fixed = {"model": model, "stream": True, "stream_options": {"include_usage": True}, "logprobs": True}
        self._head = orjson.dumps(fixed)[:-1] + b',"messages":'

    def encode(self, request: ProviderRequest) -> bytes:
        """The JSON body of one call."""
        tail = b',"max_tokens":%d}' % request.max_tokens if request.max_tokens else b"}"
        return self._head + orjson.dumps(messages_for(request)) + tail


class ChatCompletionsStream:
    """One answer's `chat.completion.chunk` events as they arrive: a delta per read, then the end.

    What one read of the body brought is passed on as one delta (this runs once per token: a delta per event
    would be a generator step per token more).
    """

    __slots__ = ("_sse", "done", "finish_reason", "logprobs", "text_seen", "usage")

    def __init__(self) -> None:
        self._sse = SSEParser()
        self.logprobs: list[float] = []
        self.finish_reason: str | None = None
        self.usage: Any = None
        self.text_seen = False
        self.done = False  # `data: [DONE]` came: anything after it is ignored

    def read(self, data: bytes) -> TextDelta | None:
        """The delta in one piece of the body, or None when it completed no text."""
        events = self._sse.feed(data)
        return self._apply(events) if events and not self.done else None

    def end(self) -> TextDelta | None:
        """The body ended: a last event without its blank line still counts."""
        events = self._sse.finish()
        return self._apply(events) if events and not self.done else None

    def _apply(self, events: list[bytes]) -> TextDelta | None:
        texts: list[str] = []
        read_logprobs: list[float] = []
        for data in events:
            if data == b"[DONE]" or (data.startswith((b" ", b"\t", b"[")) and data.strip() == b"[DONE]"):
                self.done = True
                break
            try:
                chunk = orjson.loads(data)
            except orjson.JSONDecodeError as err:
                raise MalformedStream("not JSON") from err
            if not isinstance(chunk, dict):
                raise MalformedStream("not an object")
            if chunk.get("error"):
                raise ProviderError("error event in stream")
            if chunk.get("usage"):
                self.usage = chunk["usage"]
            choices = chunk.get("choices")
            if not choices:
                continue
            choice = choices[0]
            content_logprobs = (choice.get("logprobs") or {}).get("content")
            if content_logprobs:
                token_logprobs = [float(t["logprob"]) for t in content_logprobs]
                self.logprobs.extend(token_logprobs)
                read_logprobs.extend(token_logprobs)
            text = (choice.get("delta") or {}).get("content")
            if text:
                texts.append(text)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        if not texts:
            return None
        self.text_seen = True
        return TextDelta(texts[0] if len(texts) == 1 else "".join(texts), tuple(read_logprobs))

    def finished(self) -> Finished:
        """The proper end of the answer; an answer cut short, empty or with malformed figures is a failure."""
        if self.finish_reason is None:
            raise ProviderError("stream ended without a finish reason")
        if not self.text_seen:
            raise ProviderError("empty answer")
        usage = self.usage
        if usage is not None and not isinstance(usage, dict):
            raise ProviderError("malformed answer: usage is not an object")
        usage = usage or {}
        return Finished(
            confidence=confidence_from_logprobs(self.logprobs),
            input_tokens=token_count(usage.get("prompt_tokens")),
            output_tokens=token_count(usage.get("completion_tokens")),
        )
