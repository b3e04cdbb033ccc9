"""C++ shared by the AVX2 code of the CPU kernels (``cpu_prefill_avx2``, ``cpu_prefill``,
``cpu_linear``, ``cpu_linear_panels``): source only, pasted inside each one's AVX2 guard; an
include guard keeps one copy where two of them share an extension. And the CPU's vendor, which
decides where the kernels beat MKL (``cpu_linear._max_rows``)."""


def cpu_vendor() -> str | None:
    """``vendor_id`` of /proc/cpuinfo ("GenuineIntel", "AuthenticAMD"; Linux x86), else None."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


REDUCE8 = r"""
#ifndef KVTIDE_REDUCE8
#define KVTIDE_REDUCE8 1
// The max and the sum of 8 floats: 8 -> 4 -> 2 -> 1 lanes by shuffles (a scalar loop over the
// lanes is a chain of dependent operations).
static inline float hmax8(__m256 a) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_shuffle_ps(s, s, 1)));
}
static inline float hsum8(__m256 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
}
#endif
"""

TRANSPOSE8 = r"""
#ifndef KVTIDE_TRANSPOSE8
#define KVTIDE_TRANSPOSE8 1
// dst[x * stride + i] = rows[i][col + x] for i, x < 8: an 8x8 block of floats transposed in
// registers (unpack, shuffle, then swap 128-bit halves). dst must be 32-byte aligned.
static inline void transpose8x8(const float* const* rows, int64_t col, float* dst, int64_t stride) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(rows[i] + col);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_store_ps(dst + i * stride, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_store_ps(dst + (i + 4) * stride, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}
#endif
"""
