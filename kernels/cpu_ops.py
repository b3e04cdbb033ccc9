"""Fused per-token ops for CPUs, in C++: RMSNorm with residual add, rotary embedding, KV write,
SiLU-and-mul.

At small batches a decode step on CPU is dominated not by arithmetic but by the ~10 torch
ops each of these takes per layer (each a dispatch, an allocation and a thread-pool wake-up):
~300 small ops per step for a 30-layer model. Each kernel here is one pass over the rows,
in place where the caller allows it, on torch's intra-op pool for big batches and inline for
small ones. Each has a pure-torch twin that the tests compare against and that serves when
the compiler is missing: ``norm_rope_ref.rms_norm_ref``, ``rotary_embedding_ref`` here (the
shared rotary on table rows, in place), ``attention_ref.write_kv_ref`` and
``norm_rope_ref.silu_and_mul_ref``.

Numerics: rounding follows the twins' op order (fp32 statistics for the norm; ``x*cos -
y*sin`` for rotary, with floating-point contraction off so no FMA changes the rounding), so
greedy output stays equal to the reference implementations.

Build: with the machine's C++ compiler, once, into kvtide's cache (``cpu_build``: at setup, or
when a shard starts); ``available()`` says whether they are built and loaded. ``-fopenmp``
makes ``at::parallel_for`` use torch's OpenMP threads; without it every kernel ran on one.
"""

from __future__ import annotations

import functools
import logging

import torch

from kvtide.kernels import cpu_build
from kvtide.kernels.cpu_build import CppExtension
from kvtide.kernels.norm_rope_ref import rotary_embedding_ref as rotary_embedding_ref_rows

logger = logging.getLogger(__name__)

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstring>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#include <sleef.h>
#endif

static inline int64_t grain(int64_t row_cost) {
  // Rows per task: keep tasks above ~16k element-ops so small batches run inline.
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, row_cost));
}

// residual (in place) = x + residual, out = weight * (residual * rsqrt(mean(residual^2) + eps)).
// x, out, residual: [n, h] f32 contiguous; weight: [h]. With has_residual false the sum is x.
void fused_add_rms_norm(torch::Tensor out, torch::Tensor x, torch::Tensor residual,
                        torch::Tensor weight, double eps, bool has_residual) {
  const int64_t n = x.size(0), h = x.size(1);
  const float* xs = x.data_ptr<float>();
  float* rs = residual.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  float* os = out.data_ptr<float>();
  at::parallel_for(0, n, grain(3 * h), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* xr = xs + t * h;
      float* rr = rs + t * h;
      float* orow = os + t * h;
      const float* src = xr;
      if (has_residual) {
        for (int64_t i = 0; i < h; ++i) rr[i] = xr[i] + rr[i];
        src = rr;
      }
      // Eight partial sums in double, so the loop vectorizes (one running sum was a chain of
      // dependent adds: 5x slower on 940-row prefills); double keeps the fp32 result exact.
      double part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      int64_t i8 = 0;
      for (; i8 + 8 <= h; i8 += 8)
        for (int j = 0; j < 8; ++j) part[j] += static_cast<double>(src[i8 + j]) * src[i8 + j];
      double ss = 0.0;
      for (int j = 0; j < 8; ++j) ss += part[j];
      for (int64_t i = i8; i < h; ++i) ss += static_cast<double>(src[i]) * src[i];
      const float inv = 1.0f / std::sqrt(static_cast<float>(ss / h) + static_cast<float>(eps));
      for (int64_t i = 0; i < h; ++i) orow[i] = w[i] * (src[i] * inv);
    }
  });
}

// In place, NeoX ("rotate half") layout: for i < d/2, (a, b) = (x[i], x[i + d/2]) becomes
// (a*cos[i] - b*sin[i], b*cos[i + d/2] + a*sin[i + d/2]). x: [n, heads, d] with stride 1 on
// the last dim (any strides on the others); cos/sin: [max_position, d] contiguous.
static void rotate(torch::Tensor x, const int64_t* pos, const float* cos, const float* sin) {
  const int64_t n = x.size(0), heads = x.size(1), d = x.size(2), half = d / 2;
  const int64_t s0 = x.stride(0), s1 = x.stride(1);
  float* base = x.data_ptr<float>();
  at::parallel_for(0, n, grain(heads * d * 3), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* c = cos + pos[t] * d;
      const float* s = sin + pos[t] * d;
      for (int64_t hh = 0; hh < heads; ++hh) {
        float* v = base + t * s0 + hh * s1;
        for (int64_t i = 0; i < half; ++i) {
          const float a = v[i], b = v[i + half];
          v[i] = a * c[i] - b * s[i];
          v[i + half] = b * c[i + half] + a * s[i + half];
        }
      }
    }
  });
}

