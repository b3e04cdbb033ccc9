"""Which implementation runs the layers' fused RMSNorm and rotary embedding.

- CUDA tensors: the Triton kernels (``kernels/triton_norm_rope.py``), imported on first use so
  a CPU-only process never compiles or imports them.
- fp32 CPU tensors: the compiled CPU ops (``kernels/cpu_ops.py``), when built.
- anything else (bf16/fp16 on CPU, or no compiler): the torch twins
  (``kernels/norm_rope_ref.py``), which compute as Hugging Face's Llama does.
"""

from __future__ import annotations

from types import ModuleType

import torch


def triton_usable(*tensors: torch.Tensor) -> bool:
    """Whether the Triton kernels take these tensors: all on a CUDA device.

    NOTE: tests replace this function to run the Triton path on CPU tensors under
    ``TRITON_INTERPRET=1``; the layers call it through this module for that reason."""
    return all(t.is_cuda for t in tensors)


def triton_kernels() -> ModuleType:
    """``kvtide.kernels.triton_norm_rope``, imported on first use."""
    from kvtide.kernels import triton_norm_rope

    return triton_norm_rope
