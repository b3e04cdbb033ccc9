"""Paged decode attention for CPUs, in C++: one query token per sequence against its cached
context. Built into the ``cpu_attention`` extension (appended after ``cpu_prefill.SOURCE``,
whose vector helpers it uses); the twin is ``attention_ref.paged_decode_attention_ref``.

One task per (sequence, KV head, up to 4 of the query heads sharing it) on torch's intra-op
thread pool, with a running max and sum (online softmax). The context goes by in tiles of 16
keys: a vector of 16 scores per head, one max and one vectorized exp (Sleef's, as in
``cpu_prefill``) per head and tile, then each V row read once for all the task's heads; the
rows two tiles ahead are prefetched, since the block table may put them anywhere. The first
version takes a scalar ``exp`` per key and head; it stays as the path for head sizes that are
not a multiple of 16 (and ``tiled=False``). bench/decode_attention.py, seven runs on an AMD Zen 3
host: tiled 0.96-1.36x the per-key path (median ~1.15x) on short or cached contexts, 0.84-1.05x
on long uncached ones, which it streams worse.

Batches of one or two have fewer tasks than threads can share evenly (SmolLM2 at batch 1: 3
KV heads, 3 tasks on 2 threads), so there each context is cut into parts (``splits_for``), each
part's running max, sum and accumulator kept apart and merged at the end (``combine``), as
flash-decoding does on GPUs. With AVX-512 a tile's 16 scores a head come out of one shuffle
tree (``reduce16``) instead of 16 horizontal sums. Zen 4 host, batch 1, the kernel alone with
its context in cache: 1.31x (the tree) and 1.56-1.62x (with the parts) at 400-1,000 keys; from
memory, as in a step: 1.05-1.15x at 200-1,000 keys, 0.9-0.95x at 50-100; whole engine steps
(``bench/README.md``, "Decode attention at batch 1"): 1.008x at ~190 keys, 1.064x at ~1,050.
"""

from __future__ import annotations

