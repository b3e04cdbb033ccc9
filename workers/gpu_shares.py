"""What each GPU of a replica holds: its stage's layers, its slice of the weights and of the KV
heads (the accounting ``sizing.py``'s docstring describes), for a model shape read from an HF
config or given by hand."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from kvtide.kernels.kv_quant import is_quantized, kv_bytes_per_row
from kvtide.workers.models.llama import LlamaArgs
from kvtide.workers.quantization import QUANTIZATIONS
from kvtide.workers.shard import stage_layers

SCALE_BYTES_PER_CHANNEL = 4
"""fp8/int8 linear layers keep one fp32 scale per output channel (``weight_scale``)."""


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
