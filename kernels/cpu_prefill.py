"""Paged prefill attention for CPUs, in C++: every prompt chunk of a step, causal, over its
cached prefix, in one call per layer. Built into the ``cpu_attention`` extension (its source is
appended there); the twin is ``attention_ref.paged_prefill_attention_ref``.

Why: the twin runs torch's fused SDPA once per sequence, so a step of ten 94-token prompts
makes 300 SDPA calls, 300 output copies and a Python loop per layer, and each call splits only
9 heads over the threads; a chunk that continues a prompt, or follows a cached prefix, first
gathers its whole context back out of the cache. This kernel reads K and V where the cache
holds them, and spreads (sequence, KV head, 16-query tile) tasks over the threads, largest first.

Per task (the generic body; AVX2 hosts and AMD's AVX-512 ones run ``cpu_prefill_avx2``'s
instead, ``blocked_task``): the tile's queries (times the heads sharing the KV head) against
16-key tiles of the context, with a running max and sum per query row (online softmax,
FlashAttention's recurrence); scores and softmax in fp32. Vectors are GCC's generic 16-float
vectors, which the compiler lowers to one AVX-512 register or scalar code; ``exp`` is Sleef's
(torch's own) where AVX-512 is there, ``std::exp`` otherwise.
"""

from __future__ import annotations

import functools

import torch

from kvtide.kernels import cpu_simd

SUPPORTED_HEAD_DIMS = (64, 80, 96, 128)


@functools.cache
def beats_the_twin() -> bool:
    """Whether the kernel outruns torch's SDPA twin on this host: where it compiles to AVX-512
    (the generic task below) or to AVX2 with FMA (``cpu_prefill_avx2``'s register-blocked task).
    bench/prefill_kernel.py, 2 threads, twin/kernel: 1.1-1.9x on an Intel AVX-512 host
    (2026-12-03); 1.33-2.46x on an AMD EPYC (Zen 3, AVX2) host with the AVX2 task (2026-12-04),
    where the generic task had run 0.12-0.35x. Hosts without AVX2 prefill through the twin."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX512", "AVX2")


@functools.cache
def blocked_task() -> bool:
    """Whether tasks run ``cpu_prefill_avx2``'s register-blocked body (built wherever AVX2 and FMA
    are) instead of the generic one: on AVX2 hosts, where the generic body's 16-float vectors
    spill, and on AMD's AVX-512 hosts, where 512-bit FMAs issue as two 256-bit halves and the
    blocked body's small GEMMs measured 1.12-1.15x the generic one (Zen 4, 2026-12-05,
    bench/README.md "Prefill attention on AMD AVX-512"). Intel's AVX-512 hosts keep the generic
    body, measured there and not the other."""
    capability = torch.backends.cpu.get_cpu_capability()
    return capability == "AVX2" or (capability == "AVX512" and cpu_simd.cpu_vendor() == "AuthenticAMD")

SOURCE = r"""
#include <algorithm>
#include <atomic>
#include <cstring>
#include <type_traits>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#include <sleef.h>
#endif
#if defined(__AVX2__) && !defined(__AVX512F__)
""" + cpu_simd.REDUCE8 + r"""
#endif

