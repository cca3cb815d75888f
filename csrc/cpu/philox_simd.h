// Philox 4x32-10 on many counters at once (CPU). GCC does not turn the 32x32->64 products of
// rng.h into vpmuludq (it emits the slow vpmullq), so the AVX-512 and AVX2 paths spell them out
// with intrinsics; the scalar tail is rng.h itself. The words are bit-identical to rng.h (the
// philox_bits op uses this function, and its test compares with reference.philox_bits).
#pragma once

#include <cstdint>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "../rng.h"

namespace moreau {
namespace cpu {

#if defined(__AVX512F__)
// (hi, lo) of m * c for 16 uint32 lanes: even lanes from one vpmuludq, odd lanes from another.
inline void mulhilo16(__m512i m, __m512i c, __m512i& hi, __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(c, m);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(c, 32), m);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
}
#elif defined(__AVX2__)
inline void mulhilo8(__m256i m, __m256i c, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(c, m);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(c, 32), m);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}
#endif

// Words of counters q0 .. q0+n-1 for key (seed, step, index): x0[i], x1[i], x2[i], x3[i].
inline void philox_batch(uint64_t q0, int64_t n, uint64_t seed, uint32_t step, uint32_t index, uint32_t* x0,
                         uint32_t* x1, uint32_t* x2, uint32_t* x3) {
  const uint32_t k0 = static_cast<uint32_t>(seed);
  const uint32_t k1 = static_cast<uint32_t>(seed >> 32);
  int64_t i = 0;
#if defined(__AVX512F__) || defined(__AVX2__)
  uint32_t rk0[10], rk1[10];  // the round keys
  for (int r = 0; r < 10; ++r) {
    rk0[r] = k0 + static_cast<uint32_t>(r) * kPhiloxW0;
    rk1[r] = k1 + static_cast<uint32_t>(r) * kPhiloxW1;
  }
#endif
#if defined(__AVX512F__)
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(kPhiloxM1));
  for (; i + 16 <= n; i += 16) {
    const uint64_t q = q0 + static_cast<uint64_t>(i);
    const __m512i base = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(q)));
    __m512i c0 = _mm512_add_epi32(base, iota);
    const __mmask16 carry = _mm512_cmplt_epu32_mask(c0, base);  // low word wrapped
    const __m512i hi_q = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(q >> 32)));
    __m512i c1 = _mm512_mask_add_epi32(hi_q, carry, hi_q, _mm512_set1_epi32(1));
    __m512i c2 = _mm512_set1_epi32(static_cast<int>(step));
    __m512i c3 = _mm512_set1_epi32(static_cast<int>(index));
    for (int r = 0; r < 10; ++r) {
      __m512i hi0, lo0, hi1, lo1;
      mulhilo16(m0, c0, hi0, lo0);
      mulhilo16(m1, c2, hi1, lo1);
      const __m512i n0 = _mm512_xor_si512(_mm512_xor_si512(hi1, c1), _mm512_set1_epi32(static_cast<int>(rk0[r])));
      const __m512i n2 = _mm512_xor_si512(_mm512_xor_si512(hi0, c3), _mm512_set1_epi32(static_cast<int>(rk1[r])));
      c0 = n0;
      c1 = lo1;
      c2 = n2;
      c3 = lo0;
    }
    _mm512_storeu_si512(x0 + i, c0);
    _mm512_storeu_si512(x1 + i, c1);
    _mm512_storeu_si512(x2 + i, c2);
    _mm512_storeu_si512(x3 + i, c3);
  }
#elif defined(__AVX2__)
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(kPhiloxM1));
  const __m256i sign = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  for (; i + 8 <= n; i += 8) {
    const uint64_t q = q0 + static_cast<uint64_t>(i);
    const __m256i base = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(q)));
    __m256i c0 = _mm256_add_epi32(base, iota);
    // unsigned c0 < base (the low word wrapped): -1 in those lanes
    const __m256i carry = _mm256_cmpgt_epi32(_mm256_xor_si256(base, sign), _mm256_xor_si256(c0, sign));
    __m256i c1 = _mm256_sub_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(q >> 32))), carry);
    __m256i c2 = _mm256_set1_epi32(static_cast<int>(step));
    __m256i c3 = _mm256_set1_epi32(static_cast<int>(index));
    for (int r = 0; r < 10; ++r) {
      __m256i hi0, lo0, hi1, lo1;
      mulhilo8(m0, c0, hi0, lo0);
      mulhilo8(m1, c2, hi1, lo1);
      const __m256i n0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(rk0[r])));
      const __m256i n2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(rk1[r])));
      c0 = n0;
      c1 = lo1;
      c2 = n2;
      c3 = lo0;
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(x0 + i), c0);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(x1 + i), c1);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(x2 + i), c2);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(x3 + i), c3);
  }
#endif
  for (; i < n; ++i) {
    const PhiloxWords w = philox_at(q0 + static_cast<uint64_t>(i), seed, step, index);
    x0[i] = w.x0;
    x1[i] = w.x1;
    x2[i] = w.x2;
    x3[i] = w.x3;
  }
}

}  // namespace cpu
}  // namespace moreau
