"""Quantized KV cache: the scheme, the cache layout and the pure-torch (de)quantizers.

Scheme: one fp32 scale per (token, KV head), taken from that row's absolute maximum, so
every row uses the full code range of its dtype:
    scale = max(absmax(row), 1e-12) / QMAX        (QMAX: 448 for fp8 e4m3, 127 for int8)
    code  = round(clamp(x * (QMAX / max(absmax, 1e-12)), -QMAX, QMAX))
    x'    = code * scale
fp8 rounds to nearest even (torch's cast); int8 rounds half away from zero. A row is quantized
once, when its token is written, and never rescaled, so later tokens cannot clip it. A static
per-tensor scale (vLLM's default) would cost no scale bytes but needs calibration to keep
int8 accurate; per-row scales need none.

Layout: the (k_cache, v_cache) pair of a layer stays one tensor each, whatever the dtype.
Unquantized caches are [num_blocks, num_kv_heads, block_size, head_dim]. Quantized caches are
    [num_blocks, num_kv_heads, block_size * (head_dim + 4)]  (dtype int8 or float8_e4m3fn)
where each (block, KV head) tile holds its [block_size, head_dim] codes followed by the
block_size fp32 scales of its rows (4 bytes each). ``split_kv_cache`` returns the two views.
NOTE: keeping the scales inside the block means every block operation (copy-on-write copies,
future swaps or transfers) moves codes and scales together, and code rows stay aligned to
head_dim bytes. The cost is the scale bytes: a quantized row takes head_dim + 4 bytes, so at
a fixed budget the cache holds 2 * head_dim / (head_dim + 4) times the blocks of fp16 (1.94x
at head_dim 128, 1.88x at 64), and twice that against fp32.
"""

from __future__ import annotations

import torch

KV_CACHE_DTYPES: dict[str, torch.dtype] = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}
"""The quantized ``kv_cache_dtype`` names and their storage dtypes ("auto" is the model's)."""

QMAX = {torch.float8_e4m3fn: 448.0, torch.int8: 127.0}
"""Largest code magnitude of each quantized dtype."""

SCALE_BYTES = 4
"""One fp32 scale per (token, KV head)."""

MIN_ABSMAX = 1e-12
"""Rows whose absolute maximum is below this are scaled as if it were this (all-zero rows)."""


def is_quantized(dtype: torch.dtype) -> bool:
    return dtype in QMAX


def kv_bytes_per_row(head_dim: int, dtype: torch.dtype) -> int:
    """Cache bytes one (token, KV head) row takes, scale included."""
    if is_quantized(dtype):
        return head_dim + SCALE_BYTES
    return head_dim * torch.empty((), dtype=dtype).element_size()


def allocate_kv_cache(
    num_blocks: int,
    num_kv_heads: int,
    block_size: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """A zeroed K or V cache in the layout above (zero codes and zero scales read as 0.0)."""
    if is_quantized(dtype):
        if head_dim % SCALE_BYTES:
            raise ValueError(f"quantized KV caches need head_dim divisible by 4, got {head_dim}")
        shape: tuple[int, ...] = (num_blocks, num_kv_heads, block_size * (head_dim + SCALE_BYTES))
    else:
        shape = (num_blocks, num_kv_heads, block_size, head_dim)
    return torch.zeros(shape, dtype=dtype, device=device)


def split_kv_cache(cache: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(codes, scales) views of a cache from ``allocate_kv_cache``.

    codes: [num_blocks, num_kv_heads, block_size, head_dim] (the cache itself when unquantized);
    scales: [num_blocks, num_kv_heads, block_size] fp32, or None when unquantized.
    """
    if not is_quantized(cache.dtype):
        return cache, None
    row = head_dim + SCALE_BYTES
    if cache.dim() != 3 or cache.shape[2] % row:
        raise ValueError(
            f"a quantized KV cache must be [num_blocks, num_kv_heads, block_size * {row}] "
            f"for head_dim {head_dim}, got {tuple(cache.shape)}"
        )
    block_size = cache.shape[2] // row
    codes = cache[:, :, : block_size * head_dim].unflatten(2, (block_size, head_dim))
    scales = cache[:, :, block_size * head_dim :].view(torch.float32)
    return codes, scales


def quantize_ref(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [..., head_dim] -> (codes [..., head_dim] of ``dtype``, scales [...] fp32)."""
    qmax = QMAX[dtype]
    absmax = x.float().abs().amax(-1).clamp_min(MIN_ABSMAX)
    # NOTE: true tensor-by-tensor divisions: torch turns ``scalar / t`` and ``t / scalar`` into
    # a multiply by a reciprocal, which rounds differently from the kernels' division.
    qmax_t = torch.full_like(absmax, qmax)
    scaled = (x.float() * (qmax_t / absmax).unsqueeze(-1)).clamp(-qmax, qmax)
    if dtype == torch.int8:
        codes = (scaled + torch.where(scaled >= 0, 0.5, -0.5)).trunc().to(torch.int8)
    else:
        codes = scaled.to(dtype)
    return codes, absmax / qmax_t


def dequantize_ref(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """codes [..., head_dim], scales [...] fp32 -> [..., head_dim] of ``dtype`` (computed in fp32)."""
    return (codes.float() * scales.unsqueeze(-1)).to(dtype)
