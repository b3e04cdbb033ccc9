"""C++ shared by the AVX2 kernel bodies (``cpu_prefill_avx2``, ``cpu_linear_panels``): source
only, pasted into each of their (separately built) extensions inside its AVX2 guard."""

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
