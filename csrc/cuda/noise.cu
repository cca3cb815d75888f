// CUDA kernels of philox_normal, perturb_out, perturb_multi and the philox_bits debug op.
//
// One thread per Philox counter: one philox4x32_10 call yields the four normals of elements
// 4q .. 4q+3, which are loaded and stored four at a time when the pointers allow it.
// perturb_multi is a single launch over all tensors: a table of (pointers, numel, index,
// dtype) plus the prefix sums of their chunk counts; each block finds its tensor by binary
// search (apex's multi-tensor-apply idea without the per-launch tensor limit).
#include <torch/library.h>

#include <vector>

#include "../common.h"
#include "../rng.h"
#include "cuda_utils.cuh"

namespace moreau {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// out = (w + xi*|std*w|) + delta, each step rounded in fp32 (no FMA contraction).
__device__ __forceinline__ float perturb_value(float w, float d, float xi, float std_f) {
  const float sigma = fabsf(__fmul_rn(std_f, w));
  return __fadd_rn(__fadd_rn(w, __fmul_rn(xi, sigma)), d);
}

// Elements 4q .. 4q+3 of one tensor (VEC: all four in range and pointers 4-aligned).
template <typename T>
__device__ __forceinline__ void perturb_quad(const T* __restrict__ w, const float* __restrict__ delta,
                                             const float* __restrict__ noise, T* __restrict__ out, int64_t numel,
                                             float std_f, const Key& key, int64_t q, bool vec) {
  float xi[4];
  const int64_t e0 = 4 * q;
  if (noise == nullptr) normal4(static_cast<uint64_t>(q), key.seed, key.step, key.index, xi);
  if (vec && e0 + 4 <= numel) {
    if (noise != nullptr) {
      const float4 nv = *reinterpret_cast<const float4*>(noise + e0);
      xi[0] = nv.x; xi[1] = nv.y; xi[2] = nv.z; xi[3] = nv.w;
    }
    const Vec4<T> wv = *reinterpret_cast<const Vec4<T>*>(w + e0);
    const float4 dv = *reinterpret_cast<const float4*>(delta + e0);
    const float d4[4] = {dv.x, dv.y, dv.z, dv.w};
    Vec4<T> ov;
#pragma unroll
    for (int k = 0; k < 4; ++k) ov.v[k] = from_f32<T>(perturb_value(to_f32(wv.v[k]), d4[k], xi[k], std_f));
    *reinterpret_cast<Vec4<T>*>(out + e0) = ov;
  } else {
    for (int k = 0; k < 4 && e0 + k < numel; ++k) {
      const float x = noise != nullptr ? noise[e0 + k] : xi[k];
      out[e0 + k] = from_f32<T>(perturb_value(to_f32(w[e0 + k]), delta[e0 + k], x, std_f));
    }
  }
}

template <typename T>
__global__ void perturb_kernel(const T* __restrict__ w, const float* __restrict__ delta,
                               const float* __restrict__ noise, T* __restrict__ out, int64_t numel, float std_f,
                               Key key, bool vec) {
  const int64_t nq = (numel + 3) / 4;
  for (int64_t q = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; q < nq; q += int64_t(gridDim.x) * blockDim.x)
    perturb_quad<T>(w, delta, noise, out, numel, std_f, key, q, vec);
}

__global__ void philox_normal_kernel(float* __restrict__ out, int64_t numel, Key key, bool vec) {
  const int64_t nq = (numel + 3) / 4;
  for (int64_t q = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; q < nq; q += int64_t(gridDim.x) * blockDim.x) {
    float z[4];
    normal4(static_cast<uint64_t>(q), key.seed, key.step, key.index, z);
    const int64_t e0 = 4 * q;
    if (vec && e0 + 4 <= numel) {
      *reinterpret_cast<float4*>(out + e0) = make_float4(z[0], z[1], z[2], z[3]);
    } else {
      for (int k = 0; k < 4 && e0 + k < numel; ++k) out[e0 + k] = z[k];
    }
  }
}

__global__ void philox_bits_kernel(int64_t* __restrict__ out, int64_t nq, uint64_t q0, Key key) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < nq; i += int64_t(gridDim.x) * blockDim.x) {
    const PhiloxWords w = philox_at(q0 + static_cast<uint64_t>(i), key.seed, key.step, key.index);
    out[4 * i] = w.x0;
    out[4 * i + 1] = w.x1;
    out[4 * i + 2] = w.x2;
    out[4 * i + 3] = w.x3;
  }
}

