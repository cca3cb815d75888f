// CUDA kernels of prox_update_ and prox_update_multi_ (math: reference.prox_update_).
//
// 2-D (and higher) tensors: a block per row group (grid-stride over rows), two passes over the
// row (the second pass re-reads g and delta, mostly from L2); rows of any length. 1-D tensors:
// elementwise groups, grid-stride. Every block writes its sum of delta^2 to its own slot and
// the slots are added afterwards (deterministic: no float atomics). prox_update_multi_ loops
// over the tensors on the host (one launch each) into slices of one slot buffer, then a single
// segmented-sum launch produces the [n] result.
#include <torch/library.h>

#include <vector>

#include "../common.h"
#include "cuda_utils.cuh"

namespace moreau {
namespace cuda {
namespace {

constexpr int kRowThreads = 512;
constexpr int kElemThreads = 256;

// prox_u, prox_coeff and prox_elem_r: ../prox_math.h (shared with the CPU kernels).

template <typename T, int64_t MODE, bool ACC>
__global__ void prox_rows_kernel(const T* __restrict__ g, float* __restrict__ delta, float* __restrict__ acc,
                                 int64_t R, int64_t C, ProxParams p, float* __restrict__ row_sq) {
  __shared__ float scratch[32];
  __shared__ float coeff_s;
  for (int64_t i = blockIdx.x; i < R; i += gridDim.x) {
    const T* gi = g + i * C;
    float* di = delta + i * C;
    float ss = 0.0f;
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
      const float u = prox_u<MODE>(di[j], to_f32(gi[j]), p);
      ss = __fadd_rn(ss, __fmul_rn(u, u));
    }
    ss = block_sum(ss, scratch);
    if (threadIdx.x == 0) {
      const float stat = MODE == kModeReference ? __fdiv_rn(ss, static_cast<float>(C)) : ss;
      coeff_s = prox_coeff<MODE>(sqrt_rn(stat), p);
    }
    __syncthreads();
    const float coeff = coeff_s;
    float out = 0.0f;
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
      const float nd = __fmul_rn(prox_u<MODE>(di[j], to_f32(gi[j]), p), coeff);
      di[j] = nd;
      if (ACC) acc[i * C + j] = __fadd_rn(acc[i * C + j], nd);
      out = __fadd_rn(out, __fmul_rn(nd, nd));
    }
    out = block_sum(out, scratch);
    if (threadIdx.x == 0) row_sq[i] = out;
    // block_sum ended with __syncthreads(): coeff_s may be rewritten by the next row
  }
}

template <typename T, int64_t MODE, bool ACC>
__global__ void prox_elems_kernel(const T* __restrict__ g, float* __restrict__ delta, float* __restrict__ acc,
                                  int64_t n, ProxParams p, float* __restrict__ block_sq) {
  __shared__ float scratch[32];
  float out = 0.0f;
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < n; j += int64_t(gridDim.x) * blockDim.x) {
    const float u = prox_u<MODE>(delta[j], to_f32(g[j]), p);
    const float nd = __fmul_rn(u, prox_coeff<MODE>(prox_elem_r(u), p));
    delta[j] = nd;
    if (ACC) acc[j] = __fadd_rn(acc[j], nd);
    out = __fadd_rn(out, __fmul_rn(nd, nd));
  }
  out = block_sum(out, scratch);
  if (threadIdx.x == 0) block_sq[blockIdx.x] = out;
}

// out[k] = sum of slots[offsets[k] .. offsets[k+1]), one block per tensor.
__global__ void segment_sum_kernel(const float* __restrict__ slots, const int64_t* __restrict__ offsets,
                                   float* __restrict__ out) {
  __shared__ float scratch[32];
  const int64_t k = blockIdx.x;
  float s = 0.0f;
  for (int64_t i = offsets[k] + threadIdx.x; i < offsets[k + 1]; i += blockDim.x) s += slots[i];
  s = block_sum(s, scratch);
  if (threadIdx.x == 0) out[k] = s;
}

// Slots one tensor needs: one per row (2-D) or one per block (1-D).
int64_t slots_for(const at::Tensor& delta) {
  const RowShape shape = row_shape(delta);
  return shape.elementwise ? grid_for(shape.rows, kElemThreads) : shape.rows;
}

