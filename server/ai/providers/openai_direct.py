"""OpenAI (and any OpenAI-compatible server) over the shared HTTP pool: Chat Completions spoken directly, no SDK."""

from __future__ import annotations

from yarl import URL

from server.ai.http import ProviderHTTP, provider_headers
from server.ai.providers.base import ProviderRequest
from server.ai.providers.direct import DirectProvider, WireStream
from server.ai.providers.openai_wire import ChatCompletionsBody, ChatCompletionsStream

DEFAULT_BASE_URL = "https://api.openai.com/v1"  # the SDK's default


class OpenAIDirectProvider(DirectProvider):
    """The primary provider on the direct transport (OPENAI_CLIENT=direct, the default); failover is the retry."""

    name = "openai"

    def __init__(self, http: ProviderHTTP, api_key: str | None, model: str, base_url: str | None, timeout: float) -> None:
        self.model = model
        self._body = ChatCompletionsBody(model)
        url = URL((base_url or DEFAULT_BASE_URL).rstrip("/") + "/chat/completions")
        headers = provider_headers({"Authorization": f"Bearer {api_key}"}) if api_key else None
        super().__init__(http, url, headers, timeout)

    def encode(self, request: ProviderRequest) -> bytes:
        return self._body.encode(request)

    def wire_stream(self) -> WireStream:
        return ChatCompletionsStream()
