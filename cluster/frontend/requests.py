"""The frontend's settings and the shapes a request takes on its way through the gateway."""

from __future__ import annotations

import hmac
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvtide.workers import EngineRequest, SampledToken


@dataclass(frozen=True)
class FrontendConfig:
    max_in_flight: int = 256
    """Requests streaming from replicas at once; more wait for admission."""
    max_queued: int = 256
    """Requests waiting for admission; more are refused with RESOURCE_EXHAUSTED / 429."""
    retry_after_s: float = 1.0
    """The retry hint sent with an admission refusal."""
    api_keys: tuple[str, ...] = ()
    """Accepted bearer tokens; empty disables auth."""
    max_message_bytes: int = 4 * 2**20
    """Largest request body (gRPC message or HTTP body)."""
    max_prompts_per_request: int = 64
    """Prompts in one batched ``/v1/completions`` request (each is its own request inside)."""
    request_timeout_s: float | None = None
    """The server's deadline for every request, admission wait included (None: none). gRPC
    clients bring their own deadline as well, and the earlier one wins; over HTTP this is the
    only one the server knows. Past it: DEADLINE_EXCEEDED / 504, aborted on its replica."""
    tokenizer_threads: int = 2
    """Threads that tokenize and render chat templates, off the event loop."""
    max_migrations: int = 3
    """Times one request may move to another replica when the one serving it dies or fails its
    step; after that it fails with UNAVAILABLE (retryable)."""

    def __post_init__(self) -> None:
        if self.request_timeout_s is not None and not self.request_timeout_s > 0:
            raise ValueError(f"request_timeout_s must be > 0 (or None for no limit), got {self.request_timeout_s}")
        if self.tokenizer_threads < 1:
            raise ValueError(f"tokenizer_threads must be >= 1, got {self.tokenizer_threads}")


@dataclass(frozen=True)
class PreparedRequest:
    """A request checked and tokenized at the frontend: only token ids travel to a replica."""

    request: EngineRequest
    arrival_s: float = field(default_factory=time.perf_counter)

    @property
    def request_id(self) -> str:
        return self.request.request_id


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass(frozen=True)
class ChoiceDelta:
    """New tokens and text of one choice, as the client sees them."""

    index: int
    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[SampledToken, ...]
    finish_reason: str | None
    stop_reason: str | int | None
    replica_id: str
    usage: Usage | None = None
    """Set on the last delta of the request (every choice finished)."""


def api_key_ok(presented: str | None, api_keys: Sequence[str]) -> bool:
    """Whether ``presented`` ("Bearer <key>") carries one of ``api_keys``; constant time per key.
    No keys configured means auth is off."""
    if not api_keys:
        return True
    if not presented or not presented.startswith("Bearer "):
        return False
    token = presented[len("Bearer ") :].encode()
    # NOTE: compare against every key (no early exit), so timing says nothing about which matched.
    return sum(hmac.compare_digest(token, k.encode()) for k in api_keys) > 0
