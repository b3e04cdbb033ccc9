"""KV cache sizing: what each device holds and how many KV blocks fit beside it.

``plan_kv_cache`` is the one sizing function: the engine's ``resolve()`` (workers/config.py)
sizes its cache with it, and ``kvtide size`` (cluster/size_cmd.py) prints it.

Accounting, for one GPU of each pipeline stage (all TP ranks of a stage hold the same):
- Layers: the stage's slice from ``workers.shard.stage_layers``.
- Weights: the stage's decoder layers split over TP as the layer classes split them (q/k/v,
  o, gate/up, down; norms replicated), the vocab-parallel embedding (ceil(vocab / tp) rows)
  on the first stage, the final norm and LM head on the last (a tied head is shared only
  when one stage holds both). fp8/int8 ``quantization`` stores the decoder's linear weights
  in one byte plus one fp32 scale per output channel; embeddings, LM head, norms and biases
  stay in the activation ``dtype`` (workers/quantization.py). NOTE: norm weights are counted
  in ``dtype``.
- KV: ``max(1, num_kv_heads // tp)`` KV heads of the stage's layers; for tp > num_kv_heads
  each KV head is replicated (vLLM's rule; tp must then be a multiple of num_kv_heads).
  A row costs ``kernels.kv_quant.kv_bytes_per_row`` (a quantized row carries its scale).
- On a GPU: KV bytes = floor(total x utilization) - weights - reserve, where the reserve is
  the peak of activations and other non-KV memory, measured by the engine when it can
  (``GpuMemory.reserve_bytes``) and else ``estimate_reserve_bytes``. On CPU: a byte budget
  per device (``CpuBudget``, like vLLM's ``kv_cache_memory_bytes``).
- Blocks per GPU = KV bytes // bytes per block of that GPU; a replica has the minimum over
  its stages, since every shard allocates the same block count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvtide.kernels.kv_quant import KV_CACHE_DTYPES
from kvtide.workers.gpu_shares import (
    GpuShare,
    ModelShape,
    ParallelLayout,
    gpu_shares,
    kv_bytes_per_token,
    stage_bounds,
)

__all__ = [
    "KV_CACHE_DTYPES",  # for cluster/, which does not import kernels/
    "CpuBudget", "GpuMemory", "GpuShare", "KvPlan", "ModelShape", "ParallelLayout", "StagePlan",
    "estimate_reserve_bytes", "gpu_shares", "kv_bytes_per_token", "plan_kv_cache", "stage_bounds",
]  # fmt: skip

LOGITS_BYTES_PER_VOCAB_ENTRY = 20
"""Last-stage sampling memory per (sequence, vocab entry) in the reserve estimate: the fp32
logits and four fp32-sized temporaries (softmax, sorted copy for top-p, int64 indices)."""


def gib(num_bytes: int | float) -> str:
    return f"{num_bytes / 2**30:.2f} GiB ({int(num_bytes)} bytes)"


def estimate_reserve_bytes(
    shape: ModelShape,
    layout: ParallelLayout,
    share: GpuShare,
    dtype: torch.dtype,
    max_num_batched_tokens: int,
    max_num_seqs: int,
) -> int:
    """Peak non-KV memory of one step on one GPU of ``share``'s stage, when nothing measured it.

    T = max_num_batched_tokens tokens in ``dtype``: hidden and residual, the normed input
    and a layer's output (4 x hidden), the q/k/v and attention outputs, and the MLP's
    gate/up, activation and product (4 x intermediate), all per TP rank. Attention and MLP
    temporaries are summed though they do not coexist: a margin for allocator fragmentation.
    The last stage adds max_num_seqs x vocab x (dtype + ``LOGITS_BYTES_PER_VOCAB_ENTRY``)
    bytes for logits and sampling; every stage adds its rotary cos/sin tables (in ``dtype``). Not
    counted: the CUDA context and NCCL buffers, which the 1 - utilization headroom absorbs.
    A shape given by hand estimates hidden as sqrt(params per layer / 12) (a Llama layer
    holds about 12 hidden^2) and intermediate as 3.5 x hidden, and has no logits term.
    """
    tp, act = layout.tp, dtype.itemsize
    a = shape.args
    if a is not None:
        hidden, inter, q_width, vocab = a.hidden_size, a.intermediate_size, a.num_heads * a.head_dim, a.vocab_size
    else:
        hidden = math.isqrt(shape.num_params // (12 * shape.num_layers))
        inter, q_width, vocab = 7 * hidden // 2, hidden, 0
    kv_width = 2 * layout.kv_heads_per_gpu(shape.num_kv_heads) * shape.head_dim
    per_token = act * (4 * hidden + 4 * inter // tp + 2 * q_width // tp + kv_width)
    reserve = max_num_batched_tokens * per_token + 2 * shape.max_position * shape.head_dim * act
    if share.layer_end == shape.num_layers:
        reserve += max_num_seqs * (-(-vocab // tp) * act + vocab * LOGITS_BYTES_PER_VOCAB_ENTRY)
    return reserve


@dataclass(frozen=True)
class GpuMemory:
    """One GPU's memory as the engine may use it (vLLM's ``gpu_memory_utilization``)."""

    total_bytes: int
    utilization: float = 0.9
    reserve_bytes: int | None = None
    """Measured peak of activations and other non-KV memory per GPU; None: estimated."""

    def __post_init__(self) -> None:
        if self.total_bytes < 1:
            raise ValueError(f"total GPU memory must be >= 1 byte, got {self.total_bytes}")
        if not (math.isfinite(self.utilization) and 0 < self.utilization <= 1):
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.utilization}")
        if self.reserve_bytes is not None and self.reserve_bytes < 0:
            raise ValueError(f"reserve_bytes must be >= 0, got {self.reserve_bytes}")


@dataclass(frozen=True)
class CpuBudget:
    """A fixed KV cache budget per device (each shard of a TP x PP replica gets it)."""

    kv_bytes: int

    def __post_init__(self) -> None:
        if self.kv_bytes < 1:
            raise ValueError(f"the KV cache budget must be >= 1 byte, got {self.kv_bytes}")


@dataclass(frozen=True)
class StagePlan:
    """The KV cache of each GPU of one pipeline stage."""

    share: GpuShare
    reserve_bytes: int
    reserve_measured: bool
    kv_bytes: int
    """Bytes left for the KV cache on each GPU of the stage; negative when the weights and
    the reserve alone exceed the usable memory."""
    bytes_per_block: int

    @property
    def num_blocks(self) -> int:
        return max(0, self.kv_bytes // self.bytes_per_block)


@dataclass(frozen=True)
class KvPlan:
    """A replica's KV cache: one ``StagePlan`` per pipeline stage."""

    stages: tuple[StagePlan, ...]
    layout: ParallelLayout
    memory: GpuMemory | CpuBudget
    block_size: int
    kv_bytes_per_token: int
    """Whole model (every layer and KV head once), whatever the layout."""

    @property
    def binding(self) -> StagePlan:
        """The stage with the fewest blocks: it sets the replica's block count."""
        return min(self.stages, key=lambda s: s.num_blocks)

    @property
    def num_blocks(self) -> int:
        return self.binding.num_blocks

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def bytes_per_block(self) -> int:
        """One block across the whole replica: every GPU's share (replicated KV heads included)."""
        return self.layout.tp * sum(s.bytes_per_block for s in self.stages)

    def check_fits(self, max_model_len: int) -> None:
        """Raise ``ValueError`` with the numbers when one ``max_model_len`` sequence does not fit."""
        needed = -(-max_model_len // self.block_size)
        if self.num_blocks >= needed:
            return
        s = self.binding
        where = f"pipeline stage {s.share.stage} (layers {s.share.layer_start}-{s.share.layer_end - 1})"
        if isinstance(self.memory, GpuMemory):
            m = self.memory
            kind = "measured" if s.reserve_measured else "estimated"
            source = (
                f"{gib(m.total_bytes)} x gpu_memory_utilization {m.utilization:g} - "
                f"{gib(s.share.weight_bytes)} weights - {gib(s.reserve_bytes)} activation reserve ({kind})"
            )
            device, advice = f"each GPU of {where}", "increasing gpu_memory_utilization, tp or pp"
        else:
            source = "the KV cache budget, kv_cache_memory_gib"
            device, advice = f"each device of {where}", "increasing kv_cache_memory_gib"
        if s.kv_bytes < 0:
            source += f"; the weights and the reserve alone exceed the usable memory by {gib(-s.kv_bytes)}"
        raise ValueError(
            f"max_model_len {max_model_len} does not fit in the KV cache: one sequence of {max_model_len} "
            f"tokens needs {needed} blocks of {self.block_size} tokens, {gib(needed * s.bytes_per_block)} "
            f"of KV cache on {device}, which has {gib(max(s.kv_bytes, 0))} available ({source}); "
            f"the KV cache holds {self.num_tokens} tokens. Try {advice}, or decreasing max_model_len."
        )


def plan_kv_cache(
    shape: ModelShape,
    *,
    dtype: torch.dtype,
    block_size: int,
    memory: GpuMemory | CpuBudget,
    layout: ParallelLayout = ParallelLayout(),
    quantization: str = "none",
    kv_cache_dtype: torch.dtype | None = None,
    max_model_len: int | None = None,
    max_num_batched_tokens: int = 1024,
    max_num_seqs: int = 64,
) -> KvPlan:
    """Size a replica's KV cache. With ``max_model_len`` given, raise ``ValueError`` when one
    sequence of that length does not fit. ``max_num_batched_tokens`` and ``max_num_seqs``
    only feed the reserve estimate (a GPU without a measured ``reserve_bytes``)."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    stages = []
    for share in gpu_shares(shape, layout, dtype, quantization, kv_cache_dtype):
        bytes_per_block = block_size * share.kv_bytes_per_token
        if isinstance(memory, CpuBudget):
            stages.append(StagePlan(share, 0, False, memory.kv_bytes, bytes_per_block))
            continue
        measured = memory.reserve_bytes is not None
        reserve = memory.reserve_bytes if measured else estimate_reserve_bytes(
            shape, layout, share, dtype, max_num_batched_tokens, max_num_seqs
        )  # fmt: skip
        usable = math.floor(memory.total_bytes * memory.utilization)
        stages.append(StagePlan(share, reserve, measured, usable - share.weight_bytes - reserve, bytes_per_block))
    plan = KvPlan(tuple(stages), layout, memory, block_size, kv_bytes_per_token(shape, kv_cache_dtype or dtype))
    if max_model_len is not None:
        plan.check_fits(max_model_len)
    return plan
