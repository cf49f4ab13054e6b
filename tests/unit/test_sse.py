"""The direct transport's event-stream reading: frames split anywhere, CRLF, comments, and both APIs' chunks."""

from __future__ import annotations

import json
import math

import pytest

from server.ai.providers.base import ChatTurn, Finished, ProviderError, ProviderRequest, TextDelta
from server.ai.providers.gemini_wire import GenerateContentStream, StreamError, model_path
from server.ai.providers.openai_wire import ChatCompletionsBody, ChatCompletionsStream
from server.ai.providers.sse import MalformedStream, SSEParser


def feed_in_pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    """Every event of `data` fed to one parser cut at `cuts`, then its end."""
    parser = SSEParser()
    events: list[bytes] = []
    previous = 0
    for cut in [*cuts, len(data)]:
        events += parser.feed(data[previous:cut])
        previous = cut
    return events + parser.finish()


def every_split(data: bytes) -> list[list[int]]:
    """Each single cut, and the body byte by byte."""
    return [[cut] for cut in range(len(data) + 1)] + [list(range(1, len(data)))]


def openai_chunk(text: str | None = None, finish: str | None = None, logprob: float = -0.1) -> dict:
    delta = {} if text is None else {"content": text}
    logprobs = {"content": [{"token": text, "logprob": logprob}]} if text else None
    return {
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
    }


def sse(payload: object, end: str = "\n\n") -> bytes:
    return f"data: {json.dumps(payload, ensure_ascii=False)}{end}".encode()


OPENAI_BODY = (
    b": keep-alive comment\n\n"
    + sse(openai_chunk("Grüße, "))
    + b"event: message\nid: 7\nretry: 1000\n"
    + sse(openai_chunk("日本 🚀 "))
    + b":\n\n"  # an empty comment: a keep-alive line
    + sse(openai_chunk("done"))
    + sse(openai_chunk(finish="stop"))
    + sse({"object": "chat.completion.chunk", "choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 3}})
    + b"data: [DONE]\n\n"
)


# The parser on its own ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("line_end", [b"\n", b"\r\n", b"\r"], ids=["LF", "CRLF", "CR"])
def test_every_split_of_a_stream_gives_the_same_events(line_end: bytes) -> None:
    body = OPENAI_BODY.replace(b"\n", line_end)
    whole = feed_in_pieces(body, [])
    assert len(whole) == 6 and whole[-1] == b"[DONE]"
    assert json.loads(whole[1])["choices"][0]["delta"]["content"] == "日本 🚀 "
    for cuts in every_split(body):
        assert feed_in_pieces(body, cuts) == whole, cuts


def test_a_crlf_cut_between_its_two_bytes_is_one_line_end() -> None:
    parser = SSEParser()
    assert parser.feed(b'data: {"a":1}\r') == []
    assert parser.feed(b"\n\r") == []
    assert parser.feed(b"\n") == [b'{"a":1}']
    assert parser.finish() == []


def test_a_multibyte_character_cut_in_half_arrives_whole() -> None:
    body = sse({"text": "🚀"})
    cut = body.index("🚀".encode()) + 2
    parser = SSEParser()
    assert parser.feed(body[:cut]) == []
    (event,) = parser.feed(body[cut:])
    assert json.loads(event) == {"text": "🚀"}


def test_comments_keepalives_and_other_fields_are_no_events() -> None:
    parser = SSEParser()
    assert parser.feed(b": ping\n\n:\n\nevent: ping\n\nid: 3\nretry: 10\n\n\n\n") == []
    assert parser.feed(b"event: x\ndata: 1\nid: 4\n\n") == [b"1"]


def test_data_lines_join_with_newlines_and_lose_one_leading_space() -> None:
    parser = SSEParser()
    assert parser.feed(b"data:a\ndata:  b\ndata\n\n") == [b"a\n b\n"]


def test_a_byte_order_mark_at_the_start_is_dropped_even_when_split() -> None:
    parser = SSEParser()
    assert parser.feed(b"\xef\xbb") == []
    assert parser.feed(b"\xbfdata: 1\n\n") == [b"1"]


def test_an_event_without_its_blank_line_counts_at_the_end_of_the_body() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: 1\n\ndata: 2\n") == [b"1"]
    assert parser.finish() == [b"2"]
    parser = SSEParser()
    assert parser.feed(b"data: 3") == []
    assert parser.finish() == [b"3"]


# OpenAI chunks ------------------------------------------------------------------------------------------------
def read_openai(body: bytes, cuts: list[int]) -> tuple[list[TextDelta], ChatCompletionsStream]:
    reader = ChatCompletionsStream()
    deltas: list[TextDelta] = []
    previous = 0
    for cut in [*cuts, len(body)]:
        delta = reader.read(body[previous:cut])
        previous = cut
        if delta is not None:
            deltas.append(delta)
        if reader.done:
            return deltas, reader
    delta = reader.end()
    return deltas + ([delta] if delta is not None else []), reader


def test_openai_chunks_split_anywhere_give_the_same_answer() -> None:
    for cuts in every_split(OPENAI_BODY):
        deltas, reader = read_openai(OPENAI_BODY, cuts)
        assert "".join(d.text for d in deltas) == "Grüße, 日本 🚀 done", cuts
        assert sum(len(d.logprobs) for d in deltas) == 3
        assert reader.done
        finished = reader.finished()
        assert finished == Finished(confidence=pytest.approx(math.exp(-0.1)), input_tokens=12, output_tokens=3)


def test_openai_one_read_is_one_delta_with_its_logprobs() -> None:
    deltas, _ = read_openai(OPENAI_BODY, [])
    assert deltas == [TextDelta("Grüße, 日本 🚀 done", (-0.1, -0.1, -0.1))]


def test_openai_events_after_done_are_ignored() -> None:
    deltas, reader = read_openai(b"data: [DONE]\n\n" + sse(openai_chunk("late")), [])
    assert deltas == [] and reader.done


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"data: {not json\n\n", MalformedStream),
        (b"data: [1, 2]\n\n", MalformedStream),
        (sse({"error": {"message": "overloaded"}}), ProviderError),
    ],
)
def test_openai_malformed_and_error_events_fail(body: bytes, reason: type[Exception]) -> None:
    with pytest.raises(reason):
        ChatCompletionsStream().read(body)


