// Branch-free float log and double sin/cos that GCC/Clang auto-vectorise (-O3 -march=native).
//
// The CPU Philox-normal kernel calls log once and sin/cos once per pair of normals; glibc's
// scalar logf/sinf/cosf would cost more than the memory traffic of a perturb. These versions
// are accurate to 1 ulp (log, fdlibm's argument reduction and polynomial) and 2 ulp (sin, cos
// on [0, 2*pi]) of the correctly rounded float result: within a few ulp of every backend.
// Build with -ffp-contract=off: the expressions are meant to round exactly as written.
#pragma once

#include <cstdint>
#include <cstring>

namespace moreau {
namespace vecmath {

inline uint32_t f32_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}

inline float bits_f32(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

// Natural log of a positive normal float (no special cases: callers pass u1 in [2^-24, 1]).
inline float log_pos(float x) {
  // x = 2^k * m with m in [sqrt(2)/2, sqrt(2)): shift the exponent boundary to sqrt(2)/2.
  uint32_t ix = f32_bits(x) + (0x3f800000u - 0x3f3504f3u);
  const int32_t k = static_cast<int32_t>(ix >> 23) - 0x7f;
  ix = (ix & 0x007fffffu) + 0x3f3504f3u;
  const float f = bits_f32(ix) - 1.0f;  // m - 1, |f| < 0.42
  // log(1+f) = 2 atanh(s), s = f/(2+f); odd series in s, written as in fdlibm's logf.
  const float s = f / (2.0f + f);
  const float z = s * s;
  const float w = z * z;
  const float t1 = w * (0.40000972152f + w * 0.24279078841f);
  const float t2 = z * (0.66666662693f + w * 0.28498786688f);
  const float r = t2 + t1;
  const float hfsq = 0.5f * f * f;
  const float dk = static_cast<float>(k);
  // ln2 split so that dk*ln2_hi is exact for |k| < 2^8.
  return dk * 6.9313812256e-01f - ((hfsq - (s * (hfsq + r) + dk * 9.0580006145e-06f)) - f);
}

// sin and cos of theta in [0, 2*pi] in float: Cody-Waite reduction by pi/2 (three-part
// constant; j <= 4, so every j*part is exact) and Cephes-style minimax polynomials on
// |y| <= pi/4. Error <= 2 ulp of the result except where cos or sin is within ~1e-7 of zero,
// where the absolute error stays below 1e-13.
inline void sincos_0_2pi(float theta, float& s_out, float& c_out) {
  const int32_t j = static_cast<int32_t>(theta * 0.636619772f + 0.5f);  // nearest j, theta >= 0
  const float dj = static_cast<float>(j);
  const float y = ((theta - dj * 1.5703125f) - dj * 4.837512969970703125e-4f) - dj * 7.549789954891882e-8f;
  const float z = y * y;
  const float sp = y + y * z * (-1.6666654611e-1f + z * (8.3321608736e-3f + z * -1.9515295891e-4f));
  const float cp = (1.0f - 0.5f * z) +
                   z * z * (4.166664568298827e-2f + z * (-1.388731625493765e-3f + z * 2.443315711809948e-5f));
  // Quadrant q = j mod 4: (sin, cos) = (s, c), (c, -s), (-s, -c), (-c, s).
  const int32_t q = j & 3;
  const float sv = (q & 1) ? cp : sp;
  const float cv = (q & 1) ? sp : cp;
  s_out = (q & 2) ? -sv : sv;
  c_out = ((q + 1) & 2) ? -cv : cv;
}

}  // namespace vecmath
}  // namespace moreau
