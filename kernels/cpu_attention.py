"""Paged decode and prefill attention for CPUs, in C++ (compiled once on first use, then
cached): one extension built from ``cpu_prefill``'s, ``cpu_decode_tile``'s and ``cpu_decode``'s
sources, and the checked Python entry points to both.

The pure-torch twin (``attention_ref.paged_decode_attention_ref``) spends its time in
per-sequence tensor ops: ~10 dispatches per sequence per layer. The kernels walk each
sequence's blocks directly, so nothing is gathered or padded. Same signatures as the twins;
the tests compare them.

Build: with the machine's C++ compiler, once, into kvtide's cache (``cpu_build``: at setup, or
when a shard starts); ``available()`` says whether it is built and loaded. ``-fopenmp`` makes
``at::parallel_for`` use torch's OpenMP threads (without it, the tasks ran on one thread).
"""

from __future__ import annotations

import functools
import logging

import torch

from kvtide.kernels import cpu_build, cpu_decode, cpu_decode_tile, cpu_prefill, cpu_prefill_avx2
from kvtide.kernels.cpu_build import CppExtension

logger = logging.getLogger(__name__)

_HEADER = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <limits>
#include <vector>
"""


EXTENSION = CppExtension(
    name="cpu_attention",
    source=_HEADER + cpu_prefill_avx2.SOURCE + cpu_prefill.SOURCE + cpu_decode_tile.SOURCE + cpu_decode.SOURCE,
    functions=("paged_decode_attention", "paged_prefill_attention", "decode_splits"),
    cflags=("-O3", "-march=native", "-ffast-math", "-fno-finite-math-only", "-fopenmp"),
)


@functools.cache
def _module():
    """The built extension, building it first (bounded, in a child process) if it is missing."""
    if not cpu_build.is_built(EXTENSION):
        (result,) = cpu_build.build([EXTENSION])
        if result.error is not None:
            raise RuntimeError(result.error)
    return cpu_build.load(EXTENSION)


@functools.cache
def available() -> bool:
    """True when the kernel is built and loaded in this process (``cpu_build.prepare`` does it at
    start-up). Cached: a failed build is tried, and reported, once per process."""
    try:
        _module()
    except Exception as exc:  # no compiler, a failed or timed-out build: the torch twin serves
        logger.warning("the CPU attention kernel is unavailable (%s); its torch twin serves", exc)
        return False
    return True


def paged_decode_attention_cpu(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    tiled: bool = True,
) -> torch.Tensor:
    """Same contract as ``paged_decode_attention_ref``; float32 CPU tensors only. ``tiled=False``
    forces the generic per-key path (what bench/decode_attention.py measures against)."""
    num_seqs, num_heads, head_dim = query.shape
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.shape[3] != head_dim:
        raise ValueError(
            f"k_cache/v_cache must be [num_blocks, num_kv_heads, block_size, {head_dim}], "
            f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if num_heads % k_cache.shape[1]:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({k_cache.shape[1]})")
    for name, t in (("query", query), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous float32 CPU tensor, got {t.dtype} on {t.device}")
    if block_tables.shape[0] != num_seqs or seq_lens.shape != (num_seqs,):
        raise ValueError(
            f"block_tables {tuple(block_tables.shape)} and seq_lens {tuple(seq_lens.shape)} "
            f"must have {num_seqs} rows"
        )
    out = torch.empty_like(query)
    _module().paged_decode_attention(
        out, query, k_cache, v_cache,
        block_tables.to(torch.int64).contiguous(), seq_lens.to(torch.int64).contiguous(), scale, tiled,
    )
    return out


def paged_prefill_attention_cpu(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    blocked: bool | None = None,
) -> torch.Tensor:
    """Same contract as ``paged_prefill_attention_ref`` without quantized caches: every chunk's
    context (its new K/V included) is read from the cache. float32 CPU tensors; ``query`` may
    be a view of the QKV projection (rows strided, heads contiguous); see ``cpu_prefill``.
    ``blocked`` picks the task body (default: ``cpu_prefill.blocked_task()``; the blocked one
    exists only in builds with AVX2 and FMA, elsewhere both are the generic one)."""
    out = torch.empty(query.shape, dtype=query.dtype) if out is None else out
    query_start_loc = query_start_loc.to(torch.int64).contiguous()
    seq_lens = seq_lens.to(torch.int64).contiguous()
    cpu_prefill.check_prefill_args(query, k_cache, v_cache, block_tables, query_start_loc, seq_lens, out)
    _module().paged_prefill_attention(
        out, query, k_cache, v_cache, block_tables.to(torch.int64).contiguous(), query_start_loc, seq_lens, scale,
        cpu_prefill.blocked_task() if blocked is None else blocked,
    )
    return out
