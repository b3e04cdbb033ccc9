"""Pure-torch RMSNorm (+ residual add) and rotary embedding: the model layers' torch path and
the twin of every compiled version (``triton_norm_rope.py`` on GPU, ``cpu_ops.py`` on CPU).

RMSNorm rounds the residual sum to the input dtype before its statistics, which are fp32.
Rotary is the NeoX ("rotate half") layout with cos/sin rows per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual: [num_tokens, hidden]; weight: [hidden]. Returns (normed, new residual):
    with ``residual`` the input is ``x + residual`` and that sum is the new residual."""
    if residual is not None:
        x = x + residual
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype), x


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_embedding_ref(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [num_tokens, num_heads, head_dim]; k: [num_tokens, num_kv_heads, head_dim];
    cos, sin: [num_tokens, 1, head_dim] in q's dtype. Returns the rotated (q, k)."""
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """x: [n, 2h] (gate | up) -> silu(gate) * up, [n, h], as transformers' Llama MLP computes it."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
