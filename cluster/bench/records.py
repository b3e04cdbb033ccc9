"""One record per request, and how a request is measured into it.

Times are seconds on ``time.perf_counter`` (monotonic), relative to the start of the load
point (``start_s``) or of the request (the rest). A record is written whether the request
succeeded or not; ``error_code`` is None exactly when it succeeded.

Inter-token latency: the gap between two consecutive streamed messages that carried tokens.
A message carrying k > 1 tokens (gRPC says how many) contributes its gap divided by k, k times,
so ``len(itl_s) == sum(tokens per message) - 1`` over gRPC. Over HTTP a message with text counts
as one token (the servers measured here stream one token per event); ``osl`` then comes from the
server's usage report when it sends one, so ``len(itl_s)`` may be below ``osl - 1`` when some
tokens arrived without text.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from kvtide.cluster.bench.backends import Backend, BenchRequest
from kvtide.cluster.bench.sse import StreamError


@dataclass(frozen=True)
class RequestRecord:
    target: str
    point: str
    """The load point, e.g. ``concurrency=8``, ``rate=2`` or ``trace``."""
    session_id: int
    turn: int
    pattern: str
    warmup: bool
    """Sent during warm-up: written, but left out of every statistic."""
    start_s: float
    isl: int
    """Input tokens: the server's count when it reports usage, else ``isl_target``."""
    isl_target: int
    """Input tokens of the prompt sent, by the bench's tokenizer."""
    osl_target: int
    osl: int
    """Output tokens received."""
    ttft_s: float | None
    itl_s: tuple[float, ...]
    e2e_s: float
    """Send to end of stream (or to the error)."""
    error_code: str | None = None
    error_message: str | None = None
    cached_tokens: int | None = None
    """Prompt tokens the server served from its prefix cache, when it says."""

    @property
    def ok(self) -> bool:
        return self.error_code is None

    @property
    def end_s(self) -> float:
        return self.start_s + self.e2e_s

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first (None with fewer than 2 tokens)."""
        if self.ttft_s is None or self.osl < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.osl - 1)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))

    @classmethod
    def from_dict(cls, row: dict) -> RequestRecord:
        row = dict(row)
        row["itl_s"] = tuple(row.get("itl_s", ()))
        return cls(**row)


@dataclass(frozen=True)
class Outcome:
    """What measuring one request gave, before it is labelled into a record."""

    start_s: float
    ttft_s: float | None
    itl_s: tuple[float, ...]
    e2e_s: float
    num_tokens: int
    text: str
    prompt_tokens: int | None
    completion_tokens: int | None
    cached_tokens: int | None
    error: StreamError | None


async def measure(backend: Backend, request: BenchRequest, t0: float,
                  clock: Callable[[], float] = time.perf_counter) -> Outcome:  # fmt: skip
    """Send one request and time every streamed message. ``t0`` is the load point's start."""
    start = clock()
    first: float | None = None
    last = 0.0
    gaps: list[float] = []
    texts: list[str] = []
    num_tokens = 0
    prompt_tokens = completion_tokens = cached = None
    error = None
    try:
        async for chunk in backend.stream(request):
            now = clock()
            if chunk.num_tokens > 0:
                if first is None:
                    first = now
                    gaps.extend([0.0] * (chunk.num_tokens - 1))
                else:
                    share = (now - last) / chunk.num_tokens
                    gaps.extend([share] * chunk.num_tokens)
                last = now
                num_tokens += chunk.num_tokens
            if chunk.text:
                texts.append(chunk.text)
            if chunk.completion_tokens is not None:
                prompt_tokens, completion_tokens = chunk.prompt_tokens, chunk.completion_tokens
                cached = chunk.cached_tokens
    except StreamError as exc:
        error = exc
    end = clock()
    ttft = None if first is None else first - start
    return Outcome(start - t0, ttft, tuple(gaps), end - start, num_tokens, "".join(texts), prompt_tokens,
                   completion_tokens, cached, error)  # fmt: skip


def write_records(path: Path, records: Iterable[RequestRecord]) -> None:
    with Path(path).open("a") as f:
        for r in records:
            f.write(r.to_json() + "\n")


def read_records(path: Path) -> Iterator[RequestRecord]:
    with Path(path).open() as f:
        for line in f:
            if line.strip():
                yield RequestRecord.from_dict(json.loads(line))
