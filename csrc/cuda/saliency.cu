// CUDA kernels of channel_saliency (math: reference.channel_saliency).
//
// Rows: a block per row (grid-stride), block-wide sum. Columns: a 2-D grid of (column tile,
// row slice); each thread walks its column down the slice (coalesced across the warp) and
// writes a partial; the partials are summed over slices afterwards. With `vectorize` the
// absolute value is taken after the sums.
#include <torch/library.h>

#include <tuple>

#include "../common.h"
#include "cuda_utils.cuh"

namespace moreau {
namespace cuda {
namespace {

constexpr int kRowThreads = 256;
constexpr int kColThreads = 256;
constexpr int64_t kMinRowsPerSlice = 32;

template <typename W, typename G, bool HAS_G, bool VEC>
__device__ __forceinline__ float sal_term(const W* w, const G* g, int64_t k) {
  const float p = HAS_G ? __fmul_rn(to_f32(w[k]), to_f32(g[k])) : to_f32(w[k]);
  return VEC ? p : fabsf(p);
}

template <typename W, typename G, bool HAS_G, bool VEC>
__global__ void sal_rows_kernel(const W* __restrict__ w, const G* __restrict__ g, int64_t R, int64_t C,
                                float* __restrict__ rows) {
  __shared__ float scratch[32];
  for (int64_t i = blockIdx.x; i < R; i += gridDim.x) {
    float s = 0.0f;
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x) s += sal_term<W, G, HAS_G, VEC>(w, g, i * C + j);
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) rows[i] = VEC ? fabsf(s) : s;
  }
}

template <typename W, typename G, bool HAS_G, bool VEC>
__global__ void sal_cols_kernel(const W* __restrict__ w, const G* __restrict__ g, int64_t R, int64_t C,
                                int64_t rows_per_slice, float* __restrict__ partial) {
  const int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (j >= C) return;
  const int64_t r0 = blockIdx.y * rows_per_slice;
  const int64_t r1 = min(R, r0 + rows_per_slice);
  float s = 0.0f;
  for (int64_t i = r0; i < r1; ++i) s += sal_term<W, G, HAS_G, VEC>(w, g, i * C + j);
  partial[blockIdx.y * C + j] = s;
}

std::tuple<at::Tensor, at::Tensor> channel_saliency_cuda(const at::Tensor& w, const std::optional<at::Tensor>& g,
                                                         bool vectorize) {
  check_saliency_w(w);
  check_cuda(w);
  const c10::cuda::CUDAGuard guard(w.device());
  const at::Tensor wc = w.contiguous();
  const at::Tensor gc = saliency_g(w, g);
  const int64_t R = w.size(0), C = w.size(1);
  at::Tensor rows = at::empty({R}, w.options().dtype(at::kFloat));
  const int64_t col_tiles = ceil_div(C, kColThreads);
  const int sms = sm_count();
  // enough (tile, slice) blocks to fill the GPU, slices of at least kMinRowsPerSlice rows
  const int64_t slices = std::clamp<int64_t>(ceil_div(int64_t(sms) * 8, col_tiles), 1,
                                             std::max<int64_t>(1, std::min<int64_t>(65535, R / kMinRowsPerSlice)));
  const int64_t rows_per_slice = ceil_div(R, slices);
  at::Tensor partial = at::empty({slices, C}, w.options().dtype(at::kFloat));
  const auto stream = current_stream();
  const dim3 col_grid(static_cast<unsigned>(col_tiles), static_cast<unsigned>(slices));
  const int row_grid = static_cast<int>(std::min<int64_t>(R, 65535));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, wc.scalar_type(), "channel_saliency_cuda", [&] {
    using W = scalar_t;
    const W* wp = wc.data_ptr<W>();
    auto go = [&](auto g_ptr, auto has_g, auto vec) {
      using G = std::remove_const_t<std::remove_pointer_t<decltype(g_ptr)>>;
      constexpr bool HAS_G = decltype(has_g)::value;
      constexpr bool VEC = decltype(vec)::value;
      sal_rows_kernel<W, G, HAS_G, VEC><<<row_grid, kRowThreads, 0, stream>>>(wp, g_ptr, R, C, rows.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      sal_cols_kernel<W, G, HAS_G, VEC>
          <<<col_grid, kColThreads, 0, stream>>>(wp, g_ptr, R, C, rows_per_slice, partial.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (!gc.defined()) {
      vectorize ? go(wp, std::false_type{}, std::true_type{}) : go(wp, std::false_type{}, std::false_type{});
      return;
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gc.scalar_type(), "channel_saliency_cuda_g", [&] {
      const scalar_t* gp = gc.data_ptr<scalar_t>();
      vectorize ? go(gp, std::true_type{}, std::true_type{}) : go(gp, std::true_type{}, std::false_type{});
    });
  });
  at::Tensor cols = partial.sum(0);
  if (vectorize) cols.abs_();
  return {rows, cols};
}

}  // namespace

TORCH_LIBRARY_IMPL(moreau_C, CUDA, m) { m.impl("channel_saliency", &channel_saliency_cuda); }

}  // namespace cuda
}  // namespace moreau
