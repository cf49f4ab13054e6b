"""A provider test double: OpenAI Chat Completions and Gemini generateContent over real HTTP.

The real SDKs and the direct transport talk to it; tests steer it with `set_mode`. Run it standalone for benchmarks:
`python -m devtools.provider_double --port 9001` (steer with POST /_control/mode).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import hashlib
import json
import math
import random
import re
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

PROVIDERS = ("openai", "gemini")
# A Chat Completions request whose system message starts so is the server's sentiment classification
# (server/chat/mood_model.py, SENTIMENT_MODEL=provider): it is answered and recorded as "sentiment", steered with
# set_mode("sentiment", ...): `ok` with `upset` (a number; default 0.0) or `scores` ({text fragment: number}, the
# first fragment found in the message wins), `content` (the answer's raw text), `malformed`, and the faults of
# every mode (`status`, `hang`, `delay`, `flaky`).
SENTIMENT_INSTRUCTION = "Rate how upset"


@dataclass
class Mode:
    """How one provider behaves for the next requests."""

    name: str = "ok"
    options: dict[str, Any] = field(default_factory=dict)


class ProviderDouble:
    """Fake OpenAI + Gemini HTTP endpoint that tests steer."""

    def __init__(self, keepalive_timeout: float = 75.0) -> None:
        self.modes: dict[str, Mode] = {p: Mode() for p in PROVIDERS}
        self.requests: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.closed_early: dict[str, int] = defaultdict(int)
        # Requests refused by closing their (reused) connection unanswered, as a server closing an idle one does.
        self.dropped: dict[str, int] = defaultdict(int)
        self._keepalive_timeout = keepalive_timeout  # seconds before the server closes an idle keep-alive connection
        self._served: set[Any] = set()  # the client addresses of connections that have carried a request
        self._closed_events: dict[str, asyncio.Event] = {}
        self._runner: web.AppRunner | None = None
        self._port = 0
        self._stopping = asyncio.Event()
        self.app = web.Application()
        self.app.router.add_post("/v1/chat/completions", self._openai)
        self.app.router.add_post("/v1/embeddings", self._embeddings)
        self.app.router.add_post("/{version}/models/{model}:generateContent", self._gemini)
        self.app.router.add_post("/{version}/models/{model}:streamGenerateContent", self._gemini)
        self.app.router.add_post("/_control/mode", self._control_mode)
        self.app.router.add_post("/_control/reset", self._control_reset)
        self.app.router.add_get("/_control/requests", self._control_requests)

    # Lifecycle --------------------------------------------------------------------------
    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Listen on loopback (port 0 picks a free one)."""
        self._runner = web.AppRunner(
            self.app, handle_signals=False, shutdown_timeout=0.5, keepalive_timeout=self._keepalive_timeout
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self._port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def close(self) -> None:
        """Stop, releasing any request left hanging."""
        self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    @property
    def openai_base_url(self) -> str:
        return self.url + "/v1"

    @property
    def gemini_base_url(self) -> str:
        return self.url

    # Steering ---------------------------------------------------------------------------
    def set_mode(self, provider: str, mode: str, **options: Any) -> None:
        """Set how "openai", "gemini" or "both" answer from now on."""
        for name in PROVIDERS if provider == "both" else (provider,):
            self.modes[name] = Mode(mode, options)

    def reset(self) -> None:
        """Both providers back to normal answers, records cleared."""
        self.modes = {p: Mode() for p in PROVIDERS}
        self.requests.clear()
        self.closed_early.clear()
        self.dropped.clear()

    async def wait_closed_early(self, provider: str, timeout: float = 5) -> bool:
        """Whether a client closed one of this provider's streams before its end."""
        if self.closed_early[provider]:
            return True
        event = self._closed_events.setdefault(provider, asyncio.Event())
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def _mark_closed_early(self, provider: str) -> None:
        self.closed_early[provider] += 1
        self._closed_events.setdefault(provider, asyncio.Event()).set()

    # Answers ----------------------------------------------------------------------------
    @staticmethod
    def _tokens(mode: Mode, prompt: str) -> list[str]:
        count = mode.options.get("tokens")
        if count is not None:
            return [f"tok{i}" + (" " if i < count - 1 else "") for i in range(count)]
        reply = mode.options.get("reply") or f"Echo: {prompt}"
        words = reply.split(" ")
        return [w + (" " if i < len(words) - 1 else "") for i, w in enumerate(words)]

    def _logprob(self, mode: Mode) -> float:
        if mode.name == "low_logprobs":
            return -3.0
        return float(mode.options.get("logprob", -0.05))

    def _drop_reused(self, request: web.Request, provider: str) -> bool:
        """With `drop_reused`, a request on a connection that carried one before is dropped unanswered.

        That is what a client sees when a server closes an idle keep-alive connection just as a request is sent
        on it: the request never reached the application, and the connection is gone.
        """
        peer = request.transport.get_extra_info("peername") if request.transport is not None else None
        reused = peer in self._served
        self._served.add(peer)
        if not (reused and self.modes[provider].options.get("drop_reused")):
            return False
        self.dropped[provider] += 1
        request.transport.close()  # type: ignore[union-attr]
        return True

    async def _before_answer(self, request: web.Request, provider: str, mode: Mode) -> web.StreamResponse | None:
        """Faults that happen before any answer: status errors, hangs, dropped connections."""
        if mode.options.get("delay"):
            await asyncio.sleep(mode.options["delay"])
        if mode.options.get("delays"):  # one delay per request, in the order requests arrive
            await asyncio.sleep(mode.options["delays"].pop(0))
        if mode.name == "flaky":
            if random.random() >= float(mode.options.get("fail_rate", 0.5)):
                return None
            mode = Mode("status", {"status": int(mode.options.get("status", 500))})
        if mode.name == "status":
            status = int(mode.options.get("status", 500))
            headers = {}
            if mode.options.get("retry_after") is not None:
                headers["Retry-After"] = str(mode.options["retry_after"])
            if provider == "openai":
                body = {"error": {"message": f"fake error {status}", "type": "server_error", "code": status}}
            else:
                body = {"error": {"code": status, "message": f"fake error {status}", "status": "UNAVAILABLE"}}
            return web.json_response(body, status=status, headers=headers)
        if mode.name == "hang":
            await self._hang(request)
        return None

    async def _hang(self, request: web.Request) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await self._stopping.wait()
        raise ConnectionResetError("double stopping")

    def _record(self, provider: str, request: web.Request, body: Any, stream: bool) -> None:
        peer = request.transport.get_extra_info("peername") if request.transport is not None else None
        self.requests[provider].append(
            {"path": request.path, "body": body, "headers": dict(request.headers), "stream": stream, "peer": peer}
        )

    async def _openai(self, request: web.Request) -> web.StreamResponse:
        if self._drop_reused(request, "openai"):
            raise ConnectionResetError("dropped a reused connection")
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"error": {"message": "bad json"}}, status=400)
        if _classification(body):
            return await self._sentiment(request, body)
        stream = bool(body.get("stream"))
        self._record("openai", request, body, stream)
        if not request.headers.get("Authorization", "").startswith("Bearer ") or request.headers["Authorization"] == "Bearer ":
            return web.json_response({"error": {"message": "no key", "type": "auth", "code": 401}}, status=401)
        mode = self.modes["openai"]
        early = await self._before_answer(request, "openai", mode)
        if early is not None:
            return early
        prompt = next((m.get("content", "") for m in reversed(body.get("messages", [])) if m.get("role") == "user"), "")
        tokens = self._tokens(mode, prompt)
        if mode.name == "empty":
            tokens = []
        logprob = self._logprob(mode)
        want_logprobs = bool(body.get("logprobs"))
        model = body.get("model", "gpt-test")
        ident = f"chatcmpl-{uuid.uuid4().hex[:12]}"
        created = int(time.time())
        if not stream:
            if mode.name == "malformed":
                return web.Response(text="{this is not json", content_type="application/json")
            if mode.name == "cut":
                request.transport.close()  # type: ignore[union-attr]
                raise ConnectionResetError
            content = "".join(tokens)
            return web.json_response(
                {
                    "id": ident,
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": content},
                            "logprobs": {"content": [_lp(t, logprob) for t in tokens]} if want_logprobs else None,
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 10, "completion_tokens": len(tokens), "total_tokens": 10 + len(tokens)},
                }
            )

        def chunk(delta: dict[str, Any], finish: str | None = None, lps: list[str] | None = None) -> dict[str, Any]:
            return {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "delta": delta,
                        "logprobs": {"content": [_lp(t, logprob) for t in lps]} if (want_logprobs and lps) else None,
                        "finish_reason": finish,
                    }
                ],
            }

        events: list[bytes] = [_sse(chunk({"role": "assistant", "content": ""}))]
        events += [_sse(chunk({"content": t}, lps=[t])) for t in tokens]
        tail = [_sse(chunk({}, finish="stop"))]
        if (body.get("stream_options") or {}).get("include_usage"):
            tail.append(
                _sse(
                    {
                        "id": ident,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": model,
                        "choices": [],
                        "usage": {
                            # a `prompt_tokens` option sends any JSON value there (a malformed answer)
                            "prompt_tokens": mode.options.get("prompt_tokens", 10),
                            "completion_tokens": len(tokens),
                            "total_tokens": 10 + len(tokens),
                        },
                    }
                )
            )
        tail.append(b"data: [DONE]\n\n")
        if mode.name == "malformed":
            events = [b"data: {not json at all\n\n"]
            tail = []
        return await self._stream("openai", request, mode, events, tail)

    async def _sentiment(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        """A sentiment classification: a non-streaming answer whose content is the JSON object {"upset": score}."""
        self._record("sentiment", request, body, False)
        if not request.headers.get("Authorization", "").startswith("Bearer ") or request.headers["Authorization"] == "Bearer ":
            return web.json_response({"error": {"message": "no key", "type": "auth", "code": 401}}, status=401)
        mode = self.modes.get("sentiment", Mode())
        early = await self._before_answer(request, "openai", mode)
        if early is not None:
            return early
        if mode.name == "malformed":
            return web.Response(text="{this is not json", content_type="application/json")
        text = next((m.get("content", "") for m in reversed(body.get("messages", [])) if m.get("role") == "user"), "")
        upset = mode.options.get("upset", 0.0)
        for fragment, score in (mode.options.get("scores") or {}).items():
            if fragment.lower() in text.lower():
                upset = score
                break
        content = mode.options.get("content", json.dumps({"upset": upset}))
        return web.json_response(
            {
                "id": f"chatcmpl-{uuid.uuid4().hex[:12]}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", "gpt-test"),
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": content}, "logprobs": None, "finish_reason": "stop"}
                ],
                "usage": {"prompt_tokens": 60, "completion_tokens": 8, "total_tokens": 68},
            }
        )

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        """OpenAI's POST /v1/embeddings: deterministic vectors (a hashed bag of words), steered as "embeddings"."""
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"error": {"message": "bad json"}}, status=400)
        self._record("embeddings", request, body, False)
        if not request.headers.get("Authorization", "").startswith("Bearer ") or request.headers["Authorization"] == "Bearer ":
            return web.json_response({"error": {"message": "no key", "type": "auth", "code": 401}}, status=401)
        early = await self._before_answer(request, "openai", self.modes.get("embeddings", Mode()))
        if early is not None:
            return early
        texts = body.get("input", [])
        texts = [texts] if isinstance(texts, str) else list(texts)
        data = [{"object": "embedding", "index": i, "embedding": hashed_vector(t)} for i, t in enumerate(texts)]
        tokens = sum(len(t.split()) for t in texts)
        return web.json_response(
            {
                "object": "list",
                "data": data,
                "model": body.get("model", "text-embedding-3-small"),
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    async def _gemini(self, request: web.Request) -> web.StreamResponse:
        if self._drop_reused(request, "gemini"):
            raise ConnectionResetError("dropped a reused connection")
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"error": {"code": 400, "message": "bad json", "status": "INVALID_ARGUMENT"}}, status=400)
        stream = request.path.endswith(":streamGenerateContent")
        self._record("gemini", request, body, stream)
        if not (request.headers.get("x-goog-api-key") or request.query.get("key")):
            return web.json_response({"error": {"code": 401, "message": "no key", "status": "UNAUTHENTICATED"}}, status=401)
        mode = self.modes["gemini"]
        early = await self._before_answer(request, "gemini", mode)
        if early is not None:
            return early
        contents = body.get("contents") or []
        prompt = ""
        for content in reversed(contents):
            if content.get("role", "user") == "user":
                prompt = "".join(p.get("text", "") for p in content.get("parts", []))
                break
        tokens = [] if mode.name == "empty" else self._tokens(mode, prompt)
        logprob = self._logprob(mode)
        model = request.match_info["model"]
        usage = {
            "promptTokenCount": mode.options.get("prompt_tokens", 10),  # any JSON value: a malformed answer
            "candidatesTokenCount": len(tokens),
            "totalTokenCount": 10 + len(tokens),
        }

        def response(text: str, finish: bool) -> dict[str, Any]:
            candidate: dict[str, Any] = {"content": {"parts": [{"text": text}], "role": "model"}, "index": 0}
            if finish:
                candidate["finishReason"] = "STOP"
                if mode.name != "no_logprobs":
                    candidate["avgLogprobs"] = logprob
            out: dict[str, Any] = {"candidates": [candidate], "modelVersion": model}
            if finish:
                out["usageMetadata"] = usage
            return out

        if not stream:
            if mode.name == "malformed":
                return web.Response(text="{this is not json", content_type="application/json")
            if mode.name == "cut":
                request.transport.close()  # type: ignore[union-attr]
                raise ConnectionResetError
            return web.json_response(response("".join(tokens), True))
        events = [_sse(response(t, False), crlf=True) for t in tokens[:-1]]
        tail = [_sse(response(tokens[-1] if tokens else "", True), crlf=True)]
        if mode.name == "malformed":
            events, tail = [b"data: {not json at all\r\n\r\n"], []
        if mode.name == "no_finish" and tokens:
            events = [_sse(response(t, False), crlf=True) for t in tokens]
        return await self._stream("gemini", request, mode, events, tail)

    async def _stream(
        self, provider: str, request: web.Request, mode: Mode, events: list[bytes], tail: list[bytes]
    ) -> web.StreamResponse:
        """Write an SSE body, applying the cut/stall/no_finish/slow/gzip/split behaviours."""
        headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        split = int(mode.options.get("split", 0))
        if mode.options.get("gzip") or split:
            # gzip: a proxy in front of the provider compressing the event stream. split: the body in pieces of
            # that many bytes, each its own write and read (frames, CRLFs and characters cut anywhere).
            body = b"".join(events + tail)
            if mode.options.get("gzip"):
                headers["Content-Encoding"] = "gzip"
                body = gzip.compress(body)
            response = web.StreamResponse(headers=headers)
            await response.prepare(request)
            for start in range(0, len(body), split or len(body) or 1):
                await response.write(body[start : start + split] if split else body)
                if split:
                    await asyncio.sleep(float(mode.options.get("split_delay", 0.002)))
            await response.write_eof()
            return response
        response = web.StreamResponse(headers=headers)
        await response.prepare(request)
        after = int(mode.options.get("after", 3))
        chunk_delay = float(mode.options.get("chunk_delay", 0))
        limit = after + 1 if mode.name in ("cut", "stall", "no_finish") and provider == "openai" else after
        try:
            if mode.name not in ("cut", "stall", "no_finish") and not chunk_delay:
                # An instant answer arrives as one body write, as a fast model's first burst does; per-token
                # arrival is what chunk_delay is for.
                await response.write(b"".join(events + tail))
                await response.write_eof()
                return response
            loop = asyncio.get_running_loop()
            started = loop.time()
            for position, event in enumerate(events):
                if mode.name in ("cut", "stall", "no_finish") and position >= limit:
                    break
                await response.write(event)
                if chunk_delay:  # on a fixed schedule, so 10 ms means 100 tokens/s however long a write takes
                    await asyncio.sleep(max(0.0, started + (position + 1) * chunk_delay - loop.time()))
            if mode.name == "cut":
                request.transport.close()  # type: ignore[union-attr]
                return response
            if mode.name == "stall":
                await self._hang(request)
            if mode.name == "no_finish":
                await response.write_eof()
                return response
            for event in tail:
                await response.write(event)
            await response.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            self._mark_closed_early(provider)
            raise
        return response

    # Control API for another process ----------------------------------------------------
    async def _control_mode(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.set_mode(body["provider"], body["mode"], **(body.get("options") or {}))
        return web.json_response({"ok": True})

    async def _control_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"ok": True})

    async def _control_requests(self, request: web.Request) -> web.Response:
        return web.json_response({p: len(self.requests[p]) for p in PROVIDERS})


