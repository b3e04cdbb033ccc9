"""Paged decode attention for CPUs, in C++: one query token per sequence against its cached
context. Built into the ``cpu_attention`` extension (appended after ``cpu_prefill.SOURCE``,
whose vector helpers it uses); the twin is ``attention_ref.paged_decode_attention_ref``.

One task per (sequence, KV head, up to 4 of the query heads sharing it) on torch's intra-op
thread pool, with a running max and sum (online softmax). The context goes by in tiles of 16
keys: a vector of 16 scores per head, one max and one vectorized exp (Sleef's, as in
``cpu_prefill``) per head and tile, then each V row read once for all the task's heads; the
next tile's rows are prefetched, since the block table may put them anywhere. The first version
takes a scalar ``exp`` per key and head; it stays as the path for head sizes that are not a
multiple of 16 (and ``tiled=False``). bench/decode_attention.py, seven runs on an AMD Zen 3 host:
tiled 0.96-1.36x the per-key path (median ~1.15x) on short or cached contexts, 0.84-1.05x on
long uncached ones, which it streams worse.
"""

from __future__ import annotations

SOURCE = r"""
namespace decode {

// Offset in floats of position `pos`'s row for KV head kvh, through the sequence's block table.
static inline int64_t cache_row(const int64_t* table, int64_t pos, int64_t num_kv_heads, int64_t kvh,
                                int64_t block_size, int64_t head_dim) {
  return ((table[pos / block_size] * num_kv_heads + kvh) * block_size + pos % block_size) * head_dim;
}

// Any head_dim, any group: one token at a time, a scalar exp per (token, head). The fallback for
// head sizes that are not a multiple of 16.
static void generic_task(int64_t seq, int64_t kvh, const float* q, float* o, const float* kc, const float* vc,
                         const int64_t* bt, int64_t max_blocks, const int64_t* lens, int64_t num_heads,
                         int64_t num_kv_heads, int64_t block_size, int64_t head_dim, float sc) {
  const int64_t group = num_heads / num_kv_heads, len = lens[seq];
  std::vector<float> acc(group * head_dim, 0.f), m(group, -std::numeric_limits<float>::infinity()), l(group, 0.f);
  const float* qs = q + (seq * num_heads + kvh * group) * head_dim;
  for (int64_t pos = 0; pos < len; ++pos) {
    const int64_t row = cache_row(bt + seq * max_blocks, pos, num_kv_heads, kvh, block_size, head_dim);
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

// Heads [h0, h0 + GC) of KV head kvh of one sequence; head_dim = 16 * NC. The context goes by in
// tiles of KT keys: GC x KT scores (one vector per head), one max and one vectorized exp per head
// and tile (not a scalar exp per key), then every V row of the tile is read once for all GC heads.
template <int NC, int GC>
static void task(int64_t seq, int64_t kvh, int64_t h0, const float* q, float* o, const float* kc,
                 const float* vc, const int64_t* table, const int64_t* lens, int64_t num_heads,
                 int64_t num_kv_heads, int64_t block_size, float sc) {
  constexpr int D = NC * 16;
  const int64_t len = lens[seq];
  v16 qv[GC][NC], acc[GC][NC];
  float m[GC], l[GC];
  for (int g = 0; g < GC; ++g) {
    const float* qg = q + (seq * num_heads + h0 + g) * D;
    for (int c = 0; c < NC; ++c) { qv[g][c] = load16(qg + 16 * c) * sc; acc[g][c] = v16{}; }
    m[g] = NEG;
    l[g] = 0.f;
  }
  const float* krow[KT];
  const float* vrow[KT];
  for (int64_t kb = 0; kb < len; kb += KT) {
    const int nk = static_cast<int>(std::min<int64_t>(KT, len - kb));
    for (int j = 0; j < nk; ++j) {
      const int64_t row = cache_row(table, kb + j, num_kv_heads, kvh, block_size, D);
      krow[j] = kc + row;
      vrow[j] = vc + row;
    }
    // The next tile's rows, from wherever the block table put them: each is 4 * D bytes.
    const int64_t next = std::min<int64_t>(KT, len - kb - KT);
    for (int64_t j = 0; j < next; ++j) {
      const int64_t row = cache_row(table, kb + KT + j, num_kv_heads, kvh, block_size, D);
      for (int c = 0; c < D; c += 16) {
        __builtin_prefetch(kc + row + c);
        __builtin_prefetch(vc + row + c);
      }
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
  }
  for (int g = 0; g < GC; ++g) {
    float* os = o + (seq * num_heads + h0 + g) * D;
    const float inv = 1.f / l[g];
    for (int c = 0; c < NC; ++c) store16(os + 16 * c, acc[g][c] * inv);
  }
}

template <int NC>
static void heads(int64_t gc, int64_t seq, int64_t kvh, int64_t h0, const float* q, float* o, const float* kc,
                  const float* vc, const int64_t* table, const int64_t* lens, int64_t num_heads,
                  int64_t num_kv_heads, int64_t block_size, float sc) {
  switch (gc) {
    case 1: return task<NC, 1>(seq, kvh, h0, q, o, kc, vc, table, lens, num_heads, num_kv_heads, block_size, sc);
    case 2: return task<NC, 2>(seq, kvh, h0, q, o, kc, vc, table, lens, num_heads, num_kv_heads, block_size, sc);
    case 3: return task<NC, 3>(seq, kvh, h0, q, o, kc, vc, table, lens, num_heads, num_kv_heads, block_size, sc);
    default: return task<NC, 4>(seq, kvh, h0, q, o, kc, vc, table, lens, num_heads, num_kv_heads, block_size, sc);
  }
}

}  // namespace decode

// out, query: [num_seqs, num_heads, head_dim] f32 contiguous; k/v_cache: [num_blocks, num_kv_heads,
// block_size, head_dim] f32; block_tables: [num_seqs, max_blocks] i64; seq_lens: [num_seqs] i64.
// One task per (sequence, KV head, up to 4 of its query heads); `tiled` false forces the generic
// per-key path (kept for head sizes that are not a multiple of 16, and to measure against).
void paged_decode_attention(torch::Tensor out, torch::Tensor query, torch::Tensor k_cache,
                            torch::Tensor v_cache, torch::Tensor block_tables,
                            torch::Tensor seq_lens, double scale, bool tiled) {
  const int64_t num_seqs = query.size(0), num_heads = query.size(1), head_dim = query.size(2);
  const int64_t num_kv_heads = k_cache.size(1), block_size = k_cache.size(2);
  const int64_t group = num_heads / num_kv_heads, max_blocks = block_tables.size(1);
  const int64_t chunks = (group + 3) / 4;
  const float* q = query.data_ptr<float>();
  const float* kc = k_cache.data_ptr<float>();
  const float* vc = v_cache.data_ptr<float>();
  const int64_t* bt = block_tables.data_ptr<int64_t>();
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  float* o = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  if (!tiled || head_dim % 16 != 0 || head_dim > 128) {
    at::parallel_for(0, num_seqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t)
        decode::generic_task(t / num_kv_heads, t % num_kv_heads, q, o, kc, vc, bt, max_blocks, lens, num_heads,
                             num_kv_heads, block_size, head_dim, sc);
    });
    return;
  }
  at::parallel_for(0, num_seqs * num_kv_heads * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t seq = t / (num_kv_heads * chunks), kvh = t / chunks % num_kv_heads, chunk = t % chunks;
      const int64_t g0 = chunk * 4, gc = std::min<int64_t>(4, group - g0), h0 = kvh * group + g0;
      const int64_t* table = bt + seq * max_blocks;
#define KVTIDE_DECODE_CASE(NC) \
      case NC: decode::heads<NC>(gc, seq, kvh, h0, q, o, kc, vc, table, lens, num_heads, num_kv_heads, block_size, sc); break;
      switch (head_dim / 16) {
        KVTIDE_DECODE_CASE(1) KVTIDE_DECODE_CASE(2) KVTIDE_DECODE_CASE(3) KVTIDE_DECODE_CASE(4)
        KVTIDE_DECODE_CASE(5) KVTIDE_DECODE_CASE(6) KVTIDE_DECODE_CASE(7) KVTIDE_DECODE_CASE(8)
      }
#undef KVTIDE_DECODE_CASE
    }
  });
}
"""
