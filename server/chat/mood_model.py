"""How upset a visitor's message reads to a model (SENTIMENT_MODEL=provider): one small Chat Completions call.

The call starts when the message is prepared and runs beside the answer; the Finisher awaits it (bounded by
SENTIMENT_MODEL_TIMEOUT from its start) only where the escalation is decided. Any failure, a timeout or no key
gives None: the lexicon (sentiment.py) decides. Scores are kept per normalised text in a bounded LRU; the
classification never reaches the room.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import orjson
from cachetools import LRUCache
from loguru import logger
from yarl import URL

from server.ai.http import ProviderHTTP, env_proxy, provider_headers
from server.chat.sentiment import SCORED_CHARS, SCORES_KEPT

DEFAULT_BASE_URL = "https://api.openai.com/v1"
METRICS_LABEL = "openai-sentiment"  # support_provider_requests{provider=...}: counted apart from the answers
MAX_TOKENS = 16  # {"upset": 0.85} is about eight tokens
# The fixed instruction (the provider double recognises a classification request by its first words).
INSTRUCTION = (
    "Rate how upset the customer's message to an online store's support chat reads. "
    'Answer with a JSON object only: {"upset": <a number from 0 to 1>}, where 0 is calm or neutral and 1 is '
    "clearly angry, distressed or insulting. Rate the tone, not the topic: a problem described calmly is not upset."
)

Scored = asyncio.Task[float | None]


class MoodModel:
    """The configured OpenAI model (OPENAI_MODEL, OPENAI_BASE_URL) over the shared HTTP pool, as a classifier."""

    def __init__(
        self,
        http: ProviderHTTP,
        api_key: str | None,
        model: str,
        base_url: str | None,
        *,
        timeout: float = 2.0,
        record_attempt: Callable[[str, bool, float], None] | None = None,
        kept: int = SCORES_KEPT,
    ) -> None:
        self.model = model
        self.timeout = timeout
        self._http = http
        self._url = URL((base_url or DEFAULT_BASE_URL).rstrip("/") + "/chat/completions")
        self._proxy = env_proxy(self._url)
        self._headers = provider_headers({"Authorization": f"Bearer {api_key}"}) if api_key else None
        self._record = record_attempt
        self._scores: LRUCache[str, float] = LRUCache(kept)
        self._running: set[Scored] = set()  # a reference to each call in flight (the loop keeps only weak ones)
        head = {"model": model, "response_format": {"type": "json_object"}, "max_tokens": MAX_TOKENS, "temperature": 0}
        self._head = orjson.dumps(head)[:-1] + b',"messages":'

    def start(self, text: str) -> Scored | None:
        """Start classifying a message (None: no key, or nothing to classify); a known text is answered at once."""
        key = " ".join(text[:SCORED_CHARS].split())
        if not key:
            return None
        if self._headers is None:
            logger.debug("sentiment model: no OpenAI key, the lexicon decides")
            return None
        task = asyncio.create_task(self._score(key), name="sentiment-model")
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        return task

    async def _score(self, key: str) -> float | None:
        """The model's score of one normalised text, from the cache or one call; None on any failure."""
        known = self._scores.get(key)
        if known is not None:
            return known
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout):
                upset = await self._call(key)
        except Exception as err:  # timeout, status, connection, malformed answer: the lexicon decides
            self._count(True, started)
            logger.debug("sentiment model failed ({}): the lexicon decides", _describe(err))
            return None
        self._count(False, started)
        self._scores[key] = upset
        return upset

    async def _call(self, key: str) -> float:
        messages = [{"role": "system", "content": INSTRUCTION}, {"role": "user", "content": key}]
        body = self._head + orjson.dumps(messages) + b"}"
        assert self._headers is not None
        response = await self._http.post(self._url, body, self._headers, self.timeout, self._proxy)
        try:
            payload = orjson.loads(await response.read())
        finally:
            response.release()
        content = payload["choices"][0]["message"]["content"]
        upset = orjson.loads(content)["upset"]
        if isinstance(upset, bool) or not isinstance(upset, int | float):
            raise ValueError("upset is not a number")
        return min(1.0, max(0.0, float(upset)))

    def _count(self, failed: bool, started: float) -> None:
        if self._record is not None:
            self._record(METRICS_LABEL, failed, time.perf_counter() - started)


async def settled(scored: Scored | None) -> float | None:
    """The score of a started classification (bounded by its own timeout), None when it failed or was cancelled."""
    if scored is None or scored.cancelled():
        return None
    try:
        return await asyncio.shield(scored)
    except asyncio.CancelledError:
        if scored.cancelled():  # the call was cancelled (shutdown), not the waiter
            return None
        raise


def _describe(err: BaseException) -> str:
    """A failure's reason for the debug log (never the message's text)."""
    return "timeout" if isinstance(err, TimeoutError) else (str(err) or type(err).__name__)[:200]