// Launches the update of one tensor; its sums of delta^2 go to slots[0 .. slots_for(delta)).
void launch_prox(const at::Tensor& g, const at::Tensor& delta, const at::Tensor& acc, const ProxParams& p,
                 float* slots) {
  const RowShape shape = row_shape(delta);
  const auto stream = current_stream();
  float* d = delta.data_ptr<float>();
  float* a = p.accumulate ? acc.data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "prox_update_cuda", [&] {
    const scalar_t* gp = g.data_ptr<scalar_t>();
    auto go = [&](auto mode_tag, auto acc_tag) {
      constexpr int64_t MODE = decltype(mode_tag)::value;
      constexpr bool ACC = decltype(acc_tag)::value;
      if (shape.elementwise) {
        const int grid = grid_for(shape.rows, kElemThreads);
        prox_elems_kernel<scalar_t, MODE, ACC><<<grid, kElemThreads, 0, stream>>>(gp, d, a, shape.rows, p, slots);
      } else {
        const int grid = static_cast<int>(std::min<int64_t>(shape.rows, 65535));
        prox_rows_kernel<scalar_t, MODE, ACC>
            <<<grid, kRowThreads, 0, stream>>>(gp, d, a, shape.rows, shape.cols, p, slots);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    using Ref = std::integral_constant<int64_t, kModeReference>;
    using Pap = std::integral_constant<int64_t, kModePaper>;
    if (p.mode == kModeReference) {
      p.accumulate ? go(Ref{}, std::true_type{}) : go(Ref{}, std::false_type{});
    } else {
      p.accumulate ? go(Pap{}, std::true_type{}) : go(Pap{}, std::false_type{});
    }
  });
}

at::Tensor prox_update_cuda(const at::Tensor& g, const at::Tensor& delta, const std::optional<at::Tensor>& acc,
                            double lr, double soft, double lamb, int64_t prox_mode, bool accumulate) {
  check_prox(g, delta, acc, accumulate, c10::kCUDA, kCudaKernel);
  check_mode(prox_mode);
  const c10::cuda::CUDAGuard guard(delta.device());
  const ProxParams p = prox_params(lr, soft, lamb, prox_mode, accumulate);
  at::Tensor slots = at::empty({slots_for(delta)}, delta.options());
  launch_prox(g.contiguous(), delta, accumulate ? *acc : at::Tensor(), p, slots.data_ptr<float>());
  return slots.sum();
}

at::Tensor prox_update_multi_cuda(at::TensorList gs, at::TensorList deltas, at::TensorList accs, double lr,
                                  double soft, double lamb, int64_t prox_mode, bool accumulate) {
  const size_t n = deltas.size();
  check_prox_multi(gs, deltas, accs, prox_mode, accumulate);
  TORCH_CHECK(n > 0, "moreau_C: prox_update_multi_ needs at least one tensor");
  const c10::cuda::CUDAGuard guard(deltas[0].device());
  at::Tensor offsets = at::empty({static_cast<int64_t>(n + 1)}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* off = offsets.data_ptr<int64_t>();
  off[0] = 0;
  for (size_t k = 0; k < n; ++k) {
    check_prox_multi_item(gs, deltas, accs, k, accumulate, c10::kCUDA, kCudaKernel);
    TORCH_CHECK(deltas[k].device() == deltas[0].device(), "moreau_C: prox_update_multi_ needs every tensor on ",
                deltas[0].device(), ", got ", deltas[k].device());
    off[k + 1] = off[k] + slots_for(deltas[k]);
  }
  const ProxParams p = prox_params(lr, soft, lamb, prox_mode, accumulate);
  at::Tensor slots = at::empty({off[n]}, deltas[0].options());
  for (size_t k = 0; k < n; ++k)
    launch_prox(gs[k], deltas[k], accumulate ? accs[k] : at::Tensor(), p, slots.data_ptr<float>() + off[k]);
  at::Tensor d_off = offsets.to(deltas[0].device(), /*non_blocking=*/true);
  at::Tensor out = at::empty({static_cast<int64_t>(n)}, deltas[0].options());
  segment_sum_kernel<<<static_cast<unsigned>(n), 256, 0, current_stream()>>>(
      slots.data_ptr<float>(), d_off.data_ptr<int64_t>(), out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(moreau_C, CUDA, m) {
  m.impl("prox_update_", &prox_update_cuda);
  m.impl("prox_update_multi_", &prox_update_multi_cuda);
}

}  // namespace cuda
}  // namespace moreau
