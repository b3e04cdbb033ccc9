"""An engine profile: one replica's engine sizing for a traffic season.

Profiles are what the autoscaler's targets count (replicas per profile) and what a season
rolls replicas to. A profile fixes the engine's shape (context length, batch, token budget,
prefill chunk, KV dtype and memory, TP x PP) and the router's cost weights for its season.
``build_profile`` (profile_build.py) derives one from an observed ISL/OSL distribution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from kvtide.cluster.autoscaler.cost_model import ReplicaCapacity
from kvtide.router.cost import CostWeights

KV_CACHE_DTYPES = ("auto", "fp8", "int8")
DTYPES = ("float32", "float16", "bfloat16")
QUANTIZATIONS = ("none", "fp8", "int8")


@dataclass(frozen=True)
class EngineProfile:
    """Validation errors read ``field: value, the limit`` so a config parser can prefix the path."""

    name: str
    max_model_len: int
    """Longest prompt + output a replica accepts; longer requests are refused."""
    max_num_seqs: int
    """Most sequences in one step's batch."""
    max_num_batched_tokens: int
    """Token budget of one step (decode rows + prefill chunks)."""
    max_prefill_chunk: int | None = None
    """Cap on one request's prefill chunk per step; None lets one prefill take the budget."""
    kv_cache_dtype: str = "auto"
    """auto (the model's dtype) | fp8 | int8."""
    dtype: str = "float32"
    """The model's compute dtype (what "auto" KV means)."""
    tp: int = 1
    pp: int = 1
    block_size: int = 16
    kv_cache_gib: float = 1.0
    """KV cache budget per device when ``gpu_memory_gib`` is None (a CPU process)."""
    gpu_memory_gib: float | None = None
    """Memory of each GPU; the KV cache gets what weights and activations leave of
    ``gpu_memory_gib * gpu_memory_utilization`` (workers/sizing.py)."""
    gpu_memory_utilization: float = 0.9
    quantization: str = "none"
    """Weights of the decoder's linear layers: none | fp8 | int8."""
    router_weights: CostWeights = field(default_factory=CostWeights)
    """The router's cost weights while this profile serves (router/cost.py)."""
    capacity: ReplicaCapacity | None = None
    """Measured throughput of one replica, for the predictive policy; None: not measured."""

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("name: must not be empty")
        for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "tp", "pp", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: {value!r} must be an int >= 1")
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size: {self.block_size} must be a power of two")
        if self.max_model_len < self.block_size:
            raise ValueError(f"max_model_len: {self.max_model_len} is below block_size {self.block_size}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens: {self.max_num_batched_tokens} is below max_num_seqs {self.max_num_seqs} "
                "(every running sequence's decode row must fit in a step)"
            )
        if self.max_prefill_chunk is not None and not 1 <= self.max_prefill_chunk <= self.max_num_batched_tokens:
            raise ValueError(
                f"max_prefill_chunk: {self.max_prefill_chunk} must be in [1, max_num_batched_tokens "
                f"{self.max_num_batched_tokens}]"
            )
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype: {self.kv_cache_dtype!r} is not one of {', '.join(KV_CACHE_DTYPES)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if not (math.isfinite(self.kv_cache_gib) and self.kv_cache_gib > 0):
            raise ValueError(f"kv_cache_gib: {self.kv_cache_gib} must be a finite number > 0")
        if self.gpu_memory_gib is not None and not (math.isfinite(self.gpu_memory_gib) and self.gpu_memory_gib > 0):
            raise ValueError(f"gpu_memory_gib: {self.gpu_memory_gib} must be a finite number > 0")
        if not (math.isfinite(self.gpu_memory_utilization) and 0 < self.gpu_memory_utilization <= 1):
            raise ValueError(f"gpu_memory_utilization: {self.gpu_memory_utilization} must be in (0, 1]")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization: {self.quantization!r} is not one of {', '.join(QUANTIZATIONS)}")

    @property
    def num_devices(self) -> int:
        return self.tp * self.pp

    @property
    def chunk_tokens(self) -> int:
        """The largest prefill chunk a step takes."""
        return self.max_prefill_chunk or self.max_num_batched_tokens

    def engine_kwargs(self) -> dict[str, Any]:
        """Flat ``EngineConfig.from_kwargs`` options for a replica of this profile (tp/pp go to the replica)."""
        return {
            "max_model_len": self.max_model_len,
            "max_num_seqs": self.max_num_seqs,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "max_prefill_chunk": self.max_prefill_chunk,
            "kv_cache_dtype": self.kv_cache_dtype,
            "dtype": self.dtype,
            "block_size": self.block_size,
            "kv_cache_memory_gib": self.kv_cache_gib,
            "quantization": self.quantization,
        }

    def describe(self) -> str:
        memory = (f"{self.kv_cache_gib:g} GiB KV/device" if self.gpu_memory_gib is None
                  else f"{self.gpu_memory_gib:g} GiB GPUs at {self.gpu_memory_utilization:g}")
        chunk = "whole prompt" if self.max_prefill_chunk is None else f"{self.max_prefill_chunk} tokens"
        return (
            f"profile {self.name}: max_model_len {self.max_model_len}, max_num_seqs {self.max_num_seqs}, "
            f"max_num_batched_tokens {self.max_num_batched_tokens}, prefill chunk {chunk}, "
            f"KV {self.kv_cache_dtype} ({self.dtype} model, weights {self.quantization}), {memory}, "
            f"block {self.block_size}, TP {self.tp} x PP {self.pp}"
        )
