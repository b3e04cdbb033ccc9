"""Linear layers for the few rows of a decode step on CPUs, in C++: ``y = x @ W^T``.

Why: a decode step with M sequences multiplies M rows by every weight once. For small M it is
memory-bound: the floor is the time to read the weights. MKL's sgemm reaches that floor for
one row but not for 2-16 (a 30-layer SmolLM2 step's linears: 18 ms at M=1, 39 ms at M=8 in
MKL, against 24 ms here; bench/linear_small_m.py). This kernel streams each weight row from
memory once, keeps a tile of rows in L1 while every row of ``x`` uses it, and prefetches the
next tile's rows while it computes, so 8 rows cost 1.3x one row instead of MKL's 2.2x. One and
two rows (AVX2, AVX-512) read each thread's weight rows front to back as one stream instead,
which the hardware prefetcher keeps at the read bandwidth.

Layout: ``weight`` is [N, K] row-major (``nn.Linear``'s; the embedding's, for a tied LM head),
so each output is a dot product of two contiguous rows. Threads split the N outputs.

Numerics: fp32 sums in vector lanes, then across lanes: a different order from MKL's, so the
last bit of an output may differ (as between any two BLAS); greedy output against transformers
is checked by the tests, as for every other kernel.

Build: with the machine's C++ compiler, once, into kvtide's cache (``cpu_build``); the code is
chosen at compile time for the CPU that builds it (AVX-512, AVX2+FMA, or plain C++).
``-fopenmp`` makes ``at::parallel_for`` use torch's OpenMP threads (without it, it runs on one).
"""

from __future__ import annotations

import functools
import logging

import torch

from kvtide.kernels import cpu_build, cpu_linear_panels, cpu_simd
from kvtide.kernels.cpu_build import CppExtension

logger = logging.getLogger(__name__)


def _max_rows() -> int:
    """Rows of ``x`` up to which this kernel beats MKL's sgemm, by the ISA torch dispatches to
    and the CPU's vendor. Measured with bench/linear_small_m.py, 2 threads: on an Intel AVX-512
    host MKL was as fast or faster from 17 rows on (even at 32). On AMD EPYC hosts MKL's sgemm
    is slow at every small and mid-sized M, and the dot-product tiles beat it up to 16 rows and
    the packed panels (``cpu_linear_panels``) from 18: on Zen 3 (AVX2) 1.2-1.8x at 24-128 rows,
    1.04-1.08x in whole 1,000-1,024-row prefill steps; on Zen 4 (AVX-512) 1.5-1.7x at 24-128
    and 1.15x at 918 (bench/README.md, "Packed panels"). Above 1,024 rows (a prefill budget
    larger than the default) MKL multiplies: the panels were not measured there."""
    if torch.backends.cpu.get_cpu_capability() == "AVX2" or cpu_simd.cpu_vendor() == "AuthenticAMD":
        return 1024
    return 16


MAX_ROWS = _max_rows()
"""Rows of ``x`` up to which this kernel is used; above it MKL's sgemm."""

_TILES = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif
#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
""" + cpu_simd.REDUCE8 + r"""
#endif

// MT rows of x by NT rows of w per tile: MT * NT vector accumulators, NT weight vectors and one
// x vector stay in registers (32 vector registers with AVX-512, 16 with AVX2). PF: how far
// ahead (in floats) the next tile's weight rows are prefetched. AVX-512: 5 x 5 (31 registers)
// over 8 x 3, 1.05-1.13x on a step's linears at 3-16 rows on Zen 4 (two sweeps of MT x NT,
// bench/README.md "AVX-512 tiles: 5 x 5"); AVX2's 4 x 3 tuned on the first (Intel) host.
// NT1, NT2: the tile's width for one and for two rows of x, where NT leaves registers idle and
// too few independent sums in flight (AVX2: 8 and 6 beat NT's 3 by 1.04-1.11x on a step's layer
// linears and 1.03-1.14x on the LM head in five runs, bench/linear_widths.py; AVX-512 keeps NT,
// not re-measured). STREAM: one and two rows go to stream_rows instead (both ISAs, on Zen 4).
#if defined(__AVX512F__)
using vf = __m512;
constexpr int VL = 16, MT = 5, NT = 5, NT1 = 3, NT2 = 3, PF = 128;
static inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
static inline vf vzero() { return _mm512_setzero_ps(); }
static inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline float vsum(vf a) { return _mm512_reduce_add_ps(a); }
static inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
constexpr bool STREAM = true;  // one or two rows: stream_rows, SU1 / SU2 vectors of k per step
constexpr int SU1 = 2, SU2 = 2;
static inline void prefetch(const float* p) { _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0); }
#elif defined(__AVX2__) && defined(__FMA__)
using vf = __m256;
constexpr int VL = 8, MT = 4, NT = 3, NT1 = 8, NT2 = 6, PF = 64;
static inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
static inline vf vzero() { return _mm256_setzero_ps(); }
static inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline float vsum(vf a) { return hsum8(a); }
static inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
constexpr bool STREAM = true;  // one or two rows: stream_rows, SU1 / SU2 vectors of k per step
constexpr int SU1 = 4, SU2 = 2;
static inline void prefetch(const float* p) { _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0); }
#else
using vf = float;
constexpr int VL = 1, MT = 2, NT = 4, NT1 = 4, NT2 = 4, PF = 64;
static inline vf vload(const float* p) { return *p; }
static inline vf vzero() { return 0.f; }
static inline vf vfma(vf a, vf b, vf c) { return a * b + c; }
static inline float vsum(vf a) { return a; }
static inline vf vadd(vf a, vf b) { return a + b; }
constexpr bool STREAM = false;
constexpr int SU1 = 4, SU2 = 2;
static inline void prefetch(const float* p) { __builtin_prefetch(p); }
#endif