namespace prefill {

typedef float v16 __attribute__((vector_size(64)));
constexpr int KT = 16;  // keys per tile
constexpr int QT = 16;  // query tokens per task
constexpr float NEG = -1e30f;

static inline v16 load16(const float* p) { v16 v; std::memcpy(&v, p, sizeof v); return v; }
static inline void store16(float* p, v16 v) { std::memcpy(p, &v, sizeof v); }
static inline v16 splat(float x) { return v16{} + x; }

static inline v16 exp16(v16 x) {
#if defined(__AVX512F__)
  __m512 r = Sleef_expf16_u10((__m512)x);
  return (v16)r;
#elif defined(__AVX2__)
  __m256 lo, hi;
  std::memcpy(&lo, &x, 32);
  std::memcpy(&hi, reinterpret_cast<const char*>(&x) + 32, 32);
  lo = Sleef_expf8_u10(lo);
  hi = Sleef_expf8_u10(hi);
  v16 r;
  std::memcpy(&r, &lo, 32);
  std::memcpy(reinterpret_cast<char*>(&r) + 32, &hi, 32);
  return r;
#else
  for (int j = 0; j < 16; ++j) x[j] = std::exp(x[j]);
  return x;
#endif
}

#if defined(__AVX512F__)
static inline float hmax(v16 v) { return _mm512_reduce_max_ps((__m512)v); }
static inline float hsum(v16 v) { return _mm512_reduce_add_ps((__m512)v); }
#elif defined(__AVX2__)
// The two 8-float halves combined, then cpu_simd's 8-lane reductions.
static inline __m256 lo8(v16 v) { __m256 r; std::memcpy(&r, &v, 32); return r; }
static inline __m256 hi8(v16 v) { __m256 r; std::memcpy(&r, reinterpret_cast<const char*>(&v) + 32, 32); return r; }
static inline float hmax(v16 v) { return hmax8(_mm256_max_ps(lo8(v), hi8(v))); }
static inline float hsum(v16 v) { return hsum8(_mm256_add_ps(lo8(v), hi8(v))); }
#else
static inline float hmax(v16 v) { float m = v[0]; for (int j = 1; j < 16; ++j) m = std::max(m, v[j]); return m; }
static inline float hsum(v16 v) { float s = 0.f; for (int j = 0; j < 16; ++j) s += v[j]; return s; }
#endif

struct Task { int64_t seq, kvh, t0, t1, cost; };

#if defined(__AVX512F__)
constexpr int R = 4;  // query rows per register block: 2 x R score chains + R x NC accumulators
#else
constexpr int R = 2;
#endif

// One task: query tokens [t0, t1) of sequence seq, the `group` heads of KV head kvh.
template <int NC>  // head_dim / 16
static void run_task(const Task& t, const float* q, int64_t q_stride, float* o, const float* kc, const float* vc,
                     const int64_t* bt, int64_t max_blocks, const int64_t* qsl, const int64_t* lens,
                     int64_t num_heads, int64_t num_kv_heads, int64_t block_size, float scale) {
  constexpr int D = NC * 16;
  const int64_t group = num_heads / num_kv_heads;
  const int64_t q_start = qsl[t.seq], q_len = qsl[t.seq + 1] - q_start, len = lens[t.seq];
  const int64_t first_pos = len - q_len;  // position of the chunk's first query token
  const int64_t rows = (t.t1 - t.t0) * group;
  const int64_t padded = (rows + R - 1) / R * R;  // whole register blocks; padding rows are zeros
  std::vector<float> qf(padded * D, 0.f);
  std::vector<v16> acc(padded * NC, v16{});
  std::vector<float> m(padded, NEG), l(padded, 0.f);
  for (int64_t r = 0; r < rows; ++r) {
    const float* src = q + (q_start + t.t0 + r / group) * q_stride + (t.kvh * group + r % group) * D;
    for (int d = 0; d < D; ++d) qf[r * D + d] = src[d] * scale;
  }
  alignas(64) float kt[D * KT];  // the key tile, transposed: kt[d * KT + j]
  const float* vrow[KT];
  const int64_t last_pos = first_pos + t.t1 - 1;
  const int64_t* table = bt + t.seq * max_blocks;
  for (int64_t kb = 0; kb <= last_pos; kb += KT) {
    const int nk = static_cast<int>(std::min<int64_t>(KT, last_pos + 1 - kb));
    for (int j = 0; j < KT; ++j) {
      if (j < nk) {
        const int64_t pos = kb + j;
        const int64_t row = ((table[pos / block_size] * num_kv_heads + t.kvh) * block_size + pos % block_size) * D;
        const float* k = kc + row;
        for (int d = 0; d < D; ++d) kt[d * KT + j] = k[d];
        vrow[j] = vc + row;
      } else {
        for (int d = 0; d < D; ++d) kt[d * KT + j] = 0.f;
        vrow[j] = vc;  // read with a zero weight only
      }
    }
    // Rows whose token sits before this tile see none of it: start at the first block that does.
    const int64_t first_row = std::max<int64_t>(0, kb - first_pos - t.t0) * group / R * R;
    for (int64_t r = first_row; r < rows; r += R) {
      v16 s[R], s2[R];
      for (int i = 0; i < R; ++i) s[i] = s2[i] = v16{};
      const float* qr = qf.data() + r * D;
      for (int d = 0; d < D; d += 2) {
        const v16 k0 = load16(kt + d * KT), k1 = load16(kt + (d + 1) * KT);
#pragma GCC unroll 8
        for (int i = 0; i < R; ++i) {
          s[i] += qr[i * D + d] * k0;
          s2[i] += qr[i * D + d + 1] * k1;
        }
      }
      v16 p[R];
      int visible_max = 0;
      for (int i = 0; i < R; ++i) {
        const int64_t ri = r + i;
        if (ri >= rows) { p[i] = v16{}; continue; }
        v16 si = s[i] + s2[i];
        const int64_t pos_r = first_pos + t.t0 + ri / group;
        const int visible = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(nk, pos_r - kb + 1)));
        visible_max = std::max(visible_max, visible);
        if (visible == 0) { p[i] = v16{}; continue; }
        for (int j = visible; j < KT; ++j) si[j] = NEG;
        const float m_new = std::max(m[ri], hmax(si));
        p[i] = exp16(si - m_new);
        for (int j = visible; j < KT; ++j) p[i][j] = 0.f;
        if (m_new > m[ri]) {
          const float alpha = std::exp(m[ri] - m_new);
          l[ri] *= alpha;
          for (int c = 0; c < NC; ++c) acc[ri * NC + c] *= alpha;
          m[ri] = m_new;
        }
        l[ri] += hsum(p[i]);
      }
      v16 a[R][NC];
      for (int i = 0; i < R; ++i)
        for (int c = 0; c < NC; ++c) a[i][c] = acc[(r + i) * NC + c];
      for (int j = 0; j < visible_max; ++j) {
        const float* v = vrow[j];
#pragma GCC unroll 8
        for (int c = 0; c < NC; ++c) {
          const v16 vv = load16(v + 16 * c);
#pragma GCC unroll 8
          for (int i = 0; i < R; ++i) a[i][c] += p[i][j] * vv;
        }
      }
      for (int i = 0; i < R; ++i)
        for (int c = 0; c < NC; ++c) acc[(r + i) * NC + c] = a[i][c];
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    float* dst = o + ((q_start + t.t0 + r / group) * num_heads + t.kvh * group + r % group) * D;
    const float inv = 1.f / l[r];
    for (int c = 0; c < NC; ++c) store16(dst + 16 * c, acc[r * NC + c] * inv);
  }
}

}  // namespace prefill

