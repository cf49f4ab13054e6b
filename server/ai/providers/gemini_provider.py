"""Google Gemini through the maintained google-genai SDK (`client.aio`, GEMINI_CLIENT=sdk)."""

from __future__ import annotations

import contextlib
import typing
from collections.abc import AsyncGenerator

import pydantic
from google import genai
from google.genai import errors as genai_errors
from google.genai import types
from loguru import logger

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
from server.ai.providers.gemini_wire import contents_for


class GeminiProvider(AIProvider):
    """The first fallback; one attempt per call, since failover is the retry."""

    name = "gemini"

    def __init__(self, api_key: str | None, model: str, base_url: str | None, timeout: float) -> None:
        self.model = model
        self._client = (
            genai.Client(
                api_key=api_key,
                http_options=types.HttpOptions(
                    base_url=base_url,
                    timeout=int(timeout * 1000),  # milliseconds in this SDK
                    retry_options=types.HttpRetryOptions(attempts=1),
                ),
            )
            if api_key
            else None
        )

    @property
    def configured(self) -> bool:
        return self._client is not None

    async def stream(self, request: ProviderRequest) -> AsyncGenerator[StreamEvent, None]:
        if self._client is None:
            raise ProviderError("not configured")
        finish_reason = None
        avg_logprobs: float | None = None
        input_tokens = output_tokens = 0
        text_seen = False
        try:
            # The conversation travels as the REST body's own `contents` and `systemInstruction` through the SDK's
            # `extra_body`: validating and converting a pydantic Content per turn was about half of a Gemini reply's
            # CPU in profiles (docs/performance.md), and the SDK would send exactly these JSON fields.
            chunks = await self._client.aio.models.generate_content_stream(
                model=self.model,
                contents=request.message,
                config=types.GenerateContentConfig(
                    max_output_tokens=request.max_tokens,
                    http_options=types.HttpOptions(
                        extra_body={
                            "contents": contents_for(request),
                            "systemInstruction": {"parts": [{"text": request.system_prompt}]},
                        }
                    ),
                ),
            )
            async with contextlib.aclosing(chunks):  # type: ignore[type-var]  # typed AsyncIterator, is a generator
                async for chunk in chunks:
                    if chunk.usage_metadata is not None:
                        input_tokens = chunk.usage_metadata.prompt_token_count or input_tokens
                        output_tokens = chunk.usage_metadata.candidates_token_count or output_tokens
                    if not chunk.candidates:
                        continue
                    candidate = chunk.candidates[0]
                    if candidate.avg_logprobs is not None:
                        avg_logprobs = candidate.avg_logprobs
                    parts = candidate.content.parts if candidate.content and candidate.content.parts else []
                    text = "".join(part.text for part in parts if part.text and not part.thought)
                    if text:
                        text_seen = True
                        yield TextDelta(text)
                    if candidate.finish_reason is not None:
                        finish_reason = candidate.finish_reason
        except genai_errors.APIError as err:
            headers = getattr(getattr(err, "response", None), "headers", None)
            raise ProviderError(f"HTTP {err.code}", retry_after=retry_after_from_headers(headers)) from err
        except Exception as err:  # timeouts surface as TimeoutError, cut connections as aiohttp errors
            raise ProviderError(describe_failure(err)) from err
        if finish_reason is None:
            raise ProviderError("stream ended without a finish reason")
        if not text_seen:
            raise ProviderError("empty answer")
        yield Finished(
            confidence=confidence_from_logprobs([avg_logprobs]) if avg_logprobs is not None else None,
            input_tokens=token_count(input_tokens),
            output_tokens=token_count(output_tokens),
        )

    def warm_up(self) -> None:
        """Build the SDK's pydantic models now; built on first use they cost the first visitor after a failover ~40 ms."""
        if self._client is None:
            return
        try:
            self._build_sdk_models()
        except Exception as err:  # best effort: the first call builds whatever is left
            logger.warning("gemini warm-up incomplete: {}", type(err).__name__)

    def _build_sdk_models(self) -> None:
        types.GenerateContentConfig(max_output_tokens=1, http_options=types.HttpOptions(extra_body={"contents": []}))
        types.UserContent(parts=[types.Part(text="warm-up")])
        types.HttpResponse(headers={}, body="")
        _build_models(types.GenerateContentResponse, set())
        request_model = getattr(types, "_GenerateContentParameters", None)  # the SDK's request model, if still there
        if isinstance(request_model, type) and issubclass(request_model, pydantic.BaseModel):
            _build_models(request_model, set())

    async def aclose(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.aio.aclose()


def _build_models(model: type[pydantic.BaseModel], seen: set[type]) -> None:
    """Build a deferred pydantic model and every model its fields can hold."""
    if model in seen:
        return
    seen.add(model)
    model.model_rebuild(raise_errors=False)
    for field in model.model_fields.values():
        pending = [field.annotation]
        while pending:
            annotation = pending.pop()
            is_model = isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel)
            if is_model and annotation is not pydantic.BaseModel:
                _build_models(typing.cast(type[pydantic.BaseModel], annotation), seen)
            pending.extend(typing.get_args(annotation))