// y[i * ldy + j] = dot(x[i * ldx : +K], w[j * K : +K]) for i < M_, j < N_. The prefetches run
// past the last tile's rows at the end of w: prefetching never faults.
template <int M_, int N_>
static inline void tile(const float* x, int64_t ldx, const float* w, int64_t K, float* y, int64_t ldy) {
  vf acc[M_][N_];
#pragma GCC unroll 32
  for (int i = 0; i < M_; ++i)
#pragma GCC unroll 32
    for (int j = 0; j < N_; ++j) acc[i][j] = vzero();
  int64_t k = 0;
  for (; k + VL <= K; k += VL) {
    vf wv[N_];
#pragma GCC unroll 32
    for (int j = 0; j < N_; ++j) {
      wv[j] = vload(w + j * K + k);
      prefetch(w + (N_ + j) * K + k + PF);
    }
#pragma GCC unroll 32
    for (int i = 0; i < M_; ++i) {
      const vf xv = vload(x + i * ldx + k);
#pragma GCC unroll 32
      for (int j = 0; j < N_; ++j) acc[i][j] = vfma(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < M_; ++i)
    for (int j = 0; j < N_; ++j) {
      float s = vsum(acc[i][j]);
      for (int64_t r = k; r < K; ++r) s += x[i * ldx + r] * w[j * K + r];
      y[i * ldy + j] = s;
    }
}

// M_ rows of x against nn (<= W_) rows of w.
template <int M_, int W_ = NT>
static inline void rows(const float* x, int64_t ldx, const float* w, int64_t K, float* y, int64_t ldy, int64_t nn) {
  if (nn == W_) return tile<M_, W_>(x, ldx, w, K, y, ldy);
  for (int64_t j = 0; j < nn; ++j) tile<M_, 1>(x, ldx, w + j * K, K, y + j, ldy);
}

// All M_ rows of x against all N rows of w in tiles W_ wide: the one- and two-row cases.
template <int M_, int W_>
static void few_rows(const float* xs, int64_t ldx, const float* ws, int64_t K, int64_t N, float* ys) {
  at::parallel_for(0, (N + W_ - 1) / W_, 8, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n0 = t * W_;
      rows<M_, W_>(xs, ldx, ws + n0 * K, K, ys + n0, N, std::min<int64_t>(W_, N - n0));
    }
  });
}

