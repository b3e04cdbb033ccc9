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
from typing import Any, NamedTuple

import torch

from kvtide.kernels.kv_quant import KV_CACHE_DTYPES, is_quantized, kv_bytes_per_row
from kvtide.workers.models.llama import LlamaArgs
from kvtide.workers.quantization import QUANTIZATIONS
from kvtide.workers.shard import stage_layers

__all__ = [
    "KV_CACHE_DTYPES",  # for cluster/, which does not import kernels/
    "CpuBudget", "GpuMemory", "GpuShare", "KvPlan", "ModelShape", "ParallelLayout", "StagePlan",
    "estimate_reserve_bytes", "gpu_shares", "kv_bytes_per_token", "plan_kv_cache", "stage_bounds",
]  # fmt: skip

SCALE_BYTES_PER_CHANNEL = 4
"""fp8/int8 linear layers keep one fp32 scale per output channel (``weight_scale``)."""

LOGITS_BYTES_PER_VOCAB_ENTRY = 20
"""Last-stage sampling memory per (sequence, vocab entry) in the reserve estimate: the fp32
logits and four fp32-sized temporaries (softmax, sorted copy for top-p, int64 indices)."""


def gib(num_bytes: int | float) -> str:
    return f"{num_bytes / 2**30:.2f} GiB ({int(num_bytes)} bytes)"


@dataclass(frozen=True)
class ModelShape:
    """What sizing needs from a model. ``args`` is None for a shape given by hand (parameters,
    layers, KV heads, head_dim): its weights are spread evenly over layers and TP ranks, all
    in the weight dtype, since nothing says which of them are embeddings."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_params: int
    """Parameters of the whole model, a tied embedding counted once."""
    max_position: int
    """The model's context length (``max_position_embeddings``)."""
    args: LlamaArgs | None = None

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> ModelShape:
        a = LlamaArgs.from_hf_config(config)
        whole = _gpu_params(a, 1, a.num_kv_heads, 0, a.num_layers)
        return cls(a.num_layers, a.num_kv_heads, a.head_dim, whole.linear + whole.other, a.max_position, a)

    @classmethod
    def by_hand(
        cls, num_params: int, num_layers: int, num_kv_heads: int, head_dim: int, max_position: int
    ) -> ModelShape:
        for name, value in [("num_params", num_params), ("num_layers", num_layers),
                            ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                            ("max_position", max_position)]:  # fmt: skip
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        return cls(num_layers, num_kv_heads, head_dim, num_params, max_position)


class _Held(NamedTuple):
    """Parameters one TP rank holds."""

    linear: int
    """Weights of the decoder's linear layers (quantizable)."""
    channels: int
    """Their output channels (one fp32 scale each when quantized)."""
    other: int
    """Embedding, LM head, norms and biases: always in the activation dtype."""


