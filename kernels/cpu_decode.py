"""Paged decode attention for CPUs, in C++: one query token per sequence against its cached
context. Built into the ``cpu_attention`` extension (appended after ``cpu_prefill.SOURCE``,
whose vector helpers it uses); the twin is ``attention_ref.paged_decode_attention_ref``.

Tasks on torch's intra-op threads, longest contexts first, with a running max and sum (online
softmax). The context goes by in tiles of 16 keys: for up to 4 query heads sharing a KV head, a
vector of 16 scores per head, one max and one vectorized exp (Sleef's, as in ``cpu_prefill``)
per head and tile, then each V row read once for all those heads (``cpu_decode_tile``); the rows
two tiles ahead are prefetched into L2, since the block table may put them anywhere. The first
version takes a scalar ``exp`` per key and head; it stays as the path for head sizes that are
not a multiple of 16 (and ``tiled=False``). bench/decode_attention.py, seven runs on an AMD Zen
3 host: tiled 0.96-1.36x the per-key path (median ~1.15x) on short or cached contexts,
0.84-1.05x on long uncached ones, which it streams worse.

A task is a whole sequence (``seq_task``), every KV head of a block before the next block, so
the reads go through each block's K and V front to back (3 x 4 KB for SmolLM2) rather than one
head's 4 KB at a time: a step's context comes from memory (the weights' read evicts it), where
the per-head walk read ~15 GB/s. Batches with fewer than 2 sequences a thread take a task per
KV head instead, and where that still leaves threads idle (SmolLM2 at batch 1: 3 tasks on 2
threads) each context is cut into parts (``splits_for``) whose max, sum and accumulator are
merged at the end (``combine``), as flash-decoding does on GPUs. With AVX-512 a tile's 16
scores a head come out of one shuffle tree (``reduce16``) instead of 16 horizontal sums.
Measured on the Zen 4 host (bench/README.md, "Decode attention: parts, a shuffle tree, whole
blocks"): the kernel alone from memory at batch 32 1.17-1.3x, batch 8 1.05-1.2x; whole engine
steps batch 1 1.05-1.12x, 4-16 1.00x, 32 1.02x.
"""

from __future__ import annotations