SOURCE = r"""
namespace decode {

// Tiles of keys in flight ahead of the one being computed (the first tile is not prefetched: its
// loads come at once). Contexts of 2 and more parts: at least MIN_PART_KEYS keys a part, and
// SPLIT_TASKS_PER_THREAD tasks a thread (see splits_for). -D flags override them for benches.
#ifndef KVTIDE_PREFETCH_TILES
#define KVTIDE_PREFETCH_TILES 2
#endif
#ifndef KVTIDE_MIN_PART_KEYS
#define KVTIDE_MIN_PART_KEYS 64
#endif
#ifndef KVTIDE_SPLIT_TASKS_PER_THREAD
#define KVTIDE_SPLIT_TASKS_PER_THREAD 2
#endif
constexpr int PREFETCH_TILES = KVTIDE_PREFETCH_TILES;
constexpr int64_t MIN_PART_KEYS = KVTIDE_MIN_PART_KEYS;
constexpr int64_t SPLIT_TASKS_PER_THREAD = KVTIDE_SPLIT_TASKS_PER_THREAD;

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

// Heads [h0, h0 + GC) of KV head kvh of one sequence; head_dim = 16 * NC. The context goes by in
// tiles of KT keys: GC x KT scores (one vector per head), one max and one vectorized exp per head
// and tile (not a scalar exp per key), then every V row of the tile is read once for all GC heads.
//
// Keys [k0, k1) only. With `part` null the result is normalized into o; otherwise head g's
// unnormalized accumulator, running max and sum go to part + g * part_stride (D, then 2 floats)
// for `combine` to merge with the other parts of its context.
template <int NC, int GC>
static void task(int64_t seq, int64_t kvh, int64_t h0, const float* q, float* o, const float* kc,
                 const float* vc, const int64_t* table, int64_t k0, int64_t k1, int64_t num_heads,
                 int64_t num_kv_heads, int64_t block_size, float sc, float* part, int64_t part_stride) {
  constexpr int D = NC * 16;
  const int64_t len = k1;
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
  // The rows of the tile PREFETCH_TILES ahead, from wherever the block table put them (each is
  // 4 * D bytes); the tiles before it, before the loop. A step's context comes from memory (the
  // weights' read has evicted it).
  auto prefetch_tile = [&](int64_t kb) {
    const int64_t n = std::min<int64_t>(KT, len - kb);
    for (int64_t j = 0; j < n; ++j) {
      const int64_t row = cache_row(table, kb + j, num_kv_heads, kvh, block_size, D);
      for (int c = 0; c < D; c += 16) {
        __builtin_prefetch(kc + row + c);
        __builtin_prefetch(vc + row + c);
      }
    }
  };
  for (int t = 1; t < PREFETCH_TILES && k0 + t * KT < len; ++t) prefetch_tile(k0 + t * KT);
  for (int64_t kb = k0; kb < len; kb += KT) {
    const int nk = static_cast<int>(std::min<int64_t>(KT, len - kb));
    for (int j = 0; j < nk; ++j) {
      const int64_t row = cache_row(table, kb + j, num_kv_heads, kvh, block_size, D);
      krow[j] = kc + row;
      vrow[j] = vc + row;
    }
    if (kb + PREFETCH_TILES * KT < len) prefetch_tile(kb + PREFETCH_TILES * KT);
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
  }
  for (int g = 0; g < GC; ++g) {
    if (part != nullptr) {
      float* pg = part + g * part_stride;
      for (int c = 0; c < NC; ++c) store16(pg + 16 * c, acc[g][c]);
      pg[D] = m[g];
      pg[D + 1] = l[g];
      continue;
    }
    float* os = o + (seq * num_heads + h0 + g) * D;
    const float inv = 1.f / l[g];
    for (int c = 0; c < NC; ++c) store16(os + 16 * c, acc[g][c] * inv);
  }
}

// One head's output from its S parts (each D accumulators, max, sum; an empty part has max NEG
// and sum 0): the softmax over the whole context, rescaled to the largest max.
static void combine(const float* parts, int64_t splits, int64_t head_dim, float* out) {
  const int64_t stride = head_dim + 2;
  float mx = NEG;
  for (int64_t p = 0; p < splits; ++p) mx = std::max(mx, parts[p * stride + head_dim]);
  float total = 0.f;
  for (int64_t d = 0; d < head_dim; ++d) out[d] = 0.f;
  for (int64_t p = 0; p < splits; ++p) {
    const float* pp = parts + p * stride;
    const float w = pp[head_dim + 1] == 0.f ? 0.f : std::exp(pp[head_dim] - mx);
    total += w * pp[head_dim + 1];
    for (int64_t d = 0; d < head_dim; ++d) out[d] += w * pp[d];
  }
  const float inv = 1.f / total;
  for (int64_t d = 0; d < head_dim; ++d) out[d] *= inv;
}

template <int NC>
static void heads(int64_t gc, int64_t seq, int64_t kvh, int64_t h0, const float* q, float* o, const float* kc,
                  const float* vc, const int64_t* table, int64_t k0, int64_t k1, int64_t num_heads,
                  int64_t num_kv_heads, int64_t block_size, float sc, float* part, int64_t splits) {
#define KVTIDE_DECODE_GC(G) \
    return task<NC, G>(seq, kvh, h0, q, o, kc, vc, table, k0, k1, num_heads, num_kv_heads, block_size, sc, part, \
                       splits * (NC * 16 + 2));
  switch (gc) {
    case 1: KVTIDE_DECODE_GC(1)
    case 2: KVTIDE_DECODE_GC(2)
    case 3: KVTIDE_DECODE_GC(3)
    default: KVTIDE_DECODE_GC(4)
  }
#undef KVTIDE_DECODE_GC
}

// How many parts each sequence's context is cut into. A batch of one or two has fewer tasks than
// a few per thread (SmolLM2: 3 KV heads, so batch 1 is 3 tasks on 2 threads, one thread idle for
// a third of the attention): then each context is cut into parts of at least MIN_PART_KEYS keys,
// as many as make the tasks a multiple of the threads, at least SPLIT_TASKS_PER_THREAD each.
static int64_t splits_for(int64_t tasks, int64_t max_len, int64_t threads) {
  if (threads <= 1 || tasks >= SPLIT_TASKS_PER_THREAD * threads) return 1;
  const int64_t most = max_len / MIN_PART_KEYS;
  int64_t s = 1;
  while (s < most && (tasks * s < SPLIT_TASKS_PER_THREAD * threads || (tasks * s) % threads)) ++s;
  return std::max<int64_t>(1, std::min(s, most));
}

}  // namespace decode

// How many parts paged_decode_attention cuts each context into for this batch (the tests ask).
int64_t decode_splits(int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t max_len, int64_t threads) {
  const int64_t chunks = (num_heads / num_kv_heads + 3) / 4;
  return decode::splits_for(num_seqs * num_kv_heads * chunks, max_len, threads);
}

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
  const int64_t tasks = num_seqs * num_kv_heads * chunks;
  int64_t max_len = 0;
  for (int64_t s = 0; s < num_seqs; ++s) max_len = std::max(max_len, lens[s]);
  const int64_t splits = decode_splits(num_seqs, num_heads, num_kv_heads, max_len, at::get_num_threads());
  // A part's keys: whole tiles, the sequence's context cut as evenly as tiles allow.
  std::vector<float> parts(splits > 1 ? num_seqs * num_heads * splits * (head_dim + 2) : 0);
  at::parallel_for(0, tasks * splits, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t task = t / splits, split = t % splits;
      const int64_t seq = task / (num_kv_heads * chunks), kvh = task / chunks % num_kv_heads, chunk = task % chunks;
      const int64_t g0 = chunk * 4, gc = std::min<int64_t>(4, group - g0), h0 = kvh * group + g0;
      const int64_t* table = bt + seq * max_blocks;
      const int64_t per = (lens[seq] + splits * decode::KT - 1) / (splits * decode::KT) * decode::KT;
      const int64_t k0 = std::min(lens[seq], split * per), k1 = std::min(lens[seq], k0 + per);
      // Head h's parts sit together: parts + ((seq * num_heads + h) * splits + split) * (head_dim + 2),
      // so the task's GC heads are splits * (head_dim + 2) apart; `heads` writes them one stride apart.
      float* part = splits > 1 ? parts.data() + ((seq * num_heads + h0) * splits + split) * (head_dim + 2) : nullptr;
      if (part != nullptr && k0 == k1) {  // nothing left for this part: empty
        for (int64_t g = 0; g < gc; ++g) {
          float* pg = part + g * splits * (head_dim + 2);
          pg[head_dim] = decode::NEG;
          pg[head_dim + 1] = 0.f;
        }
        continue;
      }
#define KVTIDE_DECODE_CASE(NC) \
      case NC: decode::heads<NC>(gc, seq, kvh, h0, q, o, kc, vc, table, k0, k1, num_heads, num_kv_heads, block_size, sc, part, splits); break;
      switch (head_dim / 16) {
        KVTIDE_DECODE_CASE(1) KVTIDE_DECODE_CASE(2) KVTIDE_DECODE_CASE(3) KVTIDE_DECODE_CASE(4)
        KVTIDE_DECODE_CASE(5) KVTIDE_DECODE_CASE(6) KVTIDE_DECODE_CASE(7) KVTIDE_DECODE_CASE(8)
      }
#undef KVTIDE_DECODE_CASE
    }
  });
  if (splits == 1) return;
  at::parallel_for(0, num_seqs * num_heads, 16, [&](int64_t begin, int64_t end) {
    for (int64_t sh = begin; sh < end; ++sh)
      decode::combine(parts.data() + sh * splits * (head_dim + 2), splits, head_dim, o + sh * head_dim);
  });
}
"""