def _gpu_params(a: LlamaArgs, tp: int, kv_heads: int, start: int, end: int) -> _Held:
    """What one TP rank of layers [start, end) holds, with ``kv_heads`` KV heads per rank."""
    h, d, heads, inter = a.hidden_size, a.head_dim, a.num_heads // tp, a.intermediate_size // tp
    qkv_out = (heads + 2 * kv_heads) * d
    linear = h * qkv_out + heads * d * h + h * 2 * inter + inter * h
    channels = qkv_out + h + 2 * inter + h
    other = 2 * h + (qkv_out if a.attention_bias else 0)  # two norms, q/k/v biases
    n = end - start
    embedding = -(-a.vocab_size // tp) * h
    rest = n * other
    if start == 0:
        rest += embedding
    if end == a.num_layers:
        rest += h + (0 if a.tie_word_embeddings and start == 0 else embedding)
    return _Held(n * linear, n * channels, rest)


@dataclass(frozen=True)
class ParallelLayout:
    tp: int = 1
    """Tensor-parallel ranks per pipeline stage."""
    pp: int = 1
    """Pipeline stages."""

    def __post_init__(self) -> None:
        for name, value in [("tp", self.tp), ("pp", self.pp)]:
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")

    @property
    def num_gpus(self) -> int:
        return self.tp * self.pp

    def kv_heads_per_gpu(self, num_kv_heads: int) -> int:
        return max(1, num_kv_heads // self.tp)

    def check(self, shape: ModelShape) -> None:
        """Raise ``ValueError`` when ``shape`` cannot be split this way."""
        a = shape.args

        def fits(tp: int) -> bool:
            kv = shape.num_kv_heads % tp == 0 or tp % shape.num_kv_heads == 0
            return kv and (a is None or (a.num_heads % tp == 0 and a.intermediate_size % tp == 0))

        if not fits(self.tp):
            sizes = f"num_key_value_heads {shape.num_kv_heads}"
            if a is not None:
                sizes = f"num_attention_heads {a.num_heads}, {sizes}, intermediate_size {a.intermediate_size}"
            limit = a.num_heads if a is not None else 8 * shape.num_kv_heads
            allowed = ", ".join(str(t) for t in range(1, limit + 1) if fits(t))
            raise ValueError(
                f"tp {self.tp} does not split this model ({sizes}): tp must divide num_attention_heads "
                f"and intermediate_size, and divide num_key_value_heads or be a multiple of it "
                f"(KV heads are then replicated); allowed tp: {allowed}"
            )
        if self.pp > shape.num_layers:
            raise ValueError(f"pp must be in [1, {shape.num_layers}] (the model's layer count), got {self.pp}")


def stage_bounds(shape: ModelShape, pp: int) -> list[tuple[int, int]]:
    """Each stage's layers [start, end), as the engine splits them (``stage_layers``); a shape
    given by hand has no LM head size, so its split is by layer count alone."""
    args = shape.args or LlamaArgs(
        vocab_size=0, hidden_size=1, intermediate_size=0, num_layers=shape.num_layers, num_heads=1,
        num_kv_heads=1, head_dim=1, rms_norm_eps=1e-6, rope_theta=1e4, rope_scaling=None,
        max_position=shape.max_position, tie_word_embeddings=False, attention_bias=False,
    )  # fmt: skip
    return stage_layers(args, pp)


def kv_bytes_per_token(shape: ModelShape, kv_dtype: torch.dtype) -> int:
    """KV cache bytes one token takes in the whole model: K and V rows of every layer and KV head."""
    return 2 * shape.num_layers * shape.num_kv_heads * kv_bytes_per_row(shape.head_dim, kv_dtype)


@dataclass(frozen=True)
class GpuShare:
    """What each GPU of pipeline stage ``stage`` holds."""

    stage: int
    layer_start: int
    layer_end: int
    num_params: int
    weight_bytes: int
    kv_bytes_per_token: int
    """This GPU's KV cache bytes per token: its KV heads of its layers."""


def gpu_shares(
    shape: ModelShape,
    layout: ParallelLayout,
    dtype: torch.dtype,
    quantization: str = "none",
    kv_cache_dtype: torch.dtype | None = None,
) -> tuple[GpuShare, ...]:
    """One ``GpuShare`` per pipeline stage. ``dtype``: the activations' (and unquantized
    weights') dtype; ``kv_cache_dtype`` None: the cache is in ``dtype``."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}; got {quantization!r}")
    kv_dtype = kv_cache_dtype or dtype
    if is_quantized(kv_dtype) and shape.head_dim % 4:
        raise ValueError(f"a quantized kv_cache_dtype needs head_dim divisible by 4, got {shape.head_dim}")
    layout.check(shape)
    act = dtype.itemsize
    weight = act if quantization == "none" else 1
    kv_heads = layout.kv_heads_per_gpu(shape.num_kv_heads)
    row = kv_bytes_per_row(shape.head_dim, kv_dtype)
    shares = []
    for stage, (start, end) in enumerate(stage_bounds(shape, layout.pp)):
        if shape.args is not None:
            held = _gpu_params(shape.args, layout.tp, kv_heads, start, end)
            scales = 0 if quantization == "none" else held.channels * SCALE_BYTES_PER_CHANNEL
            num_params = held.linear + held.other
            weight_bytes = held.linear * weight + held.other * act + scales
        else:
            num_params = shape.num_params * (end - start) // (shape.num_layers * layout.tp)
            weight_bytes = num_params * weight
        shares.append(GpuShare(stage, start, end, num_params, weight_bytes, 2 * (end - start) * kv_heads * row))
    return tuple(shares)


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
    bytes for logits and sampling; every stage adds its rotary cos/sin tables (fp32). Not
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
    reserve = max_num_batched_tokens * per_token + 2 * shape.max_position * shape.head_dim * 4
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