EMBEDDING_DIM = 64


def hashed_vector(text: str, dim: int = EMBEDDING_DIM) -> list[float]:
    """A deterministic unit vector for a text: its lowercased words hashed into `dim` buckets (texts sharing words
    are close, others orthogonal-ish), enough for tests of the remote embeddings path."""
    vector = [0.0] * dim
    for word in re.findall(r"[a-z0-9]+", text.lower()):
        bucket = int.from_bytes(hashlib.sha256(word.encode()).digest()[:4], "big") % dim
        vector[bucket] += 1.0
    norm = math.sqrt(sum(v * v for v in vector)) or 1.0
    return [v / norm for v in vector]


def _classification(body: Any) -> bool:
    """Whether a Chat Completions body is the server's sentiment classification (its fixed instruction)."""
    messages = body.get("messages") if isinstance(body, dict) else None
    if not messages or not isinstance(messages[0], dict) or messages[0].get("role") != "system":
        return False
    return str(messages[0].get("content", "")).startswith(SENTIMENT_INSTRUCTION)


def _lp(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": None, "top_logprobs": []}


def _sse(payload: dict[str, Any], crlf: bool = False) -> bytes:
    end = "\r\n\r\n" if crlf else "\n\n"
    return f"data: {json.dumps(payload)}{end}".encode()


async def _serve(host: str, port: int) -> None:
    double = ProviderDouble()
    await double.start(host, port)
    print(f"provider double on {double.url} (OpenAI base {double.openai_base_url}, Gemini base {double.gemini_base_url})")
    await asyncio.Event().wait()


def main() -> None:
    """Run the double on its own (benchmarks, manual tries)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9001)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.host, args.port))


if __name__ == "__main__":
    main()
