// The one counter-based RNG of moreau_kernels: Philox 4x32-10 and the Box-Muller transform.
//
// Shared by the C++ (CPU) and CUDA kernels. The layout is the contract of
// moreau_kernels/reference.py (module docstring): for element e of parameter `index` at
// estimator step `step` with user seed `seed`
//
//   key     = (seed & 0xFFFFFFFF, seed >> 32)
//   counter = (q & 0xFFFFFFFF, q >> 32, step, index),   q = e / 4
//   lane    = e % 4; (a, b) = (x0, x1) for lanes 0, 1 and (x2, x3) for lanes 2, 3
//   u1 = ((a >> 8) + 1) * 2^-24  in (0, 1];   u2 = (b >> 8) * 2^-24  in [0, 1)
//   r  = sqrt(-2 log u1);  theta = 6.2831855f * u2             (fp32 at every step)
//   xi = r cos(theta) (even lanes), r sin(theta) (odd lanes)
//
// The uint32 words are bit-identical to reference.philox_bits. The normals differ from the
// reference only by the last-ulp differences of log/sin/cos on each platform.
#pragma once

#include <cmath>
#include <cstdint>

#ifndef MOREAU_HD  // also defined by prox_math.h
#if defined(__CUDACC__) || defined(__HIPCC__)
#define MOREAU_HD __host__ __device__ __forceinline__
#else
#define MOREAU_HD inline
#endif
#endif

namespace moreau {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr float kTwoPiF32 = 6.2831855f;    // float32(2*pi): the constant every backend uses
constexpr float kTwoPow24Inv = 5.9604644775390625e-08f;  // 2^-24, exact

struct PhiloxWords {
  uint32_t x0, x1, x2, x3;
};

// (hi, lo) halves of the 64-bit product a*b.
MOREAU_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  lo = a * b;
  hi = __umulhi(a, b);
#else
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  lo = static_cast<uint32_t>(p);
  hi = static_cast<uint32_t>(p >> 32);
#endif
}

// Philox 4x32 with 10 rounds on counter (c0, c1, c2, c3) and key (k0, k1).
MOREAU_HD PhiloxWords philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                    uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(kPhiloxM0, c0, hi0, lo0);
    mulhilo32(kPhiloxM1, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return PhiloxWords{c0, c1, c2, c3};
}

// The words for counter q of the key (seed, step, index).
MOREAU_HD PhiloxWords philox_at(uint64_t q, uint64_t seed, uint32_t step, uint32_t index) {
  return philox4x32_10(static_cast<uint32_t>(q), static_cast<uint32_t>(q >> 32), step, index,
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// u1 = ((a >> 8) + 1) * 2^-24 in (0, 1]  (never 0, so log(u1) is finite).
MOREAU_HD float uniform_open0(uint32_t a) {
  return static_cast<float>((a >> 8) + 1u) * kTwoPow24Inv;
}

// u2 = (b >> 8) * 2^-24 in [0, 1).
MOREAU_HD float uniform_closed0(uint32_t b) {
  return static_cast<float>(b >> 8) * kTwoPow24Inv;
}

// Box-Muller on one word pair with the platform's libm (scalar reference path; the CPU
// kernels use the vectorisable twin in cpu/vec_math.h, the CUDA kernels this one).
MOREAU_HD void box_muller(uint32_t a, uint32_t b, float& z_cos, float& z_sin) {
  const float u1 = uniform_open0(a);
  const float u2 = uniform_closed0(b);
  const float r = sqrtf(-2.0f * logf(u1));
  const float theta = u2 * kTwoPiF32;
  float s, c;
#if defined(__CUDA_ARCH__)
  sincosf(theta, &s, &c);
#else
  s = std::sin(theta);
  c = std::cos(theta);
#endif
  z_cos = r * c;
  z_sin = r * s;
}

// The four normals of counter q: element 4q+lane.
MOREAU_HD void normal4(uint64_t q, uint64_t seed, uint32_t step, uint32_t index, float z[4]) {
  const PhiloxWords w = philox_at(q, seed, step, index);
  box_muller(w.x0, w.x1, z[0], z[1]);
  box_muller(w.x2, w.x3, z[2], z[3]);
}

}  // namespace moreau
