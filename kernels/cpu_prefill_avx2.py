"""The prefill attention kernel's task on AVX2 hosts (with FMA, without AVX-512): register
blocked, the way a GEMM's inner kernel is. Source only: ``cpu_prefill``'s entry point runs
these tasks where this compiles (``KVTIDE_PREFILL_AVX2``), its generic task elsewhere.

Why a second task body: the generic one keeps a 16-key score vector per query row, which an
AVX-512 register holds; on AVX2 each is two registers, its accumulators spilled, and it ran
3-8x slower than torch's SDPA (bench/prefill_kernel.py, 2026-12-04). Here a task (16 query
tokens times the heads sharing one KV head, so 48 rows for SmolLM2) walks its context in blocks
of 64 keys, as FlashAttention does:

1. the block's keys are transposed once (8x8 in registers) so that
2. the scores are a small GEMM, 6 query rows x 16 keys in 12 accumulators, a broadcast query
   element against two 8-key vectors per step of the head dimension;
3. per row, the causal mask, the running max and sum (online softmax), Sleef's expf as torch's
   own kernels use, and the output row rescaled only when its max grew;
4. the output is another small GEMM, 6 rows x 16 of the head dimension, over the block's keys,
   each V row read where the paged cache holds it.

Query rows wholly before a block are skipped, so a causal prompt does about half the work of
its square. Scores and sums are fp32 throughout; results match the twin to ~1e-6.
"""

from kvtide.kernels import cpu_simd

