"""The price of sending one request to one replica, and how a price becomes a choice.

``cost()`` estimates the work that stands between the request and its first token on that
replica, and the damage it does there, in *prefill-token equivalents* (the time to prefill
one token is the unit):

    cost = prefill_weight  * new_prefill_tokens               (ISL minus the cached prefix)
         + queue_weight    * queued_prefill_tokens            (prefills queued ahead of it)
         + decode_weight   * num_running                      (decode rows sharing its steps)
         + overflow_weight * block_size * num_missing_blocks  (KV it must wait for)
         + eviction_weight * block_size * num_evicted_blocks  (others' cached prefixes it pushes out)

``num_missing_blocks``: of the KV blocks the request will need over its life (ISL + expected
OSL, less the cached blocks it reuses), how many the replica does not have free now: they
come from finishing requests (queueing) or from preempting running ones (recompute).
``num_evicted_blocks``: how many of the free blocks it takes hold a cached prefix (beyond
the replica's empty blocks); evicting them turns later hits into misses, so a prompt nobody
has cached goes where it displaces least, which spreads the hot prefixes over the fleet.
``queued_prefill_tokens``: the prompt tokens the replica's waiting and running requests must
still prefill, as its last load report said, plus the router's running mean of new prefill
tokens (small when most prompts hit) for each request sent there since. Counting the tokens
and not the requests is what sees one replica stuck behind a 50k-token prompt.

The weights are orders of magnitude for this engine on CPU (``bench/routing_sim.py`` measures
its step times): a decode row costs about as much as 8 prefill tokens in a mixed step, and
waiting for KV room or evicting a hot prefix is worse than prefilling the same tokens.

Pure: no clock, no I/O; every input is in ``CostInputs``.
"""

from __future__ import annotations

import bisect
import math
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class CostWeights:
    prefill_weight: float = 1.0
    """Per token still to prefill."""
    queue_weight: float = 0.25
    """Per prefill token queued ahead of it.

    NOTE: 1 would price the wait in the request's own TTFT exactly, but it sends prompts away
    from their cached prefix whenever a replica is busy, and the copies evict other prefixes.
    Chosen on the Mooncake replay (``bench/routing_sim.py --trace``, 64 replicas): weights
    1 / 0.5 / 0.25 / 0.2 kept 32.1 / 33.3 / 34.4 / 34.3% of prompt tokens in cache at goodput
    98.0 / 98.0 / 97.8 / 97.9%; their max/min load (1.22-1.32) moves more with the seed than
    with the weight."""
    decode_weight: float = 8.0
    """Per running request (its decode row rides in every step of this request's prefill)."""
    overflow_weight: float = 4.0
    """Per token of KV the replica lacks room for."""
    eviction_weight: float = 0.5
    """Per token of cached KV the request's new blocks would evict."""

    def __post_init__(self) -> None:
        for name in ("prefill_weight", "queue_weight", "decode_weight", "overflow_weight", "eviction_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")


_DEFAULT_WEIGHTS = CostWeights()


