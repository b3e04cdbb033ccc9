"""The engine's step-time model, and the capacity of one replica that follows from it.

``bench/routing_sim.py`` measures a linear model of one engine step on this engine:

    step_s = base_s + per_decode_row_s * num_decode_rows + per_prefill_token_s * num_prefill_tokens

That is enough for its short prompts. The fleet simulator replays real prompt lengths (up to
8k tokens), where attention is no longer small next to the linear layers, so this model adds
one term per attended (query token, cached token) pair:

    + per_prefill_pair_s * num_prefill_pairs + per_decode_pair_s * num_decode_pairs

A decode row at context L attends L pairs; a prefill chunk of n tokens that starts at offset
s attends n*s + n*(n+1)/2 (``prefill_pairs``). ``bench/fleet_cost_model.py`` measures all five
on this engine; a JSON saved by ``routing_sim.py --save-cost-model`` reads as a model whose
attention terms are zero.

Pure: no clock, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple


def prefill_pairs(start: int, num_tokens: int) -> int:
    """Attended pairs of a prefill chunk of ``num_tokens`` whose first token sits at ``start``."""
    return num_tokens * start + num_tokens * (num_tokens + 1) // 2


@dataclass(frozen=True)
class EngineCostModel:
    base_s: float
    """Fixed cost of a step (scheduling, launch, LM head of an empty batch)."""
    per_decode_row_s: float
    per_prefill_token_s: float
    per_prefill_pair_s: float = 0.0
    """Per (prefill query token, attended token) pair."""
    per_decode_pair_s: float = 0.0
    """Per (decode row, attended token) pair."""
    source: str = ""
    """Where the numbers come from (machine, model, date), for the reports."""

    def __post_init__(self) -> None:
        for name in ("base_s", "per_decode_row_s", "per_prefill_token_s", "per_prefill_pair_s", "per_decode_pair_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}: {value} must be a finite number >= 0")
        if self.per_prefill_token_s <= 0:
            raise ValueError(f"per_prefill_token_s: {self.per_prefill_token_s} must be > 0")

    def step_s(self, num_decode_rows: int, num_prefill_tokens: int, num_decode_pairs: int = 0,
               num_prefill_pairs: int = 0) -> float:
        return (
            self.base_s
            + self.per_decode_row_s * num_decode_rows
            + self.per_prefill_token_s * num_prefill_tokens
            + self.per_decode_pair_s * num_decode_pairs
            + self.per_prefill_pair_s * num_prefill_pairs
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EngineCostModel:
        """From a saved model: this class's fields, or ``routing_sim.py``'s (no attention terms)."""
        known = {"base_s", "per_decode_row_s", "per_prefill_token_s", "per_prefill_pair_s", "per_decode_pair_s", "source"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"cost model: unknown keys {unknown}; known keys: {sorted(known)}")
        return cls(**d)


@dataclass(frozen=True)
class ReplicaCapacity:
    """What one replica of a profile sustains when busy, in tokens per second.

    A replica's busy fraction is ``prefill_rate / prefill_tokens_per_s + decode_rate /
    decode_tokens_per_s``: prefill and decode share its steps, so their loads add."""

    prefill_tokens_per_s: float
    decode_tokens_per_s: float

    def __post_init__(self) -> None:
        for name in ("prefill_tokens_per_s", "decode_tokens_per_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name}: {value} must be a finite number > 0")

    def busy_fraction(self, prefill_tokens_per_s: float, decode_tokens_per_s: float) -> float:
        return prefill_tokens_per_s / self.prefill_tokens_per_s + decode_tokens_per_s / self.decode_tokens_per_s


class MixContexts(NamedTuple):
    """Where a mix's tokens sit, weighted by token (long prompts hold most prefill tokens)."""

    prefill_offset: float
    """Mean offset of a prompt token in its prompt: sum(isl^2) / (2 sum(isl))."""
    decode_context: float
    """Mean context of an output token: sum(osl * (isl + osl / 2)) / sum(osl)."""


def mix_contexts(isl: Sequence[int], osl: Sequence[int]) -> MixContexts:
    if not isl or len(isl) != len(osl):
        raise ValueError(f"need as many ISLs as OSLs, at least one; got {len(isl)} and {len(osl)}")
    prompt_tokens = sum(isl)
    output_tokens = sum(osl)
    return MixContexts(
        prefill_offset=sum(i * i for i in isl) / (2 * prompt_tokens),
        decode_context=sum(o * (i + o / 2) for i, o in zip(isl, osl, strict=True)) / output_tokens,
    )


def replica_capacity(cost: EngineCostModel, *, chunk_tokens: int, max_decode_rows: int, contexts: MixContexts,
                     itl_slo_s: float) -> ReplicaCapacity:
    """Capacity of one replica on a mix.

    Prefill: full chunks of ``chunk_tokens`` at the mix's token-weighted prompt offset.
    Decode: the largest batch, up to ``max_decode_rows``, whose step at the mix's
    token-weighted decode context stays within ``itl_slo_s`` (at least one row), its rows'
    tokens over that step's time.
    """
    if chunk_tokens < 1 or max_decode_rows < 1:
        raise ValueError(f"chunk_tokens and max_decode_rows must be >= 1, got {chunk_tokens} and {max_decode_rows}")
    chunk_s = cost.step_s(0, chunk_tokens, num_prefill_pairs=int(chunk_tokens * contexts.prefill_offset))
    per_row_s = cost.per_decode_row_s + cost.per_decode_pair_s * contexts.decode_context
    rows = max_decode_rows
    if per_row_s > 0:
        rows = max(1, min(max_decode_rows, int((itl_slo_s - cost.base_s) / per_row_s)))
    decode_s = cost.base_s + per_row_s * rows
    return ReplicaCapacity(prefill_tokens_per_s=chunk_tokens / chunk_s, decode_tokens_per_s=rows / decode_s)
