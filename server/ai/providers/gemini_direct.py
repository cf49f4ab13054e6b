"""Google Gemini over the shared HTTP pool: `streamGenerateContent?alt=sse` spoken directly, no SDK."""

from __future__ import annotations

from yarl import URL

from server.ai.http import ProviderHTTP, provider_headers
from server.ai.providers.base import ProviderRequest
from server.ai.providers.direct import DirectProvider, WireStream
from server.ai.providers.gemini_wire import GenerateContentStream, encode_body, model_path

DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com/"  # the SDK's default, with its API version
API_VERSION = "v1"


class GeminiDirectProvider(DirectProvider):
    """The first fallback on the direct transport (GEMINI_CLIENT=direct, the default); one attempt per call."""

    name = "gemini"

    def __init__(self, http: ProviderHTTP, api_key: str | None, model: str, base_url: str | None, timeout: float) -> None:
        self.model = model
        base = (base_url or DEFAULT_BASE_URL).rstrip("/")
        url = URL(f"{base}/{API_VERSION}/{model_path(model)}:streamGenerateContent?alt=sse")
        headers = provider_headers({"x-goog-api-key": api_key.strip()}) if api_key else None
        super().__init__(http, url, headers, timeout)

    def encode(self, request: ProviderRequest) -> bytes:
        return encode_body(request)

    def wire_stream(self) -> WireStream:
        return GenerateContentStream()