SOURCE = r"""
namespace decode {

// Tiles of keys in flight ahead of the one being computed (the first tile is not prefetched: its
// loads come at once), prefetched with locality 2 (into L2: two tiles of every KV head's K and V
// are 48 KB for SmolLM2, more than L1 holds). Contexts of 2 and more parts: at least
// MIN_PART_KEYS keys a part, and SPLIT_TASKS_PER_THREAD tasks a thread (see splits_for). -D
// flags override them for benches.
#ifndef KVTIDE_PREFETCH_TILES
#define KVTIDE_PREFETCH_TILES 2
#endif
#ifndef KVTIDE_MIN_PART_KEYS
#define KVTIDE_MIN_PART_KEYS 64
#endif
#ifndef KVTIDE_SPLIT_TASKS_PER_THREAD
#define KVTIDE_SPLIT_TASKS_PER_THREAD 2
#endif
#ifndef KVTIDE_PREFETCH_LOCALITY
#define KVTIDE_PREFETCH_LOCALITY 2
#endif
constexpr int PREFETCH_TILES = KVTIDE_PREFETCH_TILES;
constexpr int PREFETCH_LOCALITY = KVTIDE_PREFETCH_LOCALITY;
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

// Keys [k0, k1) of sequence seq, all its heads: block by block, every KV head of a block before
// the next block, so the reads go through each block's K and V front to back (nkv x 4 KB each
// for SmolLM2's 16-key blocks) instead of one head's 4 KB at a time. From memory, as in a step,
// the per-head walk read at ~15-21 GB/s where a plain sum of the same bytes reads ~47.
// With `part` null the result is normalized into o; otherwise head h's unnormalized
// accumulator, running max and sum go to part + h * part_stride (D, then 2 floats) for
// `combine` to merge with the other parts of its context.
template <int NC>
static void seq_task(int64_t seq, int64_t kvh0, int64_t kvh1, const float* q, float* o, const float* kc,
                     const float* vc, const int64_t* table, int64_t k0, int64_t k1, int64_t num_heads,
                     int64_t num_kv_heads, int64_t block_size, float sc, float* part, int64_t part_stride) {
  constexpr int D = NC * 16;
  const int64_t group = num_heads / num_kv_heads, len = k1, h0 = kvh0 * group, h1 = kvh1 * group;
  thread_local std::vector<float> state;
  state.resize(num_heads * (2 * D + 2));
  float* qs = state.data();
  float* acc = qs + num_heads * D;
  float* m = acc + num_heads * D;
  float* l = m + num_heads;
  for (int64_t h = h0; h < h1; ++h) {
    const float* qh = q + (seq * num_heads + h) * D;
    for (int d = 0; d < D; ++d) { qs[h * D + d] = qh[d] * sc; acc[h * D + d] = 0.f; }
    m[h] = NEG;
    l[h] = 0.f;
  }
  // The rows of the tile PREFETCH_TILES ahead, every KV head's, from wherever the block table put
  // them (each is 4 * D bytes); the tiles before it, before the loop.
  auto prefetch_tile = [&](int64_t kb) {
    const int64_t n = std::min<int64_t>(KT, len - kb);
    for (int64_t kvh = kvh0; kvh < kvh1; ++kvh)
      for (int64_t j = 0; j < n; ++j) {
        const int64_t row = cache_row(table, kb + j, num_kv_heads, kvh, block_size, D);
        for (int c = 0; c < D; c += 16) {
          __builtin_prefetch(kc + row + c, 0, PREFETCH_LOCALITY);
          __builtin_prefetch(vc + row + c, 0, PREFETCH_LOCALITY);
        }
      }
  };
  for (int t = 1; t < PREFETCH_TILES && k0 + t * KT < len; ++t) prefetch_tile(k0 + t * KT);
  const float* krow[KT];
  const float* vrow[KT];
  for (int64_t kb = k0; kb < len; kb += KT) {
    const int nk = static_cast<int>(std::min<int64_t>(KT, len - kb));
    if (kb + PREFETCH_TILES * KT < len) prefetch_tile(kb + PREFETCH_TILES * KT);
    for (int64_t kvh = kvh0; kvh < kvh1; ++kvh) {
      for (int j = 0; j < nk; ++j) {
        const int64_t row = cache_row(table, kb + j, num_kv_heads, kvh, block_size, D);
        krow[j] = kc + row;
        vrow[j] = vc + row;
      }
      for (int64_t g0 = 0; g0 < group; g0 += 4) {  // up to 4 query heads share a tile in registers
        const int64_t h = kvh * group + g0;
        float *ah = acc + h * D, *mh = m + h, *lh = l + h;
        const float* qh = qs + h * D;
        switch (std::min<int64_t>(4, group - g0)) {
          case 1: tile<NC, 1>(qh, ah, mh, lh, krow, vrow, nk); break;
          case 2: tile<NC, 2>(qh, ah, mh, lh, krow, vrow, nk); break;
          case 3: tile<NC, 3>(qh, ah, mh, lh, krow, vrow, nk); break;
          default: tile<NC, 4>(qh, ah, mh, lh, krow, vrow, nk); break;
        }
      }
    }
  }
  for (int64_t h = h0; h < h1; ++h) {
    if (part != nullptr) {
      float* ph = part + h * part_stride;
      for (int d = 0; d < D; ++d) ph[d] = acc[h * D + d];
      ph[D] = m[h];
      ph[D + 1] = l[h];
      continue;
    }
    float* os = o + (seq * num_heads + h) * D;
    const float inv = 1.f / l[h];
    for (int d = 0; d < D; ++d) os[d] = acc[h * D + d] * inv;
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

// How many parts each sequence's context is cut into. A batch of fewer than
// SPLIT_TASKS_PER_THREAD sequences a thread leaves threads idle (batch 1 is one task), so each
// context is cut into parts of at least MIN_PART_KEYS keys: the fewest that give every thread
// SPLIT_TASKS_PER_THREAD tasks, or else the most that still share evenly among the threads.
static int64_t splits_for(int64_t tasks, int64_t max_len, int64_t threads) {
  if (threads <= 1 || tasks >= SPLIT_TASKS_PER_THREAD * threads) return 1;
  const int64_t most = std::max<int64_t>(1, max_len / MIN_PART_KEYS);
  int64_t even = 1;
  for (int64_t s = 1; s <= most; ++s) {
    if ((tasks * s) % threads) continue;
    if (tasks * s >= SPLIT_TASKS_PER_THREAD * threads) return s;
    even = s;
  }
  return even;
}

}  // namespace decode

// How many parts paged_decode_attention cuts each context into, for `tasks` tasks of whole
// contexts (the tests ask).
int64_t decode_splits(int64_t tasks, int64_t max_len, int64_t threads) {
  return decode::splits_for(tasks, max_len, threads);
}

// out, query: [num_seqs, num_heads, head_dim] f32 contiguous; k/v_cache: [num_blocks, num_kv_heads,
// block_size, head_dim] f32; block_tables: [num_seqs, max_blocks] i64; seq_lens: [num_seqs] i64.
// Tasks as the module's docstring says (a sequence, or a KV head of a sequence and a part of its
// context); `tiled` false forces the generic per-key path (kept for head sizes that are not a
// multiple of 16, and to measure against).
void paged_decode_attention(torch::Tensor out, torch::Tensor query, torch::Tensor k_cache,
                            torch::Tensor v_cache, torch::Tensor block_tables,
                            torch::Tensor seq_lens, double scale, bool tiled) {
  const int64_t num_seqs = query.size(0), num_heads = query.size(1), head_dim = query.size(2);
  const int64_t num_kv_heads = k_cache.size(1), block_size = k_cache.size(2);
  const int64_t max_blocks = block_tables.size(1);
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
  int64_t max_len = 0;
  for (int64_t s = 0; s < num_seqs; ++s) max_len = std::max(max_len, lens[s]);
  const int64_t threads = at::get_num_threads();
  // Enough sequences: one task each, all its heads. A small batch: one task per KV head, each
  // context cut into parts as well where that still leaves threads idle.
  const int64_t heads_per_task = num_seqs >= decode::SPLIT_TASKS_PER_THREAD * threads ? num_kv_heads : 1;
  const int64_t per_seq = num_kv_heads / heads_per_task;
  const int64_t splits = decode_splits(num_seqs * per_seq, max_len, threads);
  std::vector<float> parts(splits > 1 ? num_seqs * num_heads * splits * (head_dim + 2) : 0);
  // (sequence, KV heads, part) tasks, longest contexts first, taken by whichever thread is free.
  const int64_t n = num_seqs * per_seq * splits;
  std::vector<int64_t> order(n);
  for (int64_t t = 0; t < n; ++t) order[t] = t;
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return lens[a / (per_seq * splits)] > lens[b / (per_seq * splits)]; });
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(threads, n), 1, [&](int64_t, int64_t) {
    for (int64_t i = next++; i < n; i = next++) {
      const int64_t seq = order[i] / (per_seq * splits), kvh0 = order[i] / splits % per_seq * heads_per_task;
      const int64_t split = order[i] % splits;
      // A part's keys: the sequence's context cut evenly (whole tiles would leave a thread
      // with a part of 64 keys beside one of 8); a short context's last parts may be empty:
      // max NEG, sum 0.
      const int64_t per = (lens[seq] + splits - 1) / splits;
      const int64_t k0 = std::min(lens[seq], split * per), k1 = std::min(lens[seq], k0 + per);
      // Head h's parts sit together: parts + ((seq * num_heads + h) * splits + split) * (head_dim + 2).
      float* part = splits > 1 ? parts.data() + (seq * num_heads * splits + split) * (head_dim + 2) : nullptr;
      const int64_t* table = bt + seq * max_blocks;
#define KVTIDE_DECODE_CASE(NC) \
      case NC: decode::seq_task<NC>(seq, kvh0, kvh0 + heads_per_task, q, o, kc, vc, table, k0, k1, num_heads, \
                                    num_kv_heads, block_size, sc, part, splits * (head_dim + 2)); break;
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
