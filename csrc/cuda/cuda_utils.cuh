// Helpers of the CUDA kernels: fp32 load/store of every weight dtype, aligned 4-wide
// loads, a block-wide sum, launch sizes.
#pragma once

// Only c10/cuda headers: ATen/cuda/CUDAContext.h would also need the cuBLAS/cuSPARSE headers.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <mutex>

#include "../common.h"

namespace moreau {
namespace cuda {

// Every tensor a CUDA kernel touches must be on a CUDA device; kCudaKernel names the
// kernel in the error (check_device).
constexpr const char* kCudaKernel = "the cuda kernel";
inline void check_cuda(const at::Tensor& t) { check_device(kCudaKernel, t, c10::kCUDA); }

template <typename T>
__device__ __forceinline__ float to_f32(T x) {
  return static_cast<float>(x);
}

template <typename T>
__device__ __forceinline__ T from_f32(float x) {
  return static_cast<T>(x);  // round to nearest even
}

// Four consecutive elements, aligned so one load/store instruction moves them all.
template <typename T>
struct alignas(4 * sizeof(T)) Vec4 {
  T v[4];
};

template <typename T>
inline bool aligned4(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % (4 * sizeof(T)) == 0;
}

constexpr int kWarp = 32;

// Sum of v over the block (blockDim.x a multiple of 32, at most 1024); valid in thread 0.
// `scratch` is __shared__ float[32]; the function syncs so scratch can be reused right after.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  const int nwarps = blockDim.x / kWarp;
  v = (threadIdx.x < nwarps) ? scratch[lane] : 0.0f;
  if (warp == 0) {
#pragma unroll
    for (int off = kWarp / 2; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  }
  __syncthreads();
  return v;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Multiprocessor count of the current device, cached per device. Kernels launch from autograd
// and user threads at once: each device's entry is written once under std::call_once, and
// read only after its call_once returned (which orders the write before the read).
inline int sm_count() {
  constexpr int kMaxCached = 64;
  static std::array<std::once_flag, kMaxCached> once;
  static std::array<int, kMaxCached> cache{};
  const int dev = c10::cuda::current_device();
  auto query = [dev] {
    int n = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
    return n;
  };
  if (dev < 0 || dev >= kMaxCached) return query();
  // a throwing query leaves the flag unset, so the next call retries
  std::call_once(once[dev], [&] { cache[dev] = query(); });
  return cache[dev];
}

// Grid size of a grid-stride loop over `work` items handled `per_block` at a time.
inline int grid_for(int64_t work, int per_block) {
  const int sms = sm_count();
  const int64_t want = ceil_div(work, per_block);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(want, int64_t(sms) * 16)));
}

}  // namespace cuda
}  // namespace moreau
