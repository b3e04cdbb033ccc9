"""Server-sent events, parsed incrementally from the bytes a streaming response delivers.

``SSEParser.feed`` takes chunks exactly as the transport hands them over (an event, a line or
even a UTF-8 character may be split across two reads) and returns the events completed so far.
It follows the WHATWG rules the OpenAI streaming APIs use: lines end in LF, CRLF or CR;
``data:`` lines of one event are joined with LF; a blank line dispatches the event; lines
starting with ``:`` are comments; one space after the colon is dropped.

``openai_chunk`` interprets one event of an OpenAI completions or chat completions stream.
"""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass(frozen=True)
class SSEEvent:
    data: str
    event: str = "message"


class SSEParser:
    def __init__(self) -> None:
        self._buf = b""
        self._data: list[str] = []
        self._event = ""
        self._cr_pending = False  # the last chunk ended in CR: a following LF belongs to it

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        if self._cr_pending and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        self._cr_pending = chunk.endswith(b"\r")
        buf = self._buf + chunk
        events: list[SSEEvent] = []
        start = 0
        while True:
            cut = _line_end(buf, start)
            if cut < 0:
                break
            line = buf[start:cut]
            step = 2 if buf[cut : cut + 2] == b"\r\n" else 1
            start = cut + step
            self._line(line.decode("utf-8"), events)
        self._buf = buf[start:]
        return events

    def _line(self, line: str, events: list[SSEEvent]) -> None:
        if not line:
            if self._data:
                events.append(SSEEvent("\n".join(self._data), self._event or "message"))
            self._data, self._event = [], ""
            return
        if line.startswith(":"):
            return
        field, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if field == "data":
            self._data.append(value)
        elif field == "event":
            self._event = value


def _line_end(buf: bytes, start: int) -> int:
    """Index of the first CR or LF at or after ``start``, -1 if none."""
    lf, cr = buf.find(b"\n", start), buf.find(b"\r", start)
    if cr < 0:
        return lf
    if lf < 0:
        return cr
    return min(lf, cr)


@dataclass(frozen=True)
class Chunk:
    """What one streamed message carried, for the measurements."""

    num_tokens: int
    """Tokens it delivered: exact over gRPC; over HTTP 1 when it carries text, else 0."""
    text: str = ""
    prompt_tokens: int | None = None
    """From a usage report, when the server sent one."""
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    done: bool = False


class StreamError(Exception):
    """The server failed the request: ``code`` is an HTTP status or gRPC code name."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


def openai_chunk(event: SSEEvent) -> Chunk:
    """One OpenAI stream event as a ``Chunk``. Raises ``StreamError`` for an error event (the
    ``{"error": {...}}`` object servers send once the 200 is out) or a body that is not JSON."""
    if event.data.strip() == "[DONE]":
        return Chunk(0, done=True)
    try:
        obj = json.loads(event.data)
    except json.JSONDecodeError as exc:
        raise StreamError("bad_event", f"stream event is not JSON: {event.data[:200]!r}") from exc
    if event.event == "error" or "error" in obj:
        err = obj.get("error", obj)
        if isinstance(err, dict):
            raise StreamError(str(err.get("code") or err.get("type") or "stream_error"), str(err.get("message", err)))
        raise StreamError("stream_error", str(err))
    text = ""
    for choice in obj.get("choices") or ():
        if choice.get("index", 0) != 0:
            continue
        delta = choice.get("delta")
        piece = delta.get("content") if isinstance(delta, dict) else choice.get("text")
        text += piece or ""
    usage = obj.get("usage") or {}
    details = usage.get("prompt_tokens_details") or {}
    return Chunk(
        1 if text else 0,
        text,
        usage.get("prompt_tokens"),
        usage.get("completion_tokens"),
        details.get("cached_tokens"),
    )
