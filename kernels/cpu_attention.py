"""Paged decode (and, from ``cpu_prefill``, prefill) attention for CPUs, in C++ (compiled once
on first use, then cached).

The pure-torch twin (``attention_ref.paged_decode_attention_ref``) spends its time in
per-sequence tensor ops: ~10 dispatches per sequence per layer. This kernel walks each
sequence's blocks directly, one (sequence, KV head) pair per task on torch's intra-op thread
pool, with a running max and sum (online softmax) so nothing is gathered or padded. Same
signature as the twin; the tests compare the two.

Build: with the machine's C++ compiler, once, into kvtide's cache (``cpu_build``: at setup, or
when a shard starts); ``available()`` says whether it is built and loaded. ``-fopenmp`` makes
``at::parallel_for`` use torch's OpenMP threads (without it, the tasks ran on one thread).
"""

from __future__ import annotations

import functools
import logging

import torch

from kvtide.kernels import cpu_build, cpu_prefill
from kvtide.kernels.cpu_build import CppExtension

logger = logging.getLogger(__name__)

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <limits>
#include <vector>

// out, query: [num_seqs, num_heads, head_dim] f32; k/v_cache: [num_blocks, num_kv_heads,
// block_size, head_dim] f32; block_tables: [num_seqs, max_blocks] i64; seq_lens: [num_seqs] i64.
void paged_decode_attention(torch::Tensor out, torch::Tensor query, torch::Tensor k_cache,
                            torch::Tensor v_cache, torch::Tensor block_tables,
                            torch::Tensor seq_lens, double scale) {
  const int64_t num_seqs = query.size(0), num_heads = query.size(1), head_dim = query.size(2);
  const int64_t num_kv_heads = k_cache.size(1), block_size = k_cache.size(2);
  const int64_t group = num_heads / num_kv_heads, max_blocks = block_tables.size(1);
  const float* q = query.data_ptr<float>();
  const float* kc = k_cache.data_ptr<float>();
  const float* vc = v_cache.data_ptr<float>();
  const int64_t* bt = block_tables.data_ptr<int64_t>();
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  float* o = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, num_seqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(group * head_dim), m(group), l(group), s(group);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t seq = task / num_kv_heads, kvh = task % num_kv_heads;
      const int64_t len = lens[seq];
      const float* qs = q + (seq * num_heads + kvh * group) * head_dim;
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
      std::fill(l.begin(), l.end(), 0.f);
      for (int64_t pos = 0; pos < len; ++pos) {
        const int64_t block = bt[seq * max_blocks + pos / block_size];
        const int64_t row = ((block * num_kv_heads + kvh) * block_size + pos % block_size) * head_dim;
        const float* k = kc + row;
        const float* v = vc + row;
        for (int64_t g = 0; g < group; ++g) {
          const float* qg = qs + g * head_dim;
          float dot = 0.f;
          for (int64_t d = 0; d < head_dim; ++d) dot += qg[d] * k[d];
          dot *= sc;
          float* a = acc.data() + g * head_dim;
          if (dot > m[g]) {  // rescale what was accumulated under the old max
            const float r = std::exp(m[g] - dot);
            l[g] *= r;
            for (int64_t d = 0; d < head_dim; ++d) a[d] *= r;
            m[g] = dot;
          }
          const float p = std::exp(dot - m[g]);
          l[g] += p;
          for (int64_t d = 0; d < head_dim; ++d) a[d] += p * v[d];
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        float* os = o + (seq * num_heads + kvh * group + g) * head_dim;
        const float inv = 1.f / l[g];
        for (int64_t d = 0; d < head_dim; ++d) os[d] = acc[g * head_dim + d] * inv;
      }
    }
  });
}
"""


EXTENSION = CppExtension(
    name="cpu_attention",
    source=_SOURCE + cpu_prefill.SOURCE,
    functions=("paged_decode_attention", "paged_prefill_attention"),
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
) -> torch.Tensor:
    """Same contract as ``paged_decode_attention_ref``; float32 CPU tensors only."""
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
        block_tables.to(torch.int64).contiguous(), seq_lens.to(torch.int64).contiguous(), scale,
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
) -> torch.Tensor:
    """Same contract as ``paged_prefill_attention_ref`` without quantized caches: every chunk's
    context (its new K/V included) is read from the cache. float32 CPU tensors; ``query`` may
    be a view of the QKV projection (rows strided, heads contiguous); see ``cpu_prefill``."""
    out = torch.empty(query.shape, dtype=query.dtype) if out is None else out
    query_start_loc = query_start_loc.to(torch.int64).contiguous()
    seq_lens = seq_lens.to(torch.int64).contiguous()
    cpu_prefill.check_prefill_args(query, k_cache, v_cache, block_tables, query_start_loc, seq_lens, out)
    _module().paged_prefill_attention(
        out, query, k_cache, v_cache, block_tables.to(torch.int64).contiguous(), query_start_loc, seq_lens, scale
    )
    return out