// ---- perturb_multi: one launch over a table of tensors
enum : int32_t { kF32 = 0, kBF16 = 1, kF16 = 2 };

struct MultiItem {
  const void* w;
  const float* delta;
  void* out;
  int64_t numel;
  int32_t dtype;
  uint32_t index;
  int32_t vec;
  int32_t pad;
};

constexpr int64_t kQuadsPerChunk = kThreads * 4;  // counters per (tensor, chunk) work unit

__global__ void perturb_multi_kernel(const MultiItem* __restrict__ items, const int64_t* __restrict__ first_chunk,
                                     int n, int64_t total_chunks, float std_f, uint64_t seed, uint32_t step) {
  for (int64_t c = blockIdx.x; c < total_chunks; c += gridDim.x) {
    // tensor t owns chunks [first_chunk[t], first_chunk[t+1])
    int lo = 0, hi = n - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (first_chunk[mid] <= c) lo = mid; else hi = mid - 1;
    }
    const MultiItem it = items[lo];
    const Key key{seed, step, it.index};
    const int64_t nq = (it.numel + 3) / 4;
    const int64_t q_begin = (c - first_chunk[lo]) * kQuadsPerChunk;
    const int64_t q_end = min(nq, q_begin + kQuadsPerChunk);
    for (int64_t q = q_begin + threadIdx.x; q < q_end; q += blockDim.x) {
      if (it.dtype == kF32)
        perturb_quad<float>(static_cast<const float*>(it.w), it.delta, nullptr, static_cast<float*>(it.out),
                            it.numel, std_f, key, q, it.vec);
      else if (it.dtype == kBF16)
        perturb_quad<c10::BFloat16>(static_cast<const c10::BFloat16*>(it.w), it.delta, nullptr,
                                    static_cast<c10::BFloat16*>(it.out), it.numel, std_f, key, q, it.vec);
      else
        perturb_quad<c10::Half>(static_cast<const c10::Half*>(it.w), it.delta, nullptr,
                                static_cast<c10::Half*>(it.out), it.numel, std_f, key, q, it.vec);
    }
  }
}

