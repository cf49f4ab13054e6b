"""Dense vectors for the knowledge base and the visitor's questions: offline (WordLlama) or remote (OpenAI).

`WordLlamaEmbedder` needs no network and no key: the `wordllama` wheel ships the 256-dimension `l2_supercat` token
embeddings and the Llama-2 tokenizer, and a question is embedded in tens of microseconds (tokenize, gather, average).
`OpenAIEmbedder` asks `text-embedding-3-small` (POST {OPENAI_BASE_URL}/embeddings); the entries' vectors are cached
on disk per (model, sha256(text)), so an entry is embedded again only when its text changes, and a question that
cannot be embedded in time falls back to the offline model (the retriever keeps both indexes).

Every vector is float32 and unit length, so a cosine similarity is one dot product (one matrix product per question).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import orjson
from cachetools import LRUCache
from yarl import URL

from server.ai.http import ProviderHTTP, env_proxy, provider_headers

Vectors = npt.NDArray[np.float32]

WORDLLAMA_CONFIG = "l2_supercat"
WORDLLAMA_DIM = 256
OPENAI_DEFAULT_BASE = "https://api.openai.com/v1"
OPENAI_BATCH = 256  # texts per embeddings request when the knowledge base is embedded
QUERY_VECTORS_KEPT = 4096  # remote question vectors remembered in memory (never on disk: they are visitors' words)


class Embedder(Protocol):
    """Turns texts into unit-length float32 vectors; `name` identifies the vector space (calibration is per space)."""

    name: str

    async def embed(self, texts: Sequence[str]) -> Vectors:
        """One row per text, unit length (a zero row for a text with nothing to embed)."""
        ...


def normalize_rows(matrix: npt.NDArray[Any]) -> Vectors:
    """Rows scaled to unit length (zero rows stay zero), as contiguous float32."""
    rows = np.ascontiguousarray(matrix, dtype=np.float32)
    if rows.ndim == 1:
        rows = rows.reshape(1, -1)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    np.divide(rows, norms, out=rows, where=norms > 0)
    return rows


class WordLlamaEmbedder:
    """The offline model: WordLlama's `l2_supercat` 256-d token embeddings, averaged, loaded from the wheel itself.

    wordllama's loader looks for the tokenizer in `<package>/tokenizer/`, but the wheel ships it in
    `<package>/tokenizers/`, which is where the loader's *cache* layout puts it (`<cache_dir>/tokenizers/`):
    pointing `cache_dir` at the installed package's own folder finds both files there, and `disable_download`
    turns any miss into an error instead of a request to Hugging Face. Nothing is fetched, ever.
    """

    def __init__(self) -> None:
        import wordllama  # imported here: only the processes that embed pay for it

        package = Path(wordllama.__file__).resolve().parent
        model = wordllama.WordLlama.load(config=WORDLLAMA_CONFIG, dim=WORDLLAMA_DIM, cache_dir=package, disable_download=True)
        self.name = f"wordllama-{WORDLLAMA_CONFIG}-{WORDLLAMA_DIM}"
        self._tokenizer = model.tokenizer
        self._tokenizer.no_padding()  # one question at a time: no padding to compute or mask away
        # The wheel's weights are float16; kept so (16 MB instead of 32 per process), averaged in float32.
        self._table: npt.NDArray[np.float16] = np.ascontiguousarray(model.embedding, dtype=np.float16)
        self._lock = threading.Lock()  # the tokenizer object is shared; calls from worker threads take turns

    async def embed(self, texts: Sequence[str]) -> Vectors:
        """As `embed_now` (nothing here waits on I/O)."""
        return self.embed_now(texts)

    def embed_now(self, texts: Sequence[str]) -> Vectors:
        """Average of each text's token vectors, unit length: the hot path calls this directly, with no await."""
        out = np.zeros((len(texts), self._table.shape[1]), dtype=np.float32)
        with self._lock:
            encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False) if texts else []
        last = self._table.shape[0] - 1
        for i, encoding in enumerate(encodings):
            ids = np.asarray(encoding.ids, dtype=np.int64)
            if ids.size:
                np.clip(ids, 0, last, out=ids)
                out[i] = self._table[ids].mean(axis=0, dtype=np.float32)
        return normalize_rows(out)


@functools.cache
def offline_embedder() -> WordLlamaEmbedder:
    """The process's one WordLlama model (16 MB of float16 token vectors), loaded on first use."""
    return WordLlamaEmbedder()


