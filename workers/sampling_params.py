"""Sampling parameters of one request, validated at construction."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

MAX_N = 128
MAX_LOGPROBS = 20
MAX_ABS_LOGIT_BIAS = 100.0
MAX_ABS_PENALTY = 2.0


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

    def __post_init__(self) -> None:
        _check_int("n", self.n, 1, MAX_N, f"in [1, {MAX_N}]")
        _check_int("max_tokens", self.max_tokens, 1, None, ">= 1")
        _check_int(
            "min_tokens", self.min_tokens, 0, self.max_tokens, f">= 0 and <= max_tokens={self.max_tokens}"
        )
        _check_int("top_k", self.top_k, -1, None, "-1 or >= 0")
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        self._set_float("temperature", lambda v: v >= 0, "finite and >= 0")
        self._set_float("top_p", lambda v: 0 < v <= 1, "in (0, 1]")
        self._set_float("min_p", lambda v: 0 <= v <= 1, "in [0, 1]")
        self._set_float("repetition_penalty", lambda v: v > 0, "finite and > 0")
        for name in ("presence_penalty", "frequency_penalty"):
            self._set_float(name, lambda v: abs(v) <= MAX_ABS_PENALTY, "finite and in [-2, 2]")
        for name in ("include_stop_str_in_output", "ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.seed is not None:
            _check_int("seed", self.seed, 0, 2**63 - 1, "in [0, 2**63)")
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, 0, MAX_LOGPROBS, f"in [0, {MAX_LOGPROBS}]")
        object.__setattr__(self, "stop", _stop_strings(self.stop))
        object.__setattr__(self, "stop_token_ids", _token_ids("stop_token_ids", self.stop_token_ids))
        object.__setattr__(self, "bad_words_token_ids", _bad_words(self.bad_words_token_ids))
        object.__setattr__(self, "logit_bias", _logit_bias(self.logit_bias))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def check_vocab(self, vocab_size: int) -> None:
        """Raise ``ValueError`` if any token id in the request is outside ``[0, vocab_size)``."""
        fields = {
            "logit_bias": self.logit_bias,
            "stop_token_ids": self.stop_token_ids,
            "bad_words_token_ids": [t for words in self.bad_words_token_ids for t in words],
        }
        for name, token_ids in fields.items():
            bad = sorted(t for t in set(token_ids) if t >= vocab_size)
            if bad:
                raise ValueError(
                    f"{name} contains out-of-vocabulary token ids {bad}; "
                    f"the vocabulary size is {vocab_size}"
                )

    def _set_float(self, name: str, ok, limit: str) -> None:
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a float, got {value!r}")
        if not math.isfinite(value) or not ok(value):
            raise ValueError(f"{name} must be {limit}, got {value!r}")
        object.__setattr__(self, name, float(value))


def _is_int(value: object) -> bool:
    # NOTE: bool is a subclass of int; True is not a token count.
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name: str, value: object, lo: int, hi: int | None, limit: str) -> None:
    if not _is_int(value):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        raise ValueError(f"{name} must be {limit}, got {value!r}")


def _sequence(name: str, values: object, what: str) -> tuple:
    if isinstance(values, (str, bytes, dict)) or not isinstance(values, Iterable):
        raise ValueError(f"{name} must be a sequence of {what}, got {values!r}")
    return tuple(values)


def _token_ids(name: str, values: object) -> tuple[int, ...]:
    out = _sequence(name, values, "token ids")
    for t in out:
        if not _is_int(t) or t < 0:
            raise ValueError(f"{name} must contain only int token ids >= 0, got {t!r}")
    return out


def _stop_strings(stop: object) -> tuple[str, ...]:
    out = (stop,) if isinstance(stop, str) else _sequence("stop", stop, "strings")
    for s in out:
        if not isinstance(s, str) or not s:
            raise ValueError(f"stop must contain only non-empty strings, got {s!r}")
    return out


def _bad_words(bad_words: object) -> tuple[tuple[int, ...], ...]:
    sequences = _sequence("bad_words_token_ids", bad_words, "token id sequences")
    out = tuple(_token_ids("bad_words_token_ids", words) for words in sequences)
    for words in out:
        if not words:
            raise ValueError(f"bad_words_token_ids must contain only non-empty sequences, got {words!r}")
    return out


def _logit_bias(bias: object) -> dict[int, float]:
    if not isinstance(bias, dict):
        raise ValueError(f"logit_bias must be a dict of token id to bias, got {bias!r}")
    out: dict[int, float] = {}
    for token_id, value in bias.items():
        if not _is_int(token_id) or token_id < 0:
            raise ValueError(f"logit_bias keys must be int token ids >= 0, got {token_id!r}")
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or abs(value) > MAX_ABS_LOGIT_BIAS
        ):
            raise ValueError(
                f"logit_bias values must be finite and in [-100, 100], got {value!r} for token {token_id}"
            )
        out[token_id] = float(value)
    return out
