"""What an engine accepts: a request of token ids and sampling params, checked once against the
engine's limits.

``check_request`` is the one validation of a request. The frontend calls it before routing
(with the ``RequestLimits`` its replicas reported), the offline ``LLM`` before adding; the
``EngineRequest`` it returns remembers the limits it was checked against, so an engine with the
same limits takes it as is and only re-checks a request built some other way (its guard).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kvtide.workers.sampling_params import SamplingParams

CHILD_SEPARATOR = "\x1f"
"""Joins a request id and a choice index into the id of the choice's own engine request."""


@dataclass(frozen=True)
class RequestLimits:
    """What a replica can take; every replica of a deployment reports the same."""

    max_model_len: int
    """Prompt plus output tokens."""
    vocab_size: int
    max_num_seqs: int
    """Sequences in one step: the most choices (``n``) one request may ask for."""
    num_blocks: int
    block_size: int

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)


@dataclass(frozen=True)
class EngineRequest:
    """A request as it crosses to a replica: token ids only, never text."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    checked: RequestLimits | None = None
    """The limits ``check_request`` checked it against; None when nothing has."""
    output_token_ids: tuple[int, ...] = ()
    """Tokens already generated for it elsewhere (a request moved off a replica that died): the
    engine recomputes their KV with the prompt's and goes on from there, as after a preemption.
    They count against ``params.max_tokens``, and the penalties see them as output."""

    def resumed(self, request_id: str, output_token_ids: tuple[int, ...]) -> EngineRequest:
        """This request, to go on after ``output_token_ids`` (under a new id), still checked."""
        return EngineRequest(request_id, self.prompt_token_ids, self.params, self.checked, output_token_ids)


def check_request(
    request_id: str,
    prompt_token_ids: Sequence[int],
    params: SamplingParams,
    limits: RequestLimits,
    output_token_ids: Sequence[int] = (),
) -> EngineRequest:
    """The checked request; raises ``ValueError`` naming the field, the value and the limit."""
    if not isinstance(request_id, str) or not request_id or CHILD_SEPARATOR in request_id:
        raise ValueError(f"request_id must be a non-empty string, got {request_id!r}")
    token_ids = tuple(prompt_token_ids)
    if not token_ids:
        raise ValueError("prompt must contain at least 1 token, got 0")
    vocab = limits.vocab_size
    for i, t in enumerate(token_ids):
        if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab:
            raise ValueError(f"prompt token {i} is {t!r}; token ids must be integers in [0, {vocab})")
    params.check_vocab(vocab)
    max_len, num_prompt = limits.max_model_len, len(token_ids)
    if num_prompt >= max_len:
        raise ValueError(
            f"This model's maximum context length is {max_len} tokens and your prompt has "
            f"{num_prompt} tokens; it leaves no room for output"
        )
    if num_prompt + params.max_tokens > max_len:
        raise ValueError(
            f"max_tokens is too large: {params.max_tokens}. This model's maximum context length "
            f"is {max_len} tokens and your request has {num_prompt} input tokens"
        )
    if params.n > limits.max_num_seqs:
        raise ValueError(
            f"n is too large: {params.n}. A replica runs at most {limits.max_num_seqs} sequences "
            "at once (max_num_seqs)"
        )
    outputs = tuple(output_token_ids)
    if len(outputs) >= params.max_tokens or any(not isinstance(t, int) or not 0 <= t < vocab for t in outputs):
        raise ValueError(
            f"a resumed request's {len(outputs)} output tokens must be token ids in [0, {vocab}) and fewer "
            f"than max_tokens={params.max_tokens}"
        )
    need = limits.blocks_for(num_prompt + params.max_tokens)
    if need > limits.num_blocks:
        raise ValueError(
            f"request needs {need} KV blocks ({num_prompt} prompt + {params.max_tokens} max_tokens) "
            f"but the whole cache has {limits.num_blocks}; it can never fit"
        )
    return EngineRequest(request_id, token_ids, params, limits, outputs)
