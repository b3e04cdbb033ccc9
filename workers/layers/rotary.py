"""Rotary position embedding (NeoX/HF "rotate half" layout), with Llama 3 frequency scaling."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from kvtide.kernels import cpu_ops
from kvtide.kernels.norm_rope_ref import rotary_embedding_ref as apply_rotary
from torch import nn


def _inv_freq(head_dim: int, base: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
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
    def __init__(
        self,
        head_dim: int,
        max_position: int,
        base: float,
        scaling: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        inv_freq = _inv_freq(head_dim, base, scaling)
        t = torch.arange(max_position, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # [max_position, head_dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def for_step(self, positions: torch.Tensor, dtype: torch.dtype) -> RopeStep:
        """What every layer of one step applies: in place through the compiled CPU op for
        fp32 on CPU, else with cos/sin gathered once per step."""
        if cpu_ops.usable(self.cos) and dtype == torch.float32:
            return RopeStep(positions, self.cos, self.sin)
        return RopeStep(positions, None, None, self.cos_sin(positions, dtype))

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [num_tokens] -> cos, sin: [num_tokens, 1, head_dim], computed once per step
        and shared by every layer."""
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)


@dataclass(frozen=True)
class RopeStep:
    positions: torch.Tensor
    cos_table: torch.Tensor | None
    """[max_position, head_dim] for the compiled op; None on the torch path."""
    sin_table: torch.Tensor | None
    gathered: tuple[torch.Tensor, torch.Tensor] | None = None
    """cos, sin at ``positions`` for the torch path."""

    def apply(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [num_tokens, num_heads, head_dim]; k likewise with kv heads. The compiled path
        rotates q and k in place (they are views of this step's projection output)."""
        if self.gathered is not None:
            return apply_rotary(q, k, *self.gathered)
        cpu_ops.rotary_embedding(q, k, self.positions, self.cos_table, self.sin_table)
        return q, k