// out: [T, H, D] f32 contiguous; query: [T, H, D] f32, rows `query.stride(0)` apart, heads
// contiguous; k/v_cache: [num_blocks, num_kv_heads, block_size, D]; block_tables: [S, max_blocks]
// i64; query_start_loc: [S + 1] i64; seq_lens: [S] i64 (context length after the chunk).
void paged_prefill_attention(torch::Tensor out, torch::Tensor query, torch::Tensor k_cache, torch::Tensor v_cache,
                             torch::Tensor block_tables, torch::Tensor query_start_loc, torch::Tensor seq_lens,
                             double scale, bool blocked) {
  using namespace prefill;
  const int64_t num_heads = query.size(1), head_dim = query.size(2);
  const int64_t num_kv_heads = k_cache.size(1), block_size = k_cache.size(2);
  const int64_t num_seqs = seq_lens.size(0), max_blocks = block_tables.size(1);
  const int64_t* qsl = query_start_loc.data_ptr<int64_t>();
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  std::vector<Task> tasks;
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t q_len = qsl[s + 1] - qsl[s];
    for (int64_t t0 = 0; t0 < q_len; t0 += QT) {
      const int64_t t1 = std::min(q_len, t0 + QT);
      const int64_t cost = (t1 - t0) * (lens[s] - q_len + t1);
      for (int64_t h = 0; h < num_kv_heads; ++h) tasks.push_back({s, h, t0, t1, cost});
    }
  }
  std::stable_sort(tasks.begin(), tasks.end(), [](const Task& a, const Task& b) { return a.cost > b.cost; });
  std::atomic<int64_t> next{0};
  const int64_t n = static_cast<int64_t>(tasks.size());
  auto body = [&](auto nc_tag) {
    constexpr int NC = decltype(nc_tag)::value;
    at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
      for (int64_t i = next++; i < n; i = next++) {
#ifdef KVTIDE_PREFILL_AVX2
        if (blocked) {
          prefill_avx2::run_task<NC>(tasks[i].seq, tasks[i].kvh, tasks[i].t0, tasks[i].t1, query.data_ptr<float>(),
                                     query.stride(0), out.data_ptr<float>(), k_cache.data_ptr<float>(),
                                     v_cache.data_ptr<float>(), block_tables.data_ptr<int64_t>(), max_blocks, qsl,
                                     lens, num_heads, num_kv_heads, block_size, static_cast<float>(scale));
          continue;
        }
#endif
        run_task<NC>(tasks[i], query.data_ptr<float>(), query.stride(0), out.data_ptr<float>(),
                     k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), block_tables.data_ptr<int64_t>(),
                     max_blocks, qsl, lens, num_heads, num_kv_heads, block_size, static_cast<float>(scale));
      }
    });
  };
  switch (head_dim) {
    case 64: body(std::integral_constant<int, 4>{}); break;
    case 80: body(std::integral_constant<int, 5>{}); break;
    case 96: body(std::integral_constant<int, 6>{}); break;
    case 128: body(std::integral_constant<int, 8>{}); break;
    default: TORCH_CHECK(false, "paged_prefill_attention: head_dim ", head_dim, " is not one of 64, 80, 96, 128");
  }
}
"""


def check_prefill_args(
    query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, out: torch.Tensor,
) -> None:  # fmt: skip
    """Raise ``ValueError`` naming the argument the kernel cannot take."""
    num_tokens, num_heads, head_dim = query.shape
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {SUPPORTED_HEAD_DIMS}, got {head_dim}")
    if query.stride(2) != 1 or query.stride(1) != head_dim:
        raise ValueError(f"query's heads must be contiguous, got strides {query.stride()}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.shape[3] != head_dim:
        raise ValueError(
            f"k_cache/v_cache must be [num_blocks, num_kv_heads, block_size, {head_dim}], "
            f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if num_heads % k_cache.shape[1]:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({k_cache.shape[1]})")
    for name, t in (("query", query), ("k_cache", k_cache), ("v_cache", v_cache), ("out", out)):
        if t.dtype != torch.float32 or t.device.type != "cpu":
            raise ValueError(f"{name} must be a float32 CPU tensor, got {t.dtype} on {t.device}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("out", out)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    num_seqs = seq_lens.shape[0]
    if query_start_loc.shape != (num_seqs + 1,) or block_tables.shape[0] != num_seqs:
        raise ValueError(
            f"query_start_loc {tuple(query_start_loc.shape)} must have {num_seqs + 1} entries and "
            f"block_tables {tuple(block_tables.shape)} {num_seqs} rows (one per sequence of seq_lens)"
        )
    if out.shape != query.shape:
        raise ValueError(f"out {tuple(out.shape)} must have query's shape {tuple(query.shape)}")
    if int(query_start_loc[-1]) != num_tokens:
        raise ValueError(f"query_start_loc ends at {int(query_start_loc[-1])}, query has {num_tokens} tokens")