// One or two rows of x (a batch-1 or batch-2 decode step, whose time is the weight read): each
// thread reads its rows of w front to back as one stream, every row of x against each, U_
// vectors of k in flight per row (U_ x M_ accumulators), no software prefetch. The hardware's
// stream prefetcher holds one sequential stream per core at the read bandwidth; the tiles'
// rows side by side did not: on an AMD EPYC (Zen 4) host reading 36-56 GB/s, one row's layers
// took 1.38x and its LM head 1.81x as long with the AVX-512 tiles, 1.05x and 1.21x with the
// AVX2 ones (bench/README.md, "One row, one stream, at 36 GB/s").
template <int M_, int U_>
static void stream_rows(const float* xs, int64_t ldx, const float* ws, int64_t K, int64_t N, float* ys) {
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const float* w = ws + n * K;
      vf acc[U_][M_];
#pragma GCC unroll 8
      for (int u = 0; u < U_; ++u)
#pragma GCC unroll 8
        for (int i = 0; i < M_; ++i) acc[u][i] = vzero();
      int64_t k = 0;
      for (; k + VL * U_ <= K; k += VL * U_) {
#pragma GCC unroll 8
        for (int u = 0; u < U_; ++u) {
          const vf wv = vload(w + k + VL * u);
#pragma GCC unroll 8
          for (int i = 0; i < M_; ++i) acc[u][i] = vfma(vload(xs + i * ldx + k + VL * u), wv, acc[u][i]);
        }
      }
      for (; k + VL <= K; k += VL) {
        const vf wv = vload(w + k);
#pragma GCC unroll 8
        for (int i = 0; i < M_; ++i) acc[0][i] = vfma(vload(xs + i * ldx + k), wv, acc[0][i]);
      }
      for (int i = 0; i < M_; ++i) {
        vf sum = acc[0][i];
        for (int u = 1; u < U_; ++u) sum = vadd(sum, acc[u][i]);
        float s = vsum(sum);
        for (int64_t r = k; r < K; ++r) s += xs[i * ldx + r] * w[r];
        ys[i * N + n] = s;
      }
    }
  });
}

template <int M_>
static inline void rows_upto(int64_t m, const float* x, int64_t ldx, const float* w, int64_t K, float* y,
                             int64_t ldy, int64_t nn) {
  if constexpr (M_ > 1) {
    if (m < M_) return rows_upto<M_ - 1>(m, x, ldx, w, K, y, ldy, nn);
  }
  rows<M_>(x, ldx, w, K, y, ldy, nn);
}

"""

_ENTRY = r"""
// out: [M, N] f32 contiguous; x: [M, K] f32 with contiguous rows; w: [N, K] f32 contiguous.
void linear(torch::Tensor out, torch::Tensor x, torch::Tensor w) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), ldx = x.stride(0);
  const float* xs = x.data_ptr<float>();
  const float* ws = w.data_ptr<float>();
  float* ys = out.data_ptr<float>();
  if (STREAM && M == 1) return stream_rows<1, SU1>(xs, ldx, ws, K, N, ys);
  if (STREAM && M == 2) return stream_rows<2, SU2>(xs, ldx, ws, K, N, ys);
  if (M == 1) return few_rows<1, NT1>(xs, ldx, ws, K, N, ys);
  if (M == 2) return few_rows<2, NT2>(xs, ldx, ws, K, N, ys);
#ifdef KVTIDE_LINEAR_PANELS
  if (M >= panels::MIN_ROWS) return panels::linear(xs, ldx, ws, M, K, N, ys);
#endif
  const int64_t tiles = (N + NT - 1) / NT;
  at::parallel_for(0, tiles, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n0 = t * NT, nn = std::min<int64_t>(NT, N - n0);
      for (int64_t m0 = 0; m0 < M; m0 += MT)  // the tile's weight rows stay in L1 across these
        rows_upto<MT>(std::min<int64_t>(MT, M - m0), xs + m0 * ldx, ldx, ws + n0 * K, K, ys + m0 * N + n0, N, nn);
    }
  });
}
"""


_SOURCE = _TILES + cpu_linear_panels.SOURCE + _ENTRY

EXTENSION = CppExtension(
    name="cpu_linear",
    source=_SOURCE,
    functions=("linear",),
    cflags=("-O3", "-march=native", "-fopenmp"),
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
    except Exception as exc:  # no compiler, a failed or timed-out build: torch's matmul serves
        logger.warning("the CPU linear kernel is unavailable (%s); torch's matmul serves", exc)
        return False
    return True


def usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``linear(x, weight)`` runs here and is the fast choice: fp32 CPU tensors, at most
    ``MAX_ROWS`` rows, a contiguous [N, K] weight, the kernel built."""
    return (
        x.dim() == 2
        and x.shape[0] <= MAX_ROWS
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and weight.is_contiguous()
        and available()
    )


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T``: x [M, K], weight [N, K] contiguous, both fp32 on the CPU -> [M, N]."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"x must be [M, K] and weight [N, K] with the same K, got {tuple(x.shape)} and {tuple(weight.shape)}"
        )
    for name, t in (("x", x), ("weight", weight)):
        if t.dtype != torch.float32 or t.device.type != "cpu":
            raise ValueError(f"{name} must be a float32 CPU tensor, got {t.dtype} on {t.device}")
    if not weight.is_contiguous():
        raise ValueError("weight must be contiguous ([N, K] row-major)")
    if x.stride(1) != 1:
        x = x.contiguous()
    out = torch.empty(x.shape[0], weight.shape[0], dtype=torch.float32)
    _module().linear(out, x, weight)
    return out
