"""Sampling parameters of one request, validated at construction."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    """Number of independent completions (choices) for the prompt."""
    max_tokens: int = 16
    """Maximum number of tokens to generate per choice."""
    min_tokens: int = 0
    """EOS and stop token ids are banned until this many tokens are generated."""
    temperature: float = 1.0
    """0 means greedy."""
    top_k: int = 0
    """0 (or -1) disables top-k."""
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    bad_words_token_ids: tuple[tuple[int, ...], ...] = ()
    """Banned token sequences: the last token of each is masked when the rest was just generated."""
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None
    """None: no logprobs; k >= 0: the sampled token's logprob plus the top-k alternatives."""
    skip_special_tokens: bool = True

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1
