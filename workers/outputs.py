"""What the engine hands back each step (per-choice deltas of token ids, never text), and what
the offline ``LLM`` returns (its text made by the one detokenizer, ``IncrementalDetokenizer``)."""

from __future__ import annotations

from dataclasses import dataclass

from kvtide.workers.request import RequestId
from kvtide.workers.sampler import SampledToken


@dataclass(frozen=True, slots=True)
class CompletionDelta:
    """What changed for one choice of one request during one step."""

    request_id: RequestId
    index: int
    """Choice index (0 .. n-1)."""
    token_ids: tuple[int, ...]
    logprobs: tuple[SampledToken, ...] = ()
    """One entry per new token, when the request asked for logprobs."""
    finish_reason: str | None = None
    """None while running; then "stop", "length", "abort" or "error"."""
    stop_reason: str | int | None = None
    """The stop string or stop token id that ended it (None for EOS or other reasons)."""
    error: str | None = None
    """What went wrong, when finish_reason is "error"."""
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    """Prompt tokens served from the prefix cache."""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True, slots=True)
class Completion:
    """A finished choice, as the offline ``LLM.generate`` returns it."""

    index: int
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str
    stop_reason: str | int | None
    logprobs: tuple[SampledToken, ...]


@dataclass(frozen=True, slots=True)
class RequestOutput:
    request_id: RequestId
    prompt_token_ids: tuple[int, ...]
    outputs: tuple[Completion, ...]
    num_cached_tokens: int
