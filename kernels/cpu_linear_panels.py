"""The linear kernel's path for 18 rows and more on AVX2 and AMD hosts: ``y = x @ W^T`` as a
packed-panel GEMM. Source only: ``cpu_linear``'s entry point calls it where it compiles
(``KVTIDE_LINEAR_PANELS``: AVX2 with FMA, AVX-512 hosts included: the panels are 256-bit code)
for ``MIN_ROWS`` rows and more.

Why: from a few dozen rows on (a serving step of many sequences beside a prefill chunk, a
prefill step) a linear is compute-bound. On the Zen 3 host, MKL's sgemm on this [N, K] layout
reached 36-154 GFLOP/s between 8 and 1,024 rows, and the small-M kernel's dot-product tiles
80-115 (they re-read ``x`` from L2 for every 3 weight rows and end each output in a horizontal
sum), against the 182 GFLOP/s MKL reaches on a large square sgemm. The panels reach 150-175
from 48 rows on (bench/README.md, "Packed panels").

How: threads take panels of 16 weight rows. A panel is transposed once (8x8 in registers)
into a [K, 16] buffer, then every block of 6 rows of ``x`` runs the BLAS-style inner kernel
over it: per k, two 8-float loads of the panel, 6 broadcasts of ``x``, 12 FMAs into 12
accumulators, no horizontal sums. Rows of ``x`` go in chunks of ``MC``, so the weights are read
from memory once per chunk (once for any step up to 512 rows).

Numerics: each output is one fp32 FMA chain along k, a different order from MKL's and the
small-M kernel's, so the last bits may differ, as between any two BLAS.
"""

from kvtide.kernels import cpu_simd

SOURCE = r"""
#if defined(__AVX2__) && defined(__FMA__)
#define KVTIDE_LINEAR_PANELS 1
#include <vector>
""" + cpu_simd.TRANSPOSE8 + r"""

namespace panels {

constexpr int MR = 6, NR = 16;
constexpr int64_t MC = 512;
// From here the panels beat the dot-product tiles (16 rows: tiles 1.07-1.1x; 18: panels 1.1x).
constexpr int64_t MIN_ROWS = 18;

// dst[k * NR + j] = w[j * K + k] for the panel's nr (<= NR) rows; rows past nr are zeros.
static void pack(const float* w, int64_t K, int nr, float* dst) {
  int64_t k = 0;
  if (nr == NR) {
    const float* rows[NR];
    for (int j = 0; j < NR; ++j) rows[j] = w + j * K;
    for (; k + 8 <= K; k += 8)
      for (int jg = 0; jg < NR; jg += 8) {
        transpose8x8(rows + jg, k, dst + k * NR + jg, NR);
      }
  }
  for (; k < K; ++k)
    for (int j = 0; j < NR; ++j) dst[k * NR + j] = j < nr ? w[j * K + k] : 0.f;
}

// y[i * ldy + j] = sum_k x[i * ldx + k] * panel[k * NR + j] for i < R, j < nr.
template <int R>
static inline void block(const float* x, int64_t ldx, const float* panel, int64_t K, float* y, int64_t ldy, int nr) {
  __m256 c[R][2];
#pragma GCC unroll 6
  for (int i = 0; i < R; ++i) c[i][0] = c[i][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m256 b0 = _mm256_load_ps(panel + k * NR), b1 = _mm256_load_ps(panel + k * NR + 8);
#pragma GCC unroll 6
    for (int i = 0; i < R; ++i) {
      const __m256 a = _mm256_broadcast_ss(x + i * ldx + k);
      c[i][0] = _mm256_fmadd_ps(a, b0, c[i][0]);
      c[i][1] = _mm256_fmadd_ps(a, b1, c[i][1]);
    }
  }
#pragma GCC unroll 6
  for (int i = 0; i < R; ++i) {  // unrolled: an indexed c[i] would keep c in memory, spilled every k
    if (nr == NR) {
      _mm256_storeu_ps(y + i * ldy, c[i][0]);
      _mm256_storeu_ps(y + i * ldy + 8, c[i][1]);
    } else {
      alignas(32) float tmp[NR];
      _mm256_store_ps(tmp, c[i][0]);
      _mm256_store_ps(tmp + 8, c[i][1]);
      for (int j = 0; j < nr; ++j) y[i * ldy + j] = tmp[j];
    }
  }
}

template <int R>
static inline void block_upto(int64_t m, const float* x, int64_t ldx, const float* panel, int64_t K, float* y,
                              int64_t ldy, int nr) {
  if constexpr (R > 1) {
    if (m < R) return block_upto<R - 1>(m, x, ldx, panel, K, y, ldy, nr);
  }
  block<R>(x, ldx, panel, K, y, ldy, nr);
}

// ys [M, N] = xs [M, K] (rows ldx apart) @ ws [N, K]^T. Threads split the panels; each packs
// its panel and runs every 6-row block of x over it. Rows of x go in chunks of MC, each packing
// the panels anew. (Packing a group of panels per thread, so that a block of x is read into L1
// once per group, measured no better: within +-10% at 24-1,024 rows, scratch, interleaved.)
static void linear(const float* xs, int64_t ldx, const float* ws, int64_t M, int64_t K, int64_t N, float* ys) {
  for (int64_t mc = 0; mc < M; mc += MC) {
    const int64_t mend = std::min(M, mc + MC);
    at::parallel_for(0, (N + NR - 1) / NR, 1, [&](int64_t begin, int64_t end) {
      static thread_local std::vector<__m256> buffer;
      buffer.resize(std::max<size_t>(buffer.size(), static_cast<size_t>(K) * NR / 8 + 1));
      float* panel = reinterpret_cast<float*>(buffer.data());
      for (int64_t p = begin; p < end; ++p) {
        const int64_t n0 = p * NR;
        const int nr = static_cast<int>(std::min<int64_t>(NR, N - n0));
        pack(ws + n0 * K, K, nr, panel);
        for (int64_t m0 = mc; m0 < mend; m0 += MR)
          block_upto<MR>(std::min<int64_t>(MR, mend - m0), xs + m0 * ldx, ldx, panel, K, ys + m0 * N + n0, N, nr);
      }
    });
  }
}

}  // namespace panels
#endif
"""
