"""``build_profile``: an engine profile sized for an observed ISL/OSL distribution.

Rules (each a documented choice, printed by ``ProfileReport.describe``):

- ``max_model_len``: the ``quantile`` (p99 by default) of ISL + OSL, rounded up to a whole
  KV block, capped at the model's own context length. Requests above it are refused by a
  replica of this profile; the report counts them.
- KV capacity: ``kv_capacity.kv_plan``, i.e. ``kvtide.workers.sizing.plan_kv_cache``, the
  one sizing function the engine and ``kvtide size`` use.
- Concurrency: sequences of ``max_model_len`` tokens the KV cache holds at once (what a
  replica can promise without preempting); the model-maximum profile (same everything,
  ``max_model_len`` = the model's) is the comparison.
- ``max_num_seqs``: sequences of the distribution's mean length the KV cache holds, at most
  ``max_num_seqs_cap``; beyond that requests would wait for KV blocks anyway.
- Prefill chunk: the median prompt rounded up to a block, in [256, 2048]; with a cost model
  and an ITL SLO, cut to the largest block multiple whose step (chunk at the mean prompt
  offset, token-weighted, plus a full decode batch) stays within the SLO, since every decode
  row waits for it.
- ``max_num_batched_tokens``: one chunk plus a decode row per sequence.
- Router weights: with a cost model, ``decode_weight`` is a decode row's cost in prefill
  tokens (``per_decode_row_s / per_prefill_token_s``), the unit of ``router.cost``; the other
  weights keep their defaults.
- Capacity (for ``predictive``): ``cost_model.replica_capacity`` at the distribution's
  token-weighted contexts, when a cost model and an ITL SLO are given.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kvtide.cluster.autoscaler.cost_model import (
    EngineCostModel,
    MixContexts,
    mix_contexts,
    prefill_pairs,
    replica_capacity,
)
from kvtide.cluster.autoscaler.kv_capacity import kv_plan, model_max_len
from kvtide.cluster.autoscaler.observation import Percentiles, nearest_rank
from kvtide.cluster.autoscaler.profile import EngineProfile
from kvtide.router.cost import CostWeights

CHUNK_MIN, CHUNK_MAX = 256, 2048


def _round_up(n: float, block: int) -> int:
    return max(block, -(-int(n) // block) * block)


@dataclass(frozen=True)
class ProfileOptions:
    name: str = "observed"
    quantile: float = 0.99
    dtype: str = "float32"
    kv_cache_dtype: str = "auto"
    kv_cache_gib: float = 1.0
    gpu_memory_gib: float | None = None
    gpu_memory_utilization: float = 0.9
    quantization: str = "none"
    tp: int = 1
    pp: int = 1
    block_size: int = 16
    max_num_seqs_cap: int = 256
    itl_slo_s: float | None = None

    def __post_init__(self) -> None:
        if not 0 < self.quantile <= 1:
            raise ValueError(f"quantile: {self.quantile} must be in (0, 1]")
        if self.max_num_seqs_cap < 1:
            raise ValueError(f"max_num_seqs_cap: {self.max_num_seqs_cap} must be >= 1")


@dataclass(frozen=True)
class ProfileReport:
    profile: EngineProfile
    model_max: EngineProfile
    """The same engine at the model's own context length."""
    kv_tokens: int
    model_max_kv_tokens: int
    num_requests: int
    num_over: int
    """Requests of the distribution longer than ``profile.max_model_len``."""
    isl: Percentiles
    osl: Percentiles
    total: Percentiles
    quantile: float

    @property
    def concurrency(self) -> int:
        return self.kv_tokens // self.profile.max_model_len

    @property
    def model_max_concurrency(self) -> int:
        return self.model_max_kv_tokens // self.model_max.max_model_len

    def describe(self) -> str:
        def row(name: str, p: Percentiles) -> str:
            return f"  {name:<8} mean {p.mean:8.1f}  p50 {p.p50:7.0f}  p90 {p.p90:7.0f}  p99 {p.p99:7.0f}"

        p, m = self.profile, self.model_max
        gain = (f"x{self.concurrency / self.model_max_concurrency:.2f}, {self.concurrency - self.model_max_concurrency:+d}"
                if self.model_max_concurrency else "the model-maximum profile does not fit one sequence")
        return "\n".join([
            f"{self.num_requests} requests:",
            row("ISL", self.isl), row("OSL", self.osl), row("ISL+OSL", self.total),
            p.describe(),
            f"KV cache per replica: {self.kv_tokens} tokens (kvtide.workers.sizing.plan_kv_cache)",
            (f"max_model_len {p.max_model_len} = p{self.quantile * 100:g} of ISL+OSL rounded up to a block of "
             f"{p.block_size}; {self.num_over} requests ({self.num_over / self.num_requests:.2%}) are longer and "
             "would be refused"),
            (f"concurrency at max_model_len: {self.concurrency} sequences of {p.max_model_len} tokens; the "
             f"model-maximum profile ({m.max_model_len} tokens, KV {self.model_max_kv_tokens} tokens): "
             f"{self.model_max_concurrency}; gain {gain} concurrent requests"),
        ])

    def as_yaml_mapping(self) -> dict[str, Any]:
        """The profile as the autoscale config's ``profiles.<name>`` entry."""
        d = {f.name: getattr(self.profile, f.name) for f in dataclasses.fields(self.profile) if f.name != "name"}
        d["router_weights"] = dataclasses.asdict(self.profile.router_weights)
        d["capacity"] = None if self.profile.capacity is None else dataclasses.asdict(self.profile.capacity)
        if self.profile.gpu_memory_gib is None:
            del d["gpu_memory_utilization"]
        return {k: v for k, v in d.items() if v is not None}


