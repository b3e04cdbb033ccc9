"""RMSNorm with an optional fused residual add (one compiled pass on CPU fp32)."""

from __future__ import annotations

import torch
from torch import nn

from kvtide.kernels import cpu_ops
from kvtide.kernels.norm_rope_ref import rms_norm_ref


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [num_tokens, hidden]. Returns (normed, residual): with ``residual`` given, the
        input is ``x + residual`` and that sum is the new residual.

        NOTE: on the compiled CPU path ``residual`` is updated in place and returned (one
        pass instead of five ops); callers never reuse the residual they pass in."""
        if cpu_ops.usable(x, self.weight):
            return cpu_ops.fused_add_rms_norm(x, self.weight, self.eps, residual)
        return rms_norm_ref(x, self.weight, self.eps, residual)
