// Helpers of the CPU kernels: fp32 load/store of every weight dtype and a deterministic
// work split (results never depend on the thread count).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace moreau {
namespace cpu {

inline float to_f32(float x) { return x; }
inline float to_f32(c10::Half x) { return static_cast<float>(x); }
inline float to_f32(c10::BFloat16 x) { return static_cast<float>(x); }

template <typename T>
inline T from_f32(float x) {
  return static_cast<T>(x);  // round to nearest even, like Tensor.to(dtype)
}

// Runs f(scalar_t) with scalar_t the C++ type of a weight dtype (float, Half, BFloat16).
#define MOREAU_DISPATCH_WEIGHT(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace cpu
}  // namespace moreau
