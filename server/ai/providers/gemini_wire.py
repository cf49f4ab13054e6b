"""Gemini generateContent on the wire: the request body and the `streamGenerateContent?alt=sse` event stream."""

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


def contents_for(request: ProviderRequest) -> list[dict[str, object]]:
    """Gemini's contents: earlier turns (assistant → model) and the new message."""
    contents: list[dict[str, object]] = [
        {"role": "model" if turn.role == "assistant" else "user", "parts": [{"text": turn.content}]} for turn in request.history
    ]
    contents.append({"role": "user", "parts": [{"text": request.message}]})
    return contents


def encode_body(request: ProviderRequest) -> bytes:
    """The JSON body of one call, the fields the SDK would send."""
    body: dict[str, object] = {
        "contents": contents_for(request),
        "systemInstruction": {"parts": [{"text": request.system_prompt}]},
    }
    if request.max_tokens:
        body["generationConfig"] = {"maxOutputTokens": request.max_tokens}
    return orjson.dumps(body)


def model_path(model: str) -> str:
    """The model's resource name as the API wants it in the URL (`models/...` unless already qualified)."""
    return model if model.startswith(("models/", "tunedModels/")) else f"models/{model}"


class StreamError(ProviderError):
    """An `error` object in the event stream: the API's status error, arriving after the 200."""

    def __init__(self, code: object) -> None:
        super().__init__(f"HTTP {code}")


class GenerateContentStream:
    """One answer's GenerateContentResponse events as they arrive: a delta per read, then the end.

    Read as google-genai reads them: the first candidate's text parts that are not thoughts, its finish reason
    and average logprob, and the latest non-zero usage counts.
    """

    __slots__ = ("_sse", "avg_logprobs", "finish_reason", "input_tokens", "output_tokens", "text_seen")
    done = False  # the stream has no end marker: it ends with the body

    def __init__(self) -> None:
        self._sse = SSEParser()
        self.finish_reason: Any = None
        self.avg_logprobs: Any = None
        self.input_tokens: Any = 0
        self.output_tokens: Any = 0
        self.text_seen = False

    def read(self, data: bytes) -> TextDelta | None:
        """The delta in one piece of the body, or None when it completed no text."""
        events = self._sse.feed(data)
        return self._apply(events) if events else None

    def end(self) -> TextDelta | None:
        """The body ended: a last event without its blank line still counts."""
        events = self._sse.finish()
        return self._apply(events) if events else None

    def _apply(self, events: list[bytes]) -> TextDelta | None:
        texts: list[str] = []
        for data in events:
            try:
                chunk = orjson.loads(data)
            except orjson.JSONDecodeError as err:
                raise MalformedStream("not JSON") from err
            if not isinstance(chunk, dict):
                raise MalformedStream("not an object")
            error = chunk.get("error")
            if error is not None:
                raise StreamError(error.get("code") if isinstance(error, dict) else None)
            usage = chunk.get("usageMetadata")
            if usage:
                self.input_tokens = usage.get("promptTokenCount") or self.input_tokens
                self.output_tokens = usage.get("candidatesTokenCount") or self.output_tokens
            candidates = chunk.get("candidates")
            if not candidates:
                continue
            candidate = candidates[0]
            if candidate.get("avgLogprobs") is not None:
                self.avg_logprobs = candidate["avgLogprobs"]
            content = candidate.get("content")
            parts = content.get("parts") if content else None
            if parts:
                for part in parts:
                    text = part.get("text")
                    if text and not part.get("thought"):
                        texts.append(text)
            if candidate.get("finishReason") is not None:
                self.finish_reason = candidate["finishReason"]
        if not texts:
            return None
        self.text_seen = True
        return TextDelta(texts[0] if len(texts) == 1 else "".join(texts))

    def finished(self) -> Finished:
        """The proper end of the answer; an answer cut short, empty or with malformed figures is a failure."""
        if self.finish_reason is None:
            raise ProviderError("stream ended without a finish reason")
        if not self.text_seen:
            raise ProviderError("empty answer")
        return Finished(
            confidence=confidence_from_logprobs([self.avg_logprobs]) if self.avg_logprobs is not None else None,
            input_tokens=token_count(self.input_tokens),
            output_tokens=token_count(self.output_tokens),
        )