// ---- host side
at::Tensor philox_normal_cuda(const at::Tensor& like, int64_t seed, int64_t step, int64_t index) {
  check_nonempty("like", like);
  const Key key = make_key(seed, step, index);
  const c10::cuda::CUDAGuard guard(like.device());
  at::Tensor out = at::empty(like.sizes(), like.options().dtype(at::kFloat));
  const int64_t numel = out.numel();
  philox_normal_kernel<<<grid_for(ceil_div(numel, 4), kThreads), kThreads, 0, current_stream()>>>(
      out.data_ptr<float>(), numel, key, aligned4<float>(out.data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor philox_bits_cuda(const at::Tensor& like, int64_t seed, int64_t step, int64_t index,
                            int64_t counter_offset) {
  check_nonempty("like", like);
  check_counter_offset(counter_offset);
  const Key key = make_key(seed, step, index);
  const c10::cuda::CUDAGuard guard(like.device());
  const int64_t nq = ceil_div(like.numel(), 4);
  at::Tensor out = at::empty({nq, 4}, like.options().dtype(at::kLong));
  philox_bits_kernel<<<grid_for(nq, kThreads), kThreads, 0, current_stream()>>>(
      out.data_ptr<int64_t>(), nq, static_cast<uint64_t>(counter_offset), key);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// The shared checks of perturb_out plus: w on a CUDA device.
void check_perturb_cuda(const at::Tensor& w, const at::Tensor& delta, const at::Tensor& out) {
  check_perturb(w, delta, out);
  check_cuda(w);
}

void perturb_out_cuda(const at::Tensor& w, const at::Tensor& delta, const std::optional<at::Tensor>& noise,
                      const at::Tensor& out, double std, int64_t seed, int64_t step, int64_t index) {
  check_perturb_cuda(w, delta, out);
  const Key key = make_key(seed, step, index);
  const c10::cuda::CUDAGuard guard(w.device());
  const at::Tensor noise32 = noise_f32(w, noise);
  const float* nz = noise32.defined() ? noise32.data_ptr<float>() : nullptr;
  const int64_t numel = w.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "perturb_out_cuda", [&] {
    const bool vec = aligned4<scalar_t>(w.data_ptr()) && aligned4<scalar_t>(out.data_ptr()) &&
                     aligned4<float>(delta.data_ptr()) && (nz == nullptr || aligned4<float>(nz));
    perturb_kernel<scalar_t><<<grid_for(ceil_div(numel, 4), kThreads), kThreads, 0,
                               current_stream()>>>(
        w.data_ptr<scalar_t>(), delta.data_ptr<float>(), nz, out.data_ptr<scalar_t>(), numel,
        static_cast<float>(std), key, vec);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void perturb_multi_cuda(at::TensorList ws, at::TensorList deltas, at::TensorList outs, double std, int64_t seed,
                        int64_t step, at::IntArrayRef indices) {
  check_perturb_multi(ws, deltas, outs, indices);
  const size_t n = ws.size();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(ws[0].device());
  // The table travels as one pinned byte buffer: n items, then n+1 chunk prefix sums.
  const int64_t items_bytes = static_cast<int64_t>(n * sizeof(MultiItem));
  const int64_t bytes = items_bytes + static_cast<int64_t>((n + 1) * sizeof(int64_t));
  at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  auto* items = reinterpret_cast<MultiItem*>(host.data_ptr<uint8_t>());
  auto* first = reinterpret_cast<int64_t*>(host.data_ptr<uint8_t>() + items_bytes);
  first[0] = 0;
  for (size_t k = 0; k < n; ++k) {
    check_perturb_cuda(ws[k], deltas[k], outs[k]);
    TORCH_CHECK(ws[k].device() == ws[0].device(), "moreau_C: perturb_multi needs every tensor on ", ws[0].device(),
                ", got ", ws[k].device());
    make_key(seed, step, indices[k]);
    const auto t = ws[k].scalar_type();
    const int32_t dtype = t == at::kFloat ? kF32 : (t == at::kBFloat16 ? kBF16 : kF16);
    const size_t esize = ws[k].element_size();
    const auto ok = [esize](const void* p) { return reinterpret_cast<uintptr_t>(p) % (4 * esize) == 0; };
    const bool vec = ok(ws[k].data_ptr()) && ok(outs[k].data_ptr()) && aligned4<float>(deltas[k].data_ptr());
    items[k] = MultiItem{ws[k].data_ptr(), deltas[k].data_ptr<float>(), outs[k].data_ptr(), ws[k].numel(),
                         dtype, static_cast<uint32_t>(indices[k]), vec ? 1 : 0, 0};
    first[k + 1] = first[k] + ceil_div(ceil_div(ws[k].numel(), 4), kQuadsPerChunk);
  }
  const int64_t total = first[n];
  at::Tensor dev = host.to(ws[0].device(), /*non_blocking=*/true);
  const auto* d_items = reinterpret_cast<const MultiItem*>(dev.data_ptr<uint8_t>());
  const auto* d_first = reinterpret_cast<const int64_t*>(dev.data_ptr<uint8_t>() + items_bytes);
  perturb_multi_kernel<<<grid_for(total, 1), kThreads, 0, current_stream()>>>(
      d_items, d_first, static_cast<int>(n), total, static_cast<float>(std), static_cast<uint64_t>(seed),
      static_cast<uint32_t>(step));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(moreau_C, CUDA, m) {
  m.impl("philox_normal", &philox_normal_cuda);
  m.impl("philox_bits", &philox_bits_cuda);
  m.impl("perturb_out", &perturb_out_cuda);
  m.impl("perturb_multi", &perturb_multi_cuda);
}

}  // namespace cuda
}  // namespace moreau