def _chunk(isl: Percentiles, options: ProfileOptions, cost: EngineCostModel | None, max_num_seqs: int,
           contexts: MixContexts) -> int:
    chunk = min(CHUNK_MAX, max(CHUNK_MIN, _round_up(isl.p50, options.block_size)))
    if cost is None or options.itl_slo_s is None:
        return chunk
    rows_s = max_num_seqs * (cost.per_decode_row_s + cost.per_decode_pair_s * contexts.decode_context)
    offset = int(contexts.prefill_offset)
    while chunk > options.block_size and (
        cost.step_s(0, chunk, num_prefill_pairs=prefill_pairs(offset, chunk)) + rows_s > options.itl_slo_s
    ):
        chunk -= options.block_size
    return chunk


def build_profile(isl: Sequence[int], osl: Sequence[int], model_config: Mapping[str, Any], options: ProfileOptions,
                  cost: EngineCostModel | None = None) -> ProfileReport:
    if len(isl) != len(osl) or not isl:
        raise ValueError(f"need as many ISLs as OSLs, at least one; got {len(isl)} and {len(osl)}")
    totals = [i + o for i, o in zip(isl, osl, strict=True)]
    isl_p, osl_p, total_p = Percentiles.of(isl), Percentiles.of(osl), Percentiles.of(totals)
    model_len = model_max_len(model_config)
    block = options.block_size
    max_model_len = min(model_len, _round_up(nearest_rank(sorted(totals), options.quantile), block))
    base = EngineProfile(
        name=options.name, max_model_len=max_model_len, max_num_seqs=options.max_num_seqs_cap,
        max_num_batched_tokens=options.max_num_seqs_cap + CHUNK_MAX, kv_cache_dtype=options.kv_cache_dtype,
        dtype=options.dtype, tp=options.tp, pp=options.pp, block_size=block, kv_cache_gib=options.kv_cache_gib,
        gpu_memory_gib=options.gpu_memory_gib, gpu_memory_utilization=options.gpu_memory_utilization,
        quantization=options.quantization,
    )
    kv_tokens = kv_plan(model_config, base, check_fits=False).num_tokens
    max_num_seqs = max(1, min(options.max_num_seqs_cap, kv_tokens // _round_up(total_p.mean, block)))
    contexts = mix_contexts(isl, osl)
    chunk = _chunk(isl_p, options, cost, max_num_seqs, contexts)
    weights = CostWeights()
    if cost is not None:
        weights = CostWeights(decode_weight=float(f"{cost.per_decode_row_s / cost.per_prefill_token_s:.3g}"))
    capacity = None
    if cost is not None and options.itl_slo_s is not None:
        capacity = replica_capacity(cost, chunk_tokens=chunk, max_decode_rows=max_num_seqs, contexts=contexts,
                                    itl_slo_s=options.itl_slo_s)
    profile = dataclasses.replace(base, max_num_seqs=max_num_seqs, max_num_batched_tokens=chunk + max_num_seqs,
                                  max_prefill_chunk=chunk, router_weights=weights, capacity=capacity)
    kv_tokens = kv_plan(model_config, profile).num_tokens  # raises if max_model_len does not fit
    model_max = dataclasses.replace(profile, name=f"{options.name}-model-max", max_model_len=model_len)
    return ProfileReport(
        profile=profile, model_max=model_max, kv_tokens=kv_tokens,
        model_max_kv_tokens=kv_plan(model_config, model_max, check_fits=False).num_tokens,
        num_requests=len(totals), num_over=sum(1 for t in totals if t > max_model_len),
        isl=isl_p, osl=osl_p, total=total_p, quantile=options.quantile,
    )