def test_openai_a_stream_without_finish_or_text_is_no_answer() -> None:
    _, reader = read_openai(sse(openai_chunk("half")), [])
    with pytest.raises(ProviderError, match="without a finish reason"):
        reader.finished()
    _, reader = read_openai(sse(openai_chunk(finish="stop")) + b"data: [DONE]\n\n", [])
    with pytest.raises(ProviderError, match="empty answer"):
        reader.finished()


def test_openai_body_is_the_sdk_request() -> None:
    body = ChatCompletionsBody("gpt-x")
    request = ProviderRequest("be nice", [ChatTurn("user", "hi"), ChatTurn("assistant", "hello")], "ça va?", max_tokens=99)
    assert json.loads(body.encode(request)) == {
        "model": "gpt-x",
        "stream": True,
        "stream_options": {"include_usage": True},
        "logprobs": True,
        "messages": [
            {"role": "system", "content": "be nice"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "ça va?"},
        ],
        "max_tokens": 99,
    }
    assert "max_tokens" not in json.loads(body.encode(ProviderRequest("s", [], "m")))


# Gemini chunks ------------------------------------------------------------------------------------------------
def gemini_chunk(text: str, finish: bool = False, **extra: object) -> dict:
    candidate: dict = {"content": {"parts": [{"text": text}], "role": "model"}, "index": 0}
    if finish:
        candidate.update(finishReason="STOP", avgLogprobs=-0.2)
    return {"candidates": [candidate], **extra}


GEMINI_BODY = (
    sse(gemini_chunk("Hallo "), "\r\n\r\n")
    + sse({"candidates": [{"content": {"parts": [{"text": "(thinking)", "thought": True}, {"text": "wörld "}]}}]}, "\r\n\r\n")
    + sse(gemini_chunk("✓", finish=True, usageMetadata={"promptTokenCount": 9, "candidatesTokenCount": 4}), "\r\n\r\n")
)


def test_gemini_chunks_split_anywhere_give_the_same_answer_without_thoughts() -> None:
    for cuts in every_split(GEMINI_BODY):
        reader = GenerateContentStream()
        deltas: list[TextDelta] = []
        previous = 0
        for cut in [*cuts, len(GEMINI_BODY)]:
            if (delta := reader.read(GEMINI_BODY[previous:cut])) is not None:
                deltas.append(delta)
            previous = cut
        if (delta := reader.end()) is not None:
            deltas.append(delta)
        assert "".join(d.text for d in deltas) == "Hallo wörld ✓", cuts
        assert reader.finished() == Finished(confidence=pytest.approx(math.exp(-0.2)), input_tokens=9, output_tokens=4)


def test_gemini_an_error_object_in_the_stream_is_a_status_error() -> None:
    with pytest.raises(StreamError, match="HTTP 503"):
        GenerateContentStream().read(sse({"error": {"code": 503, "message": "overloaded", "status": "UNAVAILABLE"}}))


def test_gemini_no_logprobs_is_no_confidence_signal() -> None:
    reader = GenerateContentStream()
    reader.read(sse({"candidates": [{"content": {"parts": [{"text": "hi"}]}, "finishReason": "STOP"}]}))
    assert reader.finished() == Finished(confidence=None, input_tokens=0, output_tokens=0)


def test_gemini_model_names_are_qualified_once() -> None:
    assert model_path("gemini-2.5-flash") == "models/gemini-2.5-flash"
    assert model_path("models/gemini-2.5-flash") == "models/gemini-2.5-flash"
    assert model_path("tunedModels/mine") == "tunedModels/mine"
