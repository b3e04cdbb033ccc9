"""Rotary position embedding (NeoX/HF "rotate half" layout), with Llama 3 frequency scaling."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from kvtide.kernels import cpu_ops
from kvtide.kernels.norm_rope_ref import rotary_embedding_ref as apply_rotary
from kvtide.workers.layers import fused
from torch import nn


def _inv_freq(head_dim: int, base: float, scaling: dict[str, Any] | None, device: torch.device | None) -> torch.Tensor:
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (base**exponents)
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return inv_freq
    if kind != "llama3":
        raise ValueError(f"rope_scaling type {kind!r} is not supported; supported: default, llama3")
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin tables [max_position, head_dim], non-persistent buffers.

    NOTE (dtype): the tables are computed in fp32 (positions times fp32 inverse frequencies,
    as transformers' LlamaRotaryEmbedding does) and stored in ``dtype``, the model's: HF casts
    its fp32 cos/sin to the activations' dtype before use, so the rounded tables hold exactly
    the values HF applies, in half the memory of fp32 ones for bf16/fp16.
    """

    def __init__(
        self,
        head_dim: int,
        max_position: int,
        base: float,
        scaling: dict[str, Any] | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.head_dim, self.max_position, self.base, self.scaling = head_dim, max_position, base, scaling
        # On the meta device (the loader builds there) these are shapes only; ``compute_tables``
        # fills them once the module has storage on its device.
        cos, sin = self._tables(None)
        self.register_buffer("cos", cos.to(dtype), persistent=False)
        self.register_buffer("sin", sin.to(dtype), persistent=False)

    def _tables(self, device: torch.device | None) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = _inv_freq(self.head_dim, self.base, self.scaling, device)
        t = torch.arange(self.max_position, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)  # [max_position, head_dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    @torch.no_grad()
    def compute_tables(self) -> None:
        """(Re)compute the tables on the device and in the dtype the buffers have: after
        ``to_empty`` moved a meta-built model onto its device with uninitialized storage."""
        cos, sin = self._tables(self.cos.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def for_step(self, positions: torch.Tensor, dtype: torch.dtype) -> RopeStep:
        """What every layer of one step applies: the Triton kernel for CUDA tensors (head_dim a
        power of two); in place through the compiled CPU op for fp32 on CPU; else the torch
        twin. cos/sin are gathered once per step, shared by every layer."""
        if fused.triton_usable(self.cos) and self.head_dim & (self.head_dim - 1) == 0:
            return RopeStep(positions, None, None, self.cos_sin(positions, dtype), fused.triton_kernels().rotary_embedding)
        if cpu_ops.usable(self.cos) and dtype == torch.float32:
            return RopeStep(positions, self.cos, self.sin)
        return RopeStep(positions, None, None, self.cos_sin(positions, dtype))

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [num_tokens] -> cos, sin: [num_tokens, 1, head_dim] in ``dtype``."""
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)


@dataclass(frozen=True)
class RopeStep:
    positions: torch.Tensor
    cos_table: torch.Tensor | None
    """[max_position, head_dim] for the compiled CPU op; None otherwise."""
    sin_table: torch.Tensor | None
    gathered: tuple[torch.Tensor, torch.Tensor] | None = None
    """cos, sin at ``positions`` [num_tokens, 1, head_dim] for ``rotate``."""
    rotate: Callable[..., tuple[torch.Tensor, torch.Tensor]] = apply_rotary
    """(q, k, cos, sin) -> rotated (q, k): the torch twin or the Triton launcher."""

    def apply(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [num_tokens, num_heads, head_dim]; k likewise with kv heads. The compiled CPU path
        rotates q and k in place (they are views of this step's projection output)."""
        if self.gathered is not None:
            return self.rotate(q, k, *self.gathered)
        cpu_ops.rotary_embedding(q, k, self.positions, self.cos_table, self.sin_table)
        return q, k
