"""Fused RMSNorm (+ residual add) and rotary embedding in Triton, each with its torch twin.

The twins are ``norm_rope_ref.py``'s, which the model layers run as their torch path: the
residual sum is rounded to the input dtype before its statistics, which are fp32; rotary is
the NeoX "rotate half" layout with cos/sin rows per token. The kernels compute in fp32 and round once, so fp16/bf16
results may differ from the twins by an ulp.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvtide.kernels.norm_rope_ref import rms_norm_ref, rotary_embedding_ref
from kvtide.kernels.triton_checks import FLOAT_DTYPES, check, check_device, check_tensor

__all__ = ["rms_norm", "rms_norm_ref", "rotary_embedding", "rotary_embedding_ref"]


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr,
    hidden, eps, stride_x, stride_r, stride_o, stride_ro,
    BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):
    row = tl.program_id(0)
    c = tl.arange(0, BLOCK)
    mask = c < hidden
    x = tl.load(x_ptr + row * stride_x + c, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # Round the sum to the input dtype first, as the unfused add does.
        x = (x.to(tl.float32) + tl.load(residual_ptr + row * stride_r + c, mask=mask, other=0.0).to(tl.float32))
        x = x.to(x_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * stride_ro + c, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / hidden + eps)
    normed = (xf * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(weight_ptr + c, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + c, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``rms_norm_ref``; the output dtype is that of ``weight * x``."""
    check_tensor("x", x, dim=2, dtypes=FLOAT_DTYPES)
    num_tokens, hidden = x.shape
    check_tensor("weight", weight, dim=1, dtypes=FLOAT_DTYPES, shape=(hidden,))
    if residual is not None:
        check_tensor("residual", residual, dim=2, dtypes=(x.dtype,), shape=x.shape)
    check(eps >= 0, f"eps must be >= 0, got {eps}")
    check_device(_rms_norm_kernel, x=x, weight=weight, residual=residual)
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    residual_out = torch.empty_like(x) if residual is not None else x
    if num_tokens:
        _rms_norm_kernel[(num_tokens,)](
            x, residual if residual is not None else x, weight, out, residual_out,
            hidden, eps, x.stride(0), residual.stride(0) if residual is not None else 0,
            out.stride(0), residual_out.stride(0),
            BLOCK=triton.next_power_of_2(hidden), HAS_RESIDUAL=residual is not None,
        )
    return out, residual_out


@triton.jit
def _rotary_kernel(
    x_ptr, out_ptr, cos_ptr, sin_ptr, num_heads,
    stride_xt, stride_xh, stride_ot, stride_oh, stride_ct, stride_st,
    HALF: tl.constexpr, HEADS_PAD: tl.constexpr,
):
    t = tl.program_id(0)
    h = tl.arange(0, HEADS_PAD)[:, None]
    i = tl.arange(0, HALF)[None, :]
    mask = h < num_heads
    base = x_ptr + t * stride_xt + h * stride_xh
    x1 = tl.load(base + i, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF + i, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(cos_ptr + t * stride_ct + i).to(tl.float32)
    c2 = tl.load(cos_ptr + t * stride_ct + HALF + i).to(tl.float32)
    s1 = tl.load(sin_ptr + t * stride_st + i).to(tl.float32)
    s2 = tl.load(sin_ptr + t * stride_st + HALF + i).to(tl.float32)
    obase = out_ptr + t * stride_ot + h * stride_oh
    tl.store(obase + i, (x1 * c1 - x2 * s1).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(obase + HALF + i, (x2 * c2 + x1 * s2).to(out_ptr.dtype.element_ty), mask=mask)


def rotary_embedding(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``rotary_embedding_ref``; head_dim a power of two."""
    check_tensor("q", q, dim=3, dtypes=FLOAT_DTYPES)
    num_tokens, _, head_dim = q.shape
    check(head_dim >= 2 and head_dim & (head_dim - 1) == 0, f"head_dim must be a power of two >= 2, got {head_dim}")
    check_tensor("k", k, dim=3, dtypes=(q.dtype,), shape=(num_tokens, None, head_dim))
    for name, t in (("cos", cos), ("sin", sin)):
        check_tensor(name, t, dim=3, dtypes=FLOAT_DTYPES, shape=(num_tokens, 1, head_dim))
    check_device(_rotary_kernel, q=q, k=k, cos=cos, sin=sin)
    outs = []
    for x in (q, k):
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        if num_tokens:
            _rotary_kernel[(num_tokens,)](
                x, out, cos, sin, x.shape[1],
                x.stride(0), x.stride(1), out.stride(0), out.stride(1), cos.stride(0), sin.stride(0),
                HALF=head_dim // 2, HEADS_PAD=triton.next_power_of_2(x.shape[1]),
            )
        outs.append(out)
    return outs[0], outs[1]
