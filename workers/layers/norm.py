"""RMSNorm with an optional fused residual add: Triton on CUDA, one compiled pass on CPU fp32,
the torch twin otherwise (workers/layers/fused.py)."""

from __future__ import annotations

import torch
from torch import nn

from kvtide.kernels import cpu_ops
from kvtide.kernels.norm_rope_ref import rms_norm_ref
from kvtide.workers.layers import fused


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype = torch.float32) -> None:
        """``dtype``: the model's. NOTE: the weight is stored in the activations' dtype, as
        transformers' LlamaRMSNorm holds it: the statistics are fp32 inside every
        implementation, and ``weight * normed.to(dtype)`` then returns the activations' dtype.
        An fp32 weight would promote the output to fp32 (and differ from HF by the rounding
        of the weight)."""
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [num_tokens, hidden]. Returns (normed, residual): with ``residual`` given, the
        input is ``x + residual`` and that sum is the new residual. ``normed`` has x's dtype
        when the weight does.

        NOTE: on the compiled CPU path ``residual`` is updated in place and returned (one
        pass instead of five ops); callers never reuse the residual they pass in."""
        if fused.triton_usable(x, self.weight):
            return fused.triton_kernels().rms_norm(x, self.weight, self.eps, residual)
        if cpu_ops.usable(x, self.weight):
            return cpu_ops.fused_add_rms_norm(x, self.weight, self.eps, residual)
        return rms_norm_ref(x, self.weight, self.eps, residual)