void rotary_embedding(torch::Tensor q, torch::Tensor k, torch::Tensor positions,
                      torch::Tensor cos, torch::Tensor sin) {
  const int64_t* pos = positions.data_ptr<int64_t>();
  rotate(q, pos, cos.data_ptr<float>(), sin.data_ptr<float>());
  rotate(k, pos, cos.data_ptr<float>(), sin.data_ptr<float>());
}

// k_cache/v_cache[slot / bs, head, slot % bs, :] = key/value[t, head, :].
// key/value: [n, kv_heads, d], stride 1 on the last dim; caches [blocks, kv_heads, bs, d].
void write_kv(torch::Tensor key, torch::Tensor value, torch::Tensor k_cache,
              torch::Tensor v_cache, torch::Tensor slot_mapping) {
  const int64_t n = key.size(0), heads = key.size(1), d = key.size(2);
  const int64_t bs = k_cache.size(2);
  const int64_t ks0 = key.stride(0), ks1 = key.stride(1), vs0 = value.stride(0), vs1 = value.stride(1);
  const float* kp = key.data_ptr<float>();
  const float* vp = value.data_ptr<float>();
  float* kc = k_cache.data_ptr<float>();
  float* vc = v_cache.data_ptr<float>();
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const size_t bytes = d * sizeof(float);
  const int64_t num_slots = k_cache.size(0) * bs;
  for (int64_t t = 0; t < n; ++t)
    TORCH_CHECK(slots[t] >= 0 && slots[t] < num_slots, "slot_mapping[", t, "] is ", slots[t],
                "; slots must be in [0, ", num_slots, ")");
  at::parallel_for(0, n, grain(heads * d * 2), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t block = slots[t] / bs, off = slots[t] % bs;
      for (int64_t hh = 0; hh < heads; ++hh) {
        const int64_t row = ((block * heads + hh) * bs + off) * d;
        std::memcpy(kc + row, kp + t * ks0 + hh * ks1, bytes);
        std::memcpy(vc + row, vp + t * vs0 + hh * vs1, bytes);
      }
    }
  });
}

