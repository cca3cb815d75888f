// CPU kernel of channel_saliency (math: reference.channel_saliency).
//
// Rows and columns come from one read of w and g: the rows are cut into a fixed number of
// chunks (independent of the thread count); each chunk sums its rows directly and keeps its
// own fp64 column partials, which are then added in chunk order.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "../common.h"
#include "cpu_utils.h"

namespace moreau {
namespace cpu {
namespace {

constexpr int64_t kChunkElems = 1 << 18;
constexpr int64_t kMaxChunks = 32;

template <typename w_t, typename g_t, bool HAS_G, bool VEC>
void saliency_kernel(const w_t* w, const g_t* g, float* rows, float* cols, int64_t R, int64_t C) {
  const int64_t chunks = std::clamp<int64_t>(R * C / kChunkElems, 1, std::min<int64_t>(kMaxChunks, R));
  const int64_t per = ceil_div(R, chunks);
  std::vector<double> colpart(static_cast<size_t>(chunks * C), 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      double* cp = colpart.data() + c * C;
      const int64_t r1 = std::min(R, (c + 1) * per);
      for (int64_t i = c * per; i < r1; ++i) {
        const w_t* wi = w + i * C;
        const g_t* gi = HAS_G ? g + i * C : nullptr;
        double rs = 0.0;
#pragma omp simd reduction(+ : rs)
        for (int64_t j = 0; j < C; ++j) {
          float p = HAS_G ? to_f32(wi[j]) * to_f32(gi[j]) : to_f32(wi[j]);
          if (!VEC) p = std::fabs(p);
          rs += static_cast<double>(p);
          cp[j] += static_cast<double>(p);
        }
        rows[i] = VEC ? static_cast<float>(std::fabs(rs)) : static_cast<float>(rs);
      }
    }
  });
  at::parallel_for(0, C, 1024, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      double s = 0.0;
      for (int64_t c = 0; c < chunks; ++c) s += colpart[c * C + j];
      cols[j] = VEC ? static_cast<float>(std::fabs(s)) : static_cast<float>(s);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> channel_saliency_cpu(const at::Tensor& w, const std::optional<at::Tensor>& g,
                                                        bool vectorize) {
  check_saliency_w(w);
  const at::Tensor wc = w.contiguous();
  const at::Tensor gc = saliency_g(w, g);
  const int64_t R = w.size(0), C = w.size(1);
  at::Tensor rows = at::empty({R}, w.options().dtype(at::kFloat));
  at::Tensor cols = at::empty({C}, w.options().dtype(at::kFloat));
  float* rp = rows.data_ptr<float>();
  float* cp = cols.data_ptr<float>();
  MOREAU_DISPATCH_WEIGHT(wc.scalar_type(), "channel_saliency_cpu", [&] {
    using w_t = scalar_t;
    const w_t* wp = wc.data_ptr<w_t>();
    if (!gc.defined()) {
      vectorize ? saliency_kernel<w_t, w_t, false, true>(wp, nullptr, rp, cp, R, C)
                : saliency_kernel<w_t, w_t, false, false>(wp, nullptr, rp, cp, R, C);
      return;
    }
    MOREAU_DISPATCH_WEIGHT(gc.scalar_type(), "channel_saliency_cpu_g", [&] {
      const scalar_t* gp = gc.data_ptr<scalar_t>();
      vectorize ? saliency_kernel<w_t, scalar_t, true, true>(wp, gp, rp, cp, R, C)
                : saliency_kernel<w_t, scalar_t, true, false>(wp, gp, rp, cp, R, C);
    });
  });
  return {rows, cols};
}

}  // namespace

TORCH_LIBRARY_IMPL(moreau_C, CPU, m) { m.impl("channel_saliency", &channel_saliency_cpu); }

}  // namespace cpu
}  // namespace moreau