@dataclass(frozen=True)
class CostInputs:
    num_prompt_tokens: int
    num_cached_tokens: int
    """Leading prompt tokens the replica holds in its prefix cache (full blocks only)."""
    num_expected_output_tokens: int
    block_size: int
    num_running: int
    num_waiting: int
    num_free_blocks: int
    """Blocks the replica can allocate now, empty or holding an evictable cached prefix."""
    num_empty_blocks: int = 0
    """Blocks holding no cached prefix (the router's estimate: total minus the blocks it
    believes cached); allocations beyond them evict."""
    queued_prefill_tokens: float = 0.0
    """Prefill tokens queued ahead of it there (see the module docstring)."""

    @property
    def num_new_prefill_tokens(self) -> int:
        return self.num_prompt_tokens - self.num_cached_tokens

    @property
    def num_blocks_needed(self) -> int:
        """New KV blocks over the request's life: ISL + expected OSL, minus the cached blocks."""
        num_tokens = self.num_prompt_tokens + self.num_expected_output_tokens
        return -(-num_tokens // self.block_size) - self.num_cached_tokens // self.block_size

    @property
    def num_missing_blocks(self) -> int:
        return max(0, self.num_blocks_needed - self.num_free_blocks)

    @property
    def num_evicted_blocks(self) -> int:
        return max(0, min(self.num_blocks_needed, self.num_free_blocks) - self.num_empty_blocks)


def cost(inputs: CostInputs, weights: CostWeights | None = None) -> float:
    """See the module docstring; lower is better."""
    w = weights or _DEFAULT_WEIGHTS
    return (
        w.prefill_weight * inputs.num_new_prefill_tokens
        + w.queue_weight * inputs.queued_prefill_tokens
        + w.decode_weight * inputs.num_running
        + w.overflow_weight * inputs.block_size * inputs.num_missing_blocks
        + w.eviction_weight * inputs.block_size * inputs.num_evicted_blocks
    )


def softmin_choice(costs: Sequence[float], temperature: float, rng: random.Random) -> int:
    """Index of the chosen cost: sampled with p_i ∝ exp(-(c_i - c_min) / (temperature * scale)).

    ``scale`` is the mean cost (at least 1), so the temperature is relative: at 0.02 a replica
    2% of the mean above the cheapest is e^-1 as likely. Temperature 0 is argmin. Ties (within
    1e-9 relative) are broken uniformly at random either way, so equal replicas share the
    load instead of the first one herding it.

    NOTE: keep it small. The odds of *some* worse replica add up over all of them: with 64
    replicas, 0.1 sends enough prompts away from their cached prefix that the copies evict
    other prefixes, and ``bench/routing_sim.py``'s hit rate falls from 84% to 54% (0.3: 8%).
    """
    if not costs:
        raise ValueError("softmin_choice needs at least one cost")
    lowest = min(costs)
    if temperature <= 0:
        tied = [i for i, c in enumerate(costs) if c - lowest <= 1e-9 * max(1.0, abs(lowest))]
        return tied[rng.randrange(len(tied))]
    scale = max(1.0, sum(costs) / len(costs))
    weights = [math.exp(-(c - lowest) / (temperature * scale)) for c in costs]
    return rng.choices(range(len(costs)), weights=weights)[0]


class OutputLengthEstimator:
    """Expected output tokens of a request from its ``max_tokens`` and the OSL seen lately.

    Until ``min_samples`` requests have finished it trusts ``max_tokens`` (the safe bound for
    KV room); after that it expects ``min(max_tokens, quantile of observed OSL)``. A high
    quantile (0.9 by default) because running out of KV room costs more than reserving too much.
    """

    def __init__(self, window: int = 1000, quantile: float = 0.9, min_samples: int = 20) -> None:
        if not 0.0 <= quantile <= 1.0:
            raise ValueError(f"quantile must be in [0, 1], got {quantile}")
        if window < 1 or min_samples < 1:
            raise ValueError(f"window and min_samples must be >= 1, got {window} and {min_samples}")
        self.quantile = quantile
        self.min_samples = min_samples
        self._recent: deque[int] = deque(maxlen=window)
        self._sorted: list[int] = []

    def observe(self, num_output_tokens: int) -> None:
        if len(self._recent) == self._recent.maxlen:
            old = self._recent[0]
            del self._sorted[bisect.bisect_left(self._sorted, old)]
        self._recent.append(num_output_tokens)
        bisect.insort(self._sorted, num_output_tokens)

    @property
    def num_samples(self) -> int:
        return len(self._sorted)

    def observed_quantile(self) -> int | None:
        if len(self._sorted) < self.min_samples:
            return None
        return self._sorted[min(len(self._sorted) - 1, int(self.quantile * len(self._sorted)))]

    def expected(self, max_tokens: int) -> int:
        observed = self.observed_quantile()
        return max_tokens if observed is None else min(max_tokens, observed)