class VectorCache:
    """Entry vectors on disk (SQLite under DATA_DIR), keyed by (model, sha256(text)): an entry whose text is
    unchanged is never embedded again, across restarts."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS vectors (model TEXT NOT NULL, sha256 TEXT NOT NULL, vector BLOB NOT NULL,"
            " PRIMARY KEY (model, sha256))"
        )
        self._db.commit()
        self._lock = threading.Lock()

    def get(self, model: str, digests: Sequence[str]) -> dict[str, Vectors]:
        """The cached vectors among these digests."""
        found: dict[str, Vectors] = {}
        with self._lock:
            for digest in digests:
                row = self._db.execute("SELECT vector FROM vectors WHERE model = ? AND sha256 = ?", (model, digest)).fetchone()
                if row is not None:
                    found[digest] = np.frombuffer(row[0], dtype=np.float32).copy()
        return found

    def put(self, model: str, vectors: dict[str, Vectors]) -> None:
        """Remember vectors by digest."""
        with self._lock:
            self._db.executemany(
                "INSERT OR REPLACE INTO vectors (model, sha256, vector) VALUES (?, ?, ?)",
                [(model, digest, np.asarray(v, dtype=np.float32).tobytes()) for digest, v in vectors.items()],
            )
            self._db.commit()

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()


def digest(text: str) -> str:
    """The cache key of a text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class OpenAIEmbedder:
    """`text-embedding-3-small` (or OPENAI_EMBEDDING_MODEL) over the direct transport's HTTP pool.

    `embed` raises on any failure (HTTP status, timeout, a malformed answer): the retriever then uses the
    offline model. Entry vectors are cached on disk (`VectorCache`), question vectors in a bounded memory LRU.
    """

    def __init__(
        self,
        http: ProviderHTTP,
        api_key: str,
        *,
        model: str = "text-embedding-3-small",
        base_url: str | None = None,
        timeout: float = 1.0,
        cache: VectorCache | None = None,
    ) -> None:
        self.name = f"openai-{model}"
        self.model = model
        self.timeout = timeout
        self._http = http
        self._url = URL((base_url or OPENAI_DEFAULT_BASE).rstrip("/") + "/embeddings")
        self._proxy = env_proxy(self._url)
        self._headers = provider_headers({"Authorization": f"Bearer {api_key}"})
        self._cache = cache
        self._recent: LRUCache[str, Vectors] = LRUCache(QUERY_VECTORS_KEPT)

    async def embed(self, texts: Sequence[str]) -> Vectors:
        """Vectors for the texts: from the caches, the rest in batched requests (each bounded by `timeout`)."""
        keys = [digest(text) for text in texts]
        known: dict[str, Vectors] = {k: self._recent[k] for k in keys if k in self._recent}
        if self._cache is not None and len(known) < len(keys):
            missing = [k for k in keys if k not in known]
            known.update(await asyncio.to_thread(self._cache.get, self.name, missing))
        todo = list(dict.fromkeys(text for text, key in zip(texts, keys, strict=True) if key not in known))
        fresh: dict[str, Vectors] = {}
        for start in range(0, len(todo), OPENAI_BATCH):
            batch = todo[start : start + OPENAI_BATCH]
            for text, vector in zip(batch, await self._request(batch), strict=True):
                fresh[digest(text)] = vector
        if fresh and self._cache is not None and len(texts) > 1:  # entries go to disk; a single question does not
            await asyncio.to_thread(self._cache.put, self.name, fresh)
        known.update(fresh)
        if len(texts) == 1:
            self._recent[keys[0]] = known[keys[0]]
        return normalize_rows(np.stack([known[k] for k in keys])) if keys else np.zeros((0, 0), np.float32)

    async def _request(self, texts: list[str]) -> list[Vectors]:
        body = orjson.dumps({"model": self.model, "input": texts, "encoding_format": "float"})
        async with asyncio.timeout(self.timeout if len(texts) == 1 else max(self.timeout, 30.0)):
            response = await self._http.post(self._url, body, self._headers, self.timeout, self._proxy)
            try:
                payload = orjson.loads(await response.read())
            finally:
                response.release()
        rows = sorted(payload["data"], key=lambda item: int(item["index"]))
        if len(rows) != len(texts):
            raise ValueError(f"{len(rows)} embeddings for {len(texts)} texts")
        return [np.asarray(row["embedding"], dtype=np.float32) for row in rows]
