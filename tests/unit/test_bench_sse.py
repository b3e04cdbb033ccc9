"""The bench's SSE parser and its reading of OpenAI stream events."""

from __future__ import annotations

import json

import pytest

from kvtide.cluster.bench.sse import Chunk, SSEEvent, SSEParser, StreamError, openai_chunk


def _stream(*events: dict | str, sep: bytes = b"\n") -> bytes:
    out = b""
    for e in events:
        data = e if isinstance(e, str) else json.dumps(e, ensure_ascii=False)
        out += b"data: " + data.encode() + sep + sep
    return out


def _feed_split(raw: bytes, cuts: list[int]) -> list[SSEEvent]:
    parser, events, last = SSEParser(), [], 0
    for cut in [*cuts, len(raw)]:
        events += parser.feed(raw[last:cut])
        last = cut
    return events


COMPLETION = [
    {"choices": [{"index": 0, "text": " Alice", "finish_reason": None}]},
    {"choices": [{"index": 0, "text": " était là — ✓", "finish_reason": None}]},
    {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2}},
    "[DONE]",
]


@pytest.mark.parametrize("sep", [b"\n", b"\r\n", b"\r"])
def test_every_split_point_gives_the_same_events(sep):
    """Including splits inside a multi-byte character and between CR and LF."""
    raw = _stream(*COMPLETION, sep=sep)
    whole = SSEParser().feed(raw)
    assert [e.data for e in whole][-1] == "[DONE]" and len(whole) == 4
    for cut in range(1, len(raw)):
        assert _feed_split(raw, [cut]) == whole, cut
    assert _feed_split(raw, list(range(1, len(raw)))) == whole  # one byte at a time


def test_comments_multiline_data_event_names_and_no_space_after_colon():
    raw = b": keep-alive\n\nevent: error\ndata:{\"a\":\ndata: 1}\n\ndata: x\n"
    events = SSEParser().feed(raw)
    assert events == [SSEEvent('{"a":\n1}', "error")]  # the last event has no blank line yet


def test_openai_chunks_count_text_events_as_tokens_and_read_usage():
    events = SSEParser().feed(_stream(*COMPLETION))
    chunks = [openai_chunk(e) for e in events]
    assert [c.num_tokens for c in chunks] == [1, 1, 0, 0]
    assert chunks[1].text == " était là — ✓"
    assert (chunks[2].prompt_tokens, chunks[2].completion_tokens) == (7, 2)
    assert chunks[3] == Chunk(0, done=True)


def test_chat_deltas_role_only_first_event_is_not_a_token():
    role = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
    word = {"choices": [{"index": 0, "delta": {"content": "Hi"}}]}
    other_choice = {"choices": [{"index": 1, "delta": {"content": "no"}}]}
    cached = {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 1,
                                       "prompt_tokens_details": {"cached_tokens": 8}}}  # fmt: skip
    chunks = [openai_chunk(SSEEvent(json.dumps(e))) for e in (role, word, other_choice, cached)]
    assert [c.num_tokens for c in chunks] == [0, 1, 0, 0]
    assert chunks[3].cached_tokens == 8


def test_error_events_raise_with_the_servers_code_and_message():
    kvtide_style = {"error": {"message": "the replica failed", "type": "InternalServerError", "code": 500}}
    with pytest.raises(StreamError) as info:
        openai_chunk(SSEEvent(json.dumps(kvtide_style)))
    assert (info.value.code, info.value.message) == ("500", "the replica failed")
    with pytest.raises(StreamError, match="stream_error: overloaded"):
        openai_chunk(SSEEvent(json.dumps({"error": "overloaded"})))
    with pytest.raises(StreamError, match="bad_event: stream event is not JSON"):
        openai_chunk(SSEEvent("{not json"))
