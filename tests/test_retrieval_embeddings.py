"""EMBEDDINGS=openai: text-embedding-3-small over HTTP (the provider double's /v1/embeddings), cached on disk, with
the offline model as the fallback for a question that cannot be embedded in time."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from devtools.provider_double import ProviderDouble, hashed_vector
from server.ai.embeddings import OpenAIEmbedder, VectorCache
from server.ai.http import ProviderHTTP
from server.ai.hybrid import CALIBRATION_FILE, HybridRetriever
from server.ai.knowledge import KnowledgeBase
from server.ai.retrieval import Verdict
from server.app_keys import SETTINGS
from tests.clients import Http
from tests.servers import RunningServer

KB_DIR = Path(__file__).resolve().parents[1] / "config" / "knowledge"


def embedder(double: ProviderDouble, http: ProviderHTTP, tmp_path: Path, timeout: float = 2.0) -> OpenAIEmbedder:
    return OpenAIEmbedder(
        http,
        "sk-embed-key",
        base_url=double.openai_base_url,
        timeout=timeout,
        cache=VectorCache(tmp_path / "embeddings.sqlite3"),
    )


async def test_entries_are_embedded_once_and_again_only_when_their_text_changes(double: ProviderDouble, tmp_path: Path) -> None:
    http = ProviderHTTP()
    try:
        vectors = await embedder(double, http, tmp_path).embed(["Where is my order?", "Do you sell gift cards?"])
        assert vectors.shape == (2, 64)
        assert np.allclose(vectors[0], hashed_vector("Where is my order?"), atol=1e-6)
        (sent,) = double.requests["embeddings"]
        assert sent["body"] == {
            "model": "text-embedding-3-small",
            "input": ["Where is my order?", "Do you sell gift cards?"],
            "encoding_format": "float",
        }
        assert sent["headers"]["Authorization"] == "Bearer sk-embed-key" and sent["path"] == "/v1/embeddings"
        # A new process (new embedder, same DATA_DIR): the unchanged entry comes from disk, the changed one is asked.
        again = await embedder(double, http, tmp_path).embed(["Where is my order?", "Do you sell gift vouchers?"])
        assert np.allclose(again[0], vectors[0]) and len(double.requests["embeddings"]) == 2
        assert double.requests["embeddings"][1]["body"]["input"] == ["Do you sell gift vouchers?"]
    finally:
        await http.aclose()


async def test_the_retriever_uses_the_remote_model_and_falls_back_offline(double: ProviderDouble, tmp_path: Path) -> None:
    http = ProviderHTTP()
    kb = KnowledgeBase.from_directory(KB_DIR)
    retriever = HybridRetriever(kb, remote=embedder(double, http, tmp_path, timeout=0.5), remote_timeout=0.5)
    try:
        await retriever.prepare()
        assert len(double.requests["embeddings"][0]["body"]["input"]) == 2 * len(kb)  # two views per entry
        found = await retriever.retrieve("Do you sell gift cards?")
        assert double.requests["embeddings"][-1]["body"]["input"] == ["do you sell gift cards"]
        assert found.matches[0].entry.id == "payments-7"
        # The remote model fails or is too slow: the offline model answers the question, in time.
        double.set_mode("embeddings", "status", status=503)
        found = await retriever.retrieve("How do I return an item?")
        assert found.verdict == Verdict.ANSWER and found.matches[0].entry.id == "returns-2"
        double.set_mode("embeddings", "ok", delay=3)
        found = await retriever.retrieve("Can I send back a lamp I don't like?")
        assert found.verdict == Verdict.ANSWER and found.matches[0].entry.id == "returns-2"
    finally:
        await retriever.aclose()
        await http.aclose()


def calibrated_for_the_double(tmp_path: Path) -> Path:
    """The shipped calibration, with a section for the remote model too (as `eval/calibrate.py --embeddings openai`
    writes with a real key)."""
    document = json.loads(CALIBRATION_FILE.read_text())
    (section,) = document["models"].values()
    # The scope model's `topical` weights are fitted on the offline model's vectors and mean nothing on the double's:
    # the remote copy keeps every question in scope (what is tested here is the embeddings path, not the scope).
    document["models"]["openai-text-embedding-3-small"] = {mode: {**fit, "scope_threshold": 0.0} for mode, fit in section.items()}
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(document))
    return path


async def test_a_server_with_embeddings_openai_asks_the_embeddings_endpoint_with_its_key(
    start_server, double: ProviderDouble, http: Http, tmp_path: Path
) -> None:
    server: RunningServer = await start_server(
        embeddings="openai", ai_providers=("local",), calibration_file=calibrated_for_the_double(tmp_path)
    )
    session = await http.new_session(server.url, "visitor-1")
    status, body, _ = await http.post(
        f"{server.url}/api/v1/chat/message",
        {"sessionId": session["sessionId"], "message": "Do you sell gift cards?"},
        session["token"],
    )
    assert status == 200, body
    assert body["reply"]["provider"] == "local" and "gift cards" in body["reply"]["content"]
    sent = double.requests["embeddings"]
    assert sent and all(r["headers"]["Authorization"] == "Bearer sk-test-openai-key" for r in sent)
    assert (server.app[SETTINGS].data_dir / "embeddings.sqlite3").exists()


async def test_without_a_calibration_for_the_remote_model_the_offline_one_answers(
    start_server, double: ProviderDouble, http: Http
) -> None:
    server: RunningServer = await start_server(embeddings="openai", ai_providers=("local",))
    session = await http.new_session(server.url, "visitor-1")
    status, body, _ = await http.post(
        f"{server.url}/api/v1/chat/message",
        {"sessionId": session["sessionId"], "message": "Do you sell gift cards?"},
        session["token"],
    )
    assert status == 200 and "gift cards" in body["reply"]["content"] and body["reply"]["confidence"] >= 0.5
    assert not double.requests["embeddings"]
