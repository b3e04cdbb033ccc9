"""KV-cache write (slot mapping) as a Triton kernel: plain fp32/fp16/bf16 and quantized.

Each program writes a few new tokens with all their KV heads: K and V rows go to flat slot
``slot_mapping[token]`` of the paged cache (layout in ``attention_ref``). For an int8 or fp8
cache each (token, head) row is quantized with its own scale, as ``kv_quant`` describes; the
torch twin is ``attention_ref.write_kv_ref``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvtide.kernels.kv_quant import MIN_ABSMAX, QMAX, is_quantized
from kvtide.kernels.triton_checks import (
    FLOAT_DTYPES,
    check,
    check_device,
    check_head_dim,
    check_tensor,
)

_QUANT_NONE, _QUANT_FP8, _QUANT_INT8 = 0, 1, 2


@triton.jit
def round_to_e4m3(x):
    """Round fp32 values in [-448, 448] to the nearest fp8 e4m3 value (ties to even), in fp32.

    NOTE: the Triton interpreter's fp32 -> fp8 cast truncates the exponent when rounding
    carries into it (125.6 becomes 64, not 128), so the rounding is done here in exact fp32
    arithmetic and the cast that follows only ever sees representable values.
    """
    a = tl.abs(x)
    # Normal range (>= 2^-6): keep 3 of fp32's 23 mantissa bits, round to nearest even.
    bits = a.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000
    normal = bits.to(tl.float32, bitcast=True)
    # Subnormal range: a multiple of 2^-9; adding and removing 1.5 * 2^23 rounds to an integer.
    sub = ((a * 512.0 + 12582912.0) - 12582912.0) * (1.0 / 512.0)
    r = tl.where(a < 0.015625, sub, normal)
    return tl.where(x < 0, -r, r)


@triton.jit
def _quantize(x, QUANT: tl.constexpr, QMAX_: tl.constexpr, MIN_ABSMAX_: tl.constexpr):
    """x: [BLOCK_T, HEADS_PAD, HEAD_DIM] fp32 -> (codes in fp32, scales [BLOCK_T, HEADS_PAD])."""
    absmax = tl.maximum(tl.max(tl.abs(x), axis=2), MIN_ABSMAX_)
    qmax = tl.full(absmax.shape, QMAX_, tl.float32)
    scaled = x * tl.div_rn(qmax, absmax)[:, :, None]
    scaled = tl.minimum(tl.maximum(scaled, -QMAX_), QMAX_)
    if QUANT == 1:
        codes = round_to_e4m3(scaled)
    else:
        codes = scaled + tl.where(scaled >= 0, 0.5, -0.5)  # half away from zero, then truncate
    return codes, tl.div_rn(absmax, qmax)


@triton.jit
def _write_kv_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, slot_ptr,
    num_tokens, num_kv_heads, block_size, num_slots,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_ch, stride_ct,
    stride_sb, stride_sh, stride_st,
    HEAD_DIM: tl.constexpr, HEADS_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
    QUANT: tl.constexpr, QMAX_: tl.constexpr, MIN_ABSMAX_: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.arange(0, HEADS_PAD)
    d = tl.arange(0, HEAD_DIM)
    slot = tl.load(slot_ptr + t, mask=t < num_tokens, other=-1).to(tl.int64)
    # NOTE: a negative slot marks a padding token with nothing to store; a slot past the
    # cache breaks the launcher's contract and is dropped rather than written out of bounds.
    rows = ((slot >= 0) & (slot < num_slots))[:, None] & (h < num_kv_heads)[None, :]  # [BLOCK_T, HEADS_PAD]
    mask = rows[:, :, None]
    t3 = t[:, None, None]
    h3 = h[None, :, None]
    d3 = d[None, None, :]
    k = tl.load(key_ptr + t3 * stride_kt + h3 * stride_kh + d3, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(value_ptr + t3 * stride_vt + h3 * stride_vh + d3, mask=mask, other=0.0).to(tl.float32)
    block = slot // block_size
    offset = slot % block_size
    row_off = block[:, None] * stride_cb + h[None, :] * stride_ch + offset[:, None] * stride_ct
    if QUANT == 0:
        tl.store(k_cache_ptr + row_off[:, :, None] + d3, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + row_off[:, :, None] + d3, v.to(v_cache_ptr.dtype.element_ty), mask=mask)
    else:
        scale_off = block[:, None] * stride_sb + h[None, :] * stride_sh + offset[:, None] * stride_st
        k_codes, k_scales = _quantize(k, QUANT, QMAX_, MIN_ABSMAX_)
        v_codes, v_scales = _quantize(v, QUANT, QMAX_, MIN_ABSMAX_)
        tl.store(k_cache_ptr + row_off[:, :, None] + d3, k_codes.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + row_off[:, :, None] + d3, v_codes.to(v_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(k_scale_ptr + scale_off, k_scales, mask=rows)
        tl.store(v_scale_ptr + scale_off, v_scales, mask=rows)


def check_kv_cache(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
    head_dim: int,
    compute_dtype: torch.dtype,
) -> None:
    """Shared by every kernel that reads or writes the paged cache."""
    allowed = (compute_dtype, torch.float8_e4m3fn, torch.int8)
    check_tensor("k_cache", k_cache, dim=4, dtypes=allowed, shape=(None, None, None, head_dim))
    check(
        v_cache.shape == k_cache.shape and v_cache.stride() == k_cache.stride() and v_cache.dtype == k_cache.dtype,
        f"v_cache must match k_cache: shape {tuple(k_cache.shape)}, strides {k_cache.stride()}, "
        f"dtype {k_cache.dtype}; got {tuple(v_cache.shape)}, {v_cache.stride()}, {v_cache.dtype}",
    )
    if is_quantized(k_cache.dtype):
        check(k_scale is not None and v_scale is not None, f"a {k_cache.dtype} cache needs k_scale and v_scale")
        check_tensor("k_scale", k_scale, dim=3, dtypes=(torch.float32,), shape=k_cache.shape[:3])
        check(
            v_scale.shape == k_scale.shape and v_scale.stride() == k_scale.stride() and v_scale.dtype == torch.float32,
            f"v_scale must match k_scale: shape {tuple(k_scale.shape)}, strides {k_scale.stride()}, float32; "
            f"got {tuple(v_scale.shape)}, {v_scale.stride()}, {v_scale.dtype}",
        )
    else:
        check(k_scale is None and v_scale is None, f"k_scale/v_scale are only for int8/fp8 caches, not {k_cache.dtype}")


def scale_strides(k_scale: torch.Tensor | None) -> tuple[int, int, int]:
    return k_scale.stride() if k_scale is not None else (0, 0, 0)


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Scatter new K/V into the cache (same contract as ``write_kv_ref``).

    key, value: [num_tokens, num_kv_heads, head_dim]; k_cache, v_cache: [num_blocks,
    num_kv_heads, block_size, head_dim]; slot_mapping: [num_tokens] int32/int64 on the same
    device; k_scale, v_scale: [num_blocks, num_kv_heads, block_size] fp32 for an int8/fp8 cache.

    Never reads device memory, so it never syncs with the host. The producer's contract,
    unchecked here: each slot is -1 (a padding token, skipped) or in ``[0, num_blocks *
    block_size)``, and no two tokens share a slot; a slot past the cache is dropped.
    """
    check_tensor("key", key, dim=3, dtypes=FLOAT_DTYPES)
    num_tokens, num_kv_heads, head_dim = key.shape
    check_head_dim(head_dim)
    check_tensor("value", value, dim=3, dtypes=(key.dtype,), shape=key.shape)
    check_kv_cache(k_cache, v_cache, k_scale, v_scale, head_dim, key.dtype)
    check(
        k_cache.shape[1] == num_kv_heads,
        f"k_cache has {k_cache.shape[1]} KV heads but key has {num_kv_heads}",
    )
    check_tensor("slot_mapping", slot_mapping, dim=1, dtypes=(torch.int32, torch.int64), shape=(num_tokens,))
    check_device(_write_kv_kernel, key=key, value=value, k_cache=k_cache, v_cache=v_cache,
                 k_scale=k_scale, v_scale=v_scale, slot_mapping=slot_mapping)
    if num_tokens == 0:
        return
    quant = {torch.float8_e4m3fn: _QUANT_FP8, torch.int8: _QUANT_INT8}.get(k_cache.dtype, _QUANT_NONE)
    heads_pad = triton.next_power_of_2(num_kv_heads)
    # About 4K values of K per program: a few tokens of a large model, more of a small one.
    block_t = max(1, min(64, 4096 // (heads_pad * head_dim)))
    _write_kv_kernel[(triton.cdiv(num_tokens, block_t),)](
        key, value, k_cache, v_cache,
        k_scale if k_scale is not None else k_cache, v_scale if v_scale is not None else v_cache,
        slot_mapping,
        num_tokens, num_kv_heads, k_cache.shape[2], k_cache.shape[0] * k_cache.shape[2],
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        *scale_strides(k_scale),
        HEAD_DIM=head_dim, HEADS_PAD=heads_pad, BLOCK_T=block_t,
        QUANT=quant, QMAX_=QMAX.get(k_cache.dtype, 1.0), MIN_ABSMAX_=MIN_ABSMAX,
    )
