"""One 16-key tile of paged decode attention, in C++: the inner step of ``cpu_decode``'s tasks,
kept apart so that each source stays readable. Built into the ``cpu_attention`` extension, after
``cpu_prefill.SOURCE`` (whose vector helpers it uses) and before ``cpu_decode.SOURCE`` (whose
tasks call ``tile``).

For up to 4 query heads sharing a KV head: the tile's scores as one 16-lane vector a head, one
max and one vectorized exp a head and tile, then each V row read once for all the heads. The
score reduction is per instruction set: 8 keys at a time by a tree of ``hadd``s on AVX2, one
shuffle tree for the 16 keys on AVX-512 (``reduce16``), a horizontal sum per key elsewhere.
"""

from __future__ import annotations

SOURCE = r"""
namespace decode {

using prefill::v16;
using prefill::load16;
using prefill::store16;
using prefill::splat;
using prefill::exp16;
using prefill::hmax;
using prefill::hsum;
using prefill::KT;
using prefill::NEG;

// d[g] = q[g] . k lane-wise (16 partial sums a head) for GC heads against one key row of 16 * NC
// floats: the score of head g is the horizontal sum of d[g].
template <int NC, int GC>
static inline void key_dots(const v16 (&qv)[GC][NC], const float* k, v16 (&d)[GC]) {
  for (int g = 0; g < GC; ++g) d[g] = qv[g][0] * load16(k);
  for (int c = 1; c < NC; ++c) {
    const v16 kc = load16(k + 16 * c);
    for (int g = 0; g < GC; ++g) d[g] += qv[g][c] * kc;
  }
}

#if defined(__AVX512F__)
// Four keys' 16-lane partial dots -> in each 128-bit lane c, [k0, k1, k2, k3] summed over that
// lane's 4 floats.
static inline __m512 reduce4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 s = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  const __m512 t = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  const __m512d sd = _mm512_castps_pd(s), td = _mm512_castps_pd(t);
  return _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(sd, td)), _mm512_castpd_ps(_mm512_unpackhi_pd(sd, td)));
}

// reduce4's results for keys 0-3, 4-7, 8-11, 12-15 -> the 16 keys' sums, in order.
static inline __m512 reduce16(__m512 u0, __m512 u1, __m512 u2, __m512 u3) {
  const __m512 x01 = _mm512_add_ps(_mm512_shuffle_f32x4(u0, u1, 0x88), _mm512_shuffle_f32x4(u0, u1, 0xDD));
  const __m512 x23 = _mm512_add_ps(_mm512_shuffle_f32x4(u2, u3, 0x88), _mm512_shuffle_f32x4(u2, u3, 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(x01, x23, 0x88), _mm512_shuffle_f32x4(x01, x23, 0xDD));
}
#endif

// One tile of up to KT keys (rows krow/vrow) for heads [h, h + GC) sharing one KV head; head_dim
// = 16 * NC. The heads' state lives in memory between tiles (the task walks every KV head of a
// block before the next block): qs, the scaled queries, and acc, GC * D each; m and l, GC each.
// GC x KT scores (one vector per head), one max and one vectorized exp per head and tile (not a
// scalar exp per key), then every V row of the tile is read once for all GC heads.
template <int NC, int GC>
static inline void tile(const float* qs, float* acc_mem, float* m, float* l, const float* const* krow,
                        const float* const* vrow, int nk) {
  v16 qv[GC][NC], acc[GC][NC];
  for (int g = 0; g < GC; ++g)
    for (int c = 0; c < NC; ++c) {
      qv[g][c] = load16(qs + (g * NC + c) * 16);
      acc[g][c] = load16(acc_mem + (g * NC + c) * 16);
    }
  v16 p[GC];
#if defined(__AVX2__) && !defined(__AVX512F__)
  // Scores 8 keys at a time: each key's 16-lane partial dot folded to 8 lanes, then the 8 keys'
  // vectors summed across lanes together by a tree of hadds, not one horizontal sum per key
  // (~7 shuffles and adds each: a third of a tile's time). 1.07-1.17x the per-key sums on the
  // AMD host for batch 1-32, contexts 37-600 (bench/README.md, decode attention).
  alignas(32) float s_[GC][KT];
  alignas(32) __m256 part[GC][8];
  for (int j0 = 0; j0 < nk; j0 += 8) {
    const int n8 = std::min(8, nk - j0);
    for (int jj = 0; jj < 8; ++jj) {
      if (jj >= n8) { for (int g = 0; g < GC; ++g) part[g][jj] = _mm256_setzero_ps(); continue; }
      v16 d[GC];
      key_dots<NC, GC>(qv, krow[j0 + jj], d);
      for (int g = 0; g < GC; ++g) part[g][jj] = _mm256_add_ps(prefill::lo8(d[g]), prefill::hi8(d[g]));
    }
    for (int g = 0; g < GC; ++g) {
      const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(part[g][0], part[g][1]), _mm256_hadd_ps(part[g][2], part[g][3]));
      const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(part[g][4], part[g][5]), _mm256_hadd_ps(part[g][6], part[g][7]));
      _mm256_store_ps(&s_[g][j0], _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31)));
    }
  }
  for (int g = 0; g < GC; ++g) {
    for (int j = nk; j < KT; ++j) s_[g][j] = NEG;
    p[g] = load16(s_[g]);
  }
#elif defined(__AVX512F__)
  // The 16 keys' partial dots reduced together, 4 keys at a time then the four groups
  // (reduce4, reduce16): 45 shuffles and adds a head and tile, not a horizontal sum and a lane
  // insert per key (~160).
  __m512 u[GC][4];
  for (int j0 = 0; j0 < KT; j0 += 4) {
    v16 d[4][GC];
    for (int jj = 0; jj < 4; ++jj) {
      if (j0 + jj < nk) {
        key_dots<NC, GC>(qv, krow[j0 + jj], d[jj]);
      } else {
        for (int g = 0; g < GC; ++g) d[jj][g] = v16{};
      }
    }
    for (int g = 0; g < GC; ++g)
      u[g][j0 / 4] = reduce4((__m512)d[0][g], (__m512)d[1][g], (__m512)d[2][g], (__m512)d[3][g]);
  }
  for (int g = 0; g < GC; ++g) {
    p[g] = (v16)reduce16(u[g][0], u[g][1], u[g][2], u[g][3]);
    for (int j = nk; j < KT; ++j) p[g][j] = NEG;
  }
#else
  for (int g = 0; g < GC; ++g) p[g] = splat(NEG);
  for (int j = 0; j < nk; ++j) {
    v16 d[GC];
    key_dots<NC, GC>(qv, krow[j], d);
    for (int g = 0; g < GC; ++g) p[g][j] = hsum(d[g]);
  }
#endif
  for (int g = 0; g < GC; ++g) {
    const float m_new = std::max(m[g], hmax(p[g]));
    if (m_new > m[g]) {  // rescale what was accumulated under the old max
      const float alpha = std::exp(m[g] - m_new);
      l[g] *= alpha;
      for (int c = 0; c < NC; ++c) acc[g][c] *= alpha;
      m[g] = m_new;
    }
    p[g] = exp16(p[g] - m_new);  // lanes past nk hold NEG: exp gives 0
    l[g] += hsum(p[g]);
  }
  for (int c = 0; c < NC; ++c)
    for (int j = 0; j < nk; ++j) {
      const v16 v = load16(vrow[j] + 16 * c);
      for (int g = 0; g < GC; ++g) acc[g][c] += p[g][j] * v;
    }
  for (int g = 0; g < GC; ++g)
    for (int c = 0; c < NC; ++c) store16(acc_mem + (g * NC + c) * 16, acc[g][c]);
}

}  // namespace decode
"""