SOURCE = r"""
#if defined(__AVX2__) && defined(__FMA__)
#include <algorithm>
#include <immintrin.h>
#include <sleef.h>
#define KVTIDE_PREFILL_AVX2 1
""" + cpu_simd.TRANSPOSE8 + cpu_simd.REDUCE8 + r"""

namespace prefill_avx2 {

constexpr int MR = 6;   // query rows per register block
constexpr int KB = 64;  // keys per block
constexpr float NEG = -1e30f;

// s[i * KB + 0..15] = q[i * D + :] . kt[:, 0..15] for the MR rows i.
template <int D>
static inline void scores(const float* q, const float* kt, float* s) {
  __m256 a[MR][2];
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i) a[i][0] = a[i][1] = _mm256_setzero_ps();
  for (int d = 0; d < D; ++d) {
    const __m256 k0 = _mm256_load_ps(kt + d * KB), k1 = _mm256_load_ps(kt + d * KB + 8);
#pragma GCC unroll 6
    for (int i = 0; i < MR; ++i) {
      const __m256 b = _mm256_broadcast_ss(q + i * D + d);
      a[i][0] = _mm256_fmadd_ps(b, k0, a[i][0]);
      a[i][1] = _mm256_fmadd_ps(b, k1, a[i][1]);
    }
  }
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i) {
    _mm256_store_ps(s + i * KB, a[i][0]);
    _mm256_store_ps(s + i * KB + 8, a[i][1]);
  }
}

// o[i * D + dc..dc+15] += p[i * KB + j] * v[j][dc..dc+15] over the block's nk keys, MR rows i.
template <int D>
static inline void weighted_values(const float* p, const float* const* vrow, int nk, int dc, float* o) {
  __m256 a[MR][2];
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i) {
    a[i][0] = _mm256_load_ps(o + i * D + dc);
    a[i][1] = _mm256_load_ps(o + i * D + dc + 8);
  }
  for (int j = 0; j < nk; ++j) {
    const __m256 v0 = _mm256_loadu_ps(vrow[j] + dc), v1 = _mm256_loadu_ps(vrow[j] + dc + 8);
#pragma GCC unroll 6
    for (int i = 0; i < MR; ++i) {
      const __m256 b = _mm256_broadcast_ss(p + i * KB + j);
      a[i][0] = _mm256_fmadd_ps(b, v0, a[i][0]);
      a[i][1] = _mm256_fmadd_ps(b, v1, a[i][1]);
    }
  }
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i) {
    _mm256_store_ps(o + i * D + dc, a[i][0]);
    _mm256_store_ps(o + i * D + dc + 8, a[i][1]);
  }
}

// Per-thread scratch, 32-byte aligned, grown as needed.
struct Scratch {
  std::vector<__m256> q, o, s;
  std::vector<float> m, l;
  float* take(std::vector<__m256>& v, int64_t floats) {
    v.resize(std::max<size_t>(v.size(), (floats + 7) / 8));
    return reinterpret_cast<float*>(v.data());
  }
};

// Query tokens [t0, t1) of sequence seq, the `group` heads of KV head kvh.
template <int NC>
static void run_task(int64_t seq, int64_t kvh, int64_t t0, int64_t t1, const float* q, int64_t q_stride, float* out,
                     const float* kc, const float* vc, const int64_t* bt, int64_t max_blocks, const int64_t* qsl,
                     const int64_t* lens, int64_t num_heads, int64_t num_kv_heads, int64_t block_size, float scale) {
  constexpr int D = NC * 16;
  static thread_local Scratch scratch;
  const int64_t group = num_heads / num_kv_heads;
  const int64_t q_start = qsl[seq], q_len = qsl[seq + 1] - q_start, len = lens[seq];
  const int64_t first_pos = len - q_len;  // position of the chunk's first query token
  const int64_t rows = (t1 - t0) * group;  // token-major: row r is token t0 + r / group
  const int64_t padded = (rows + MR - 1) / MR * MR;
  float* qf = scratch.take(scratch.q, padded * D);
  float* o = scratch.take(scratch.o, padded * D);
  float* s = scratch.take(scratch.s, padded * KB);
  scratch.m.assign(padded, NEG);
  scratch.l.assign(padded, 0.f);
  float* m = scratch.m.data();
  float* l = scratch.l.data();
  for (int64_t r = 0; r < padded; ++r) {
    for (int d = 0; d < D; ++d) o[r * D + d] = 0.f;
    if (r >= rows) {
      for (int d = 0; d < D; ++d) qf[r * D + d] = 0.f;
      continue;
    }
    const float* src = q + (q_start + t0 + r / group) * q_stride + (kvh * group + r % group) * D;
    for (int d = 0; d < D; ++d) qf[r * D + d] = src[d] * scale;
  }
  alignas(32) float kt[D * KB];  // the block's keys, transposed: kt[d * KB + j]
  const float* vrow[KB];
  const int64_t last_pos = first_pos + t1 - 1;
  const int64_t* table = bt + seq * max_blocks;
  for (int64_t kb = 0; kb <= last_pos; kb += KB) {
    const int nk = static_cast<int>(std::min<int64_t>(KB, last_pos + 1 - kb));
    const int width = (nk + 15) / 16 * 16;  // keys scored: whole 16-key columns
    const float* krow[KB];
    for (int j = 0; j < nk; ++j) {
      const int64_t pos = kb + j;
      const int64_t row = ((table[pos / block_size] * num_kv_heads + kvh) * block_size + pos % block_size) * D;
      krow[j] = kc + row;
      vrow[j] = vc + row;
    }
    int j8 = 0;
    for (; j8 + 8 <= nk; j8 += 8)
      for (int d = 0; d < D; d += 8) transpose8x8(krow + j8, d, kt + d * KB + j8, KB);
    for (int j = j8; j < width; ++j)
      for (int d = 0; d < D; ++d) kt[d * KB + j] = j < nk ? krow[j][d] : 0.f;
    // Rows whose token sits before this block see none of it: start at the block that does.
    const int64_t r0 = std::max<int64_t>(0, kb - first_pos - t0) * group / MR * MR;
    for (int64_t r = r0; r < padded; r += MR)
      for (int c = 0; c < width; c += 16) scores<D>(qf + r * D, kt + c, s + r * KB + c);
    for (int64_t r = r0; r < padded; ++r) {
      float* p = s + r * KB;
      const int64_t pos_r = first_pos + t0 + r / group;
      const int visible = r >= rows ? 0 : static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(nk, pos_r - kb + 1)));
      if (visible == 0) {
        for (int j = 0; j < width; ++j) p[j] = 0.f;
        continue;
      }
      for (int j = visible; j < width; ++j) p[j] = NEG;
      __m256 mx = _mm256_load_ps(p);
      for (int c = 8; c < width; c += 8) mx = _mm256_max_ps(mx, _mm256_load_ps(p + c));
      const float m_new = std::max(m[r], hmax8(mx));
      const __m256 mv = _mm256_set1_ps(m_new);
      __m256 sum = _mm256_setzero_ps();
      for (int c = 0; c < width; c += 8) {
        const __m256 e = Sleef_expf8_u10(_mm256_sub_ps(_mm256_load_ps(p + c), mv));
        _mm256_store_ps(p + c, e);
        sum = _mm256_add_ps(sum, e);
      }
      for (int j = visible; j < width; ++j) p[j] = 0.f;
      if (m_new > m[r]) {
        const float alpha = std::exp(m[r] - m_new);
        l[r] *= alpha;
        const __m256 av = _mm256_set1_ps(alpha);
        for (int d = 0; d < D; d += 8) _mm256_store_ps(o + r * D + d, _mm256_mul_ps(av, _mm256_load_ps(o + r * D + d)));
        m[r] = m_new;
      }
      l[r] += hsum8(sum);
    }
    for (int64_t r = r0; r < padded; r += MR)
      for (int dc = 0; dc < D; dc += 16) weighted_values<D>(s + r * KB, vrow, nk, dc, o + r * D);
  }
  for (int64_t r = 0; r < rows; ++r) {
    float* dst = out + ((q_start + t0 + r / group) * num_heads + kvh * group + r % group) * D;
    const __m256 inv = _mm256_set1_ps(1.f / l[r]);
    for (int d = 0; d < D; d += 8) _mm256_storeu_ps(dst + d, _mm256_mul_ps(inv, _mm256_load_ps(o + r * D + d)));
  }
}

}  // namespace prefill_avx2
#endif
"""
