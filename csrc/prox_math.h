// The prox coefficient math of moreau_kernels, one definition for the C++ (CPU) and CUDA
// kernels (as rng.h is for Philox). The contract is reference.prox_update_:
//
//   reference mode:  u = d - lr*g;                 coeff = 0 if r <= lr*soft else 1 - soft/r
//   paper mode:      u = d - lr*(g + d/lamb);      coeff = 0 if r <= lr*soft else 1 - (lr*soft)/r
//   delta_new = u*coeff
//
// Every product, sum and quotient is rounded to fp32 on its own (no fused multiply-add) and
// the shrink factor s/r is one correctly-rounded division, exactly as the fp32 reference and the
// Triton kernels (compiled with enable_fp_fusion=False) compute it. On the host the helpers are
// plain operators (the CPU kernels are compiled with -ffp-contract=off); on the device they are
// the explicitly rounded intrinsics, which nvcc never contracts.
#pragma once

#include <cmath>
#include <cstdint>

#ifndef MOREAU_HD
#if defined(__CUDACC__) || defined(__HIPCC__)
#define MOREAU_HD __host__ __device__ __forceinline__
#else
#define MOREAU_HD inline
#endif
#endif

namespace moreau {

constexpr int64_t kModeReference = 0;  // SPEC §2 (reference.MODE_REFERENCE)
constexpr int64_t kModePaper = 1;      // SPEC §3 (reference.MODE_PAPER)

// Scalars of the prox update, rounded to float the way the fp32 reference rounds them.
struct ProxParams {
  float lr;       // (float)lr
  float soft;     // (float)soft
  float lamb;     // (float)lamb
  float thresh;   // (float)(lr*soft): the zero threshold (both modes) and paper-mode tau
  int64_t mode;
  bool accumulate;
};

inline ProxParams prox_params(double lr, double soft, double lamb, int64_t mode, bool accumulate) {
  return ProxParams{static_cast<float>(lr), static_cast<float>(soft), static_cast<float>(lamb),
                    static_cast<float>(lr * soft), mode, accumulate};
}

// fp32 operations rounded once each (round to nearest even).
MOREAU_HD float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

MOREAU_HD float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

MOREAU_HD float sub_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

MOREAU_HD float div_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

MOREAU_HD float sqrt_rn(float a) {
#ifdef __CUDA_ARCH__
  return __fsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}

// The unshrunk step u of one element.
template <int64_t MODE>
MOREAU_HD float prox_u(float d, float g, const ProxParams& p) {
  if (MODE == kModeReference) return sub_rn(d, mul_rn(p.lr, g));
  return sub_rn(d, mul_rn(p.lr, add_rn(g, div_rn(d, p.lamb))));
}

// The shrink factor of a group whose statistic is r (row RMS in reference mode, row l2 norm in
// paper mode, |u| for the elementwise groups of 1-D tensors). Reference mode may be negative
// (a reflection), as in the published code.
template <int64_t MODE>
MOREAU_HD float prox_coeff(float r, const ProxParams& p) {
  if (r <= p.thresh) return 0.0f;
  return sub_rn(1.0f, div_rn(MODE == kModeReference ? p.soft : p.thresh, r));
}

// r of an elementwise group: the reference's sqrt(mean(u^2)) over one element.
MOREAU_HD float prox_elem_r(float u) { return sqrt_rn(mul_rn(u, u)); }

}  // namespace moreau