// out[t, i] = silu(x[t, i]) * x[t, h + i] for i < h: the MLP's gate and up halves in one pass.
// silu(g) = g / (1 + exp(-g)) rounded as torch's own CPU kernel rounds it: whole vectors through
// Sleef's expf (u10, the function torch's Vectorized<float>::exp calls, exported by libtorch),
// the tail through std::exp as torch's scalar loop does; one multiply and one division, in
// that order, and no FMA (-ffp-contract=off), so the result is torch's bit for bit.
// x: [n, 2h] f32 with stride 1 on the last dim; out: [n, h] f32 contiguous.
void silu_and_mul(torch::Tensor out, torch::Tensor x) {
  const int64_t n = x.size(0), h = x.size(1) / 2, sx = x.stride(0);
  const float* xs = x.data_ptr<float>();
  float* os = out.data_ptr<float>();
  at::parallel_for(0, n, grain(3 * h), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* g = xs + t * sx;
      const float* u = g + h;
      float* o = os + t * h;
      int64_t i = 0;
#if defined(__AVX512F__)
      const __m512 one = _mm512_set1_ps(1.f), zero = _mm512_setzero_ps();
      for (; i + 16 <= h; i += 16) {
        const __m512 v = _mm512_loadu_ps(g + i);
        const __m512 s = _mm512_div_ps(v, _mm512_add_ps(one, Sleef_expf16_u10(_mm512_sub_ps(zero, v))));
        _mm512_storeu_ps(o + i, _mm512_mul_ps(s, _mm512_loadu_ps(u + i)));
      }
#elif defined(__AVX2__)
      const __m256 one = _mm256_set1_ps(1.f), zero = _mm256_setzero_ps();
      for (; i + 8 <= h; i += 8) {
        const __m256 v = _mm256_loadu_ps(g + i);
        const __m256 s = _mm256_div_ps(v, _mm256_add_ps(one, Sleef_expf8_u10(_mm256_sub_ps(zero, v))));
        _mm256_storeu_ps(o + i, _mm256_mul_ps(s, _mm256_loadu_ps(u + i)));
      }
#endif
      for (; i < h; ++i) o[i] = (g[i] / (1.f + std::exp(-g[i]))) * u[i];
    }
  });
}
"""


EXTENSION = CppExtension(
    name="cpu_ops",
    source=_SOURCE,
    functions=("fused_add_rms_norm", "rotary_embedding", "write_kv", "silu_and_mul"),
    cflags=("-O3", "-march=native", "-ffp-contract=off", "-fopenmp"),
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
        logger.warning("the CPU fused ops are unavailable (%s); their torch twins serve", exc)
        return False
    return True


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the compiled kernels can take these tensors: fp32 on the CPU, kernels built."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors) and available()


# -- RMSNorm with residual ----------------------------------------------------------------


def fused_add_rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``norm_rope_ref.rms_norm_ref``; ``residual`` is updated in place and
    returned."""
    hidden = weight.shape[0]
    if x.dim() != 2 or x.shape[1] != hidden:
        raise ValueError(f"x must be [num_tokens, {hidden}], got {tuple(x.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    x = x.contiguous()
    if residual is not None and not residual.is_contiguous():
        raise ValueError("residual must be contiguous (it is updated in place)")
    out = torch.empty_like(x)
    res = residual if residual is not None else x
    _module().fused_add_rms_norm(out, x, res, weight.contiguous(), eps, residual is not None)
    return out, res


# -- rotary embedding ----------------------------------------------------------------------


def rotary_embedding_ref(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> None:
    """In place on q [n, heads, d] and k [n, kv_heads, d]: ``norm_rope_ref.rotary_embedding_ref``
    with the rows of the [max_position, d] tables ``cos``/``sin`` at ``positions`` [n]."""
    rotated = rotary_embedding_ref_rows(q, k, cos[positions].unsqueeze(1), sin[positions].unsqueeze(1))
    for x, r in zip((q, k), rotated, strict=True):
        x.copy_(r)


def rotary_embedding(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> None:
    """Same contract as the twin."""
    d = q.shape[-1]
    if q.dim() != 3 or k.dim() != 3 or k.shape[-1] != d or d % 2:
        raise ValueError(f"q and k must be [n, heads, d] with the same even d, got {tuple(q.shape)}, {tuple(k.shape)}")
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("q and k must be contiguous in their last dim")
    if cos.shape != sin.shape or cos.dim() != 2 or cos.shape[1] != d:
        raise ValueError(f"cos/sin must be [max_position, {d}], got {tuple(cos.shape)}, {tuple(sin.shape)}")
    if positions.shape != (q.shape[0],) or k.shape[0] != q.shape[0]:
        raise ValueError(f"positions must be [{q.shape[0]}], got {tuple(positions.shape)}")
    _module().rotary_embedding(q, k, positions.to(torch.int64).contiguous(), cos.contiguous(), sin.contiguous())


# -- KV write ------------------------------------------------------------------------------


def write_kv(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Same contract as ``attention_ref.write_kv_ref`` for float32 caches."""
    n, heads, d = key.shape
    if value.shape != key.shape or k_cache.shape != v_cache.shape or k_cache.dim() != 4:
        raise ValueError(f"key/value {tuple(key.shape)}/{tuple(value.shape)} and caches {tuple(k_cache.shape)}/{tuple(v_cache.shape)} do not fit")
    if k_cache.shape[1] != heads or k_cache.shape[3] != d:
        raise ValueError(f"caches must be [num_blocks, {heads}, block_size, {d}], got {tuple(k_cache.shape)}")
    if key.stride(-1) != 1 or value.stride(-1) != 1 or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("key/value must be contiguous in their last dim and the caches contiguous")
    if slot_mapping.shape != (n,):
        raise ValueError(f"slot_mapping must be [{n}], got {tuple(slot_mapping.shape)}")
    _module().write_kv(key, value, k_cache, v_cache, slot_mapping.to(torch.int64).contiguous())


# -- SiLU and multiply ---------------------------------------------------------------------


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """Same contract as ``norm_rope_ref.silu_and_mul_ref``, in one pass with no intermediate
    tensor; bit for bit torch's."""
    if x.dim() != 2 or x.shape[1] % 2:
        raise ValueError(f"x must be [n, 2 * h] (gate | up), got {tuple(x.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty(x.shape[0], x.shape[1] // 2, dtype=x.dtype)
    _module().silu_and_mul(out, x)
    return out
