// CPU kernels of prox_update_ and prox_update_multi_ (math: reference.prox_update_).
//
// 2-D (and higher) tensors are updated one row group at a time: pass 1 computes u and its
// sum of squares, pass 2 recomputes u (g and delta of the row are still in cache), writes
// delta = u*coeff, updates acc and sums delta^2. 1-D tensors are elementwise groups and take
// a single pass. Work is split into fixed items (independent of the thread count), each
// item's sum of delta^2 goes to its own slot, and the slots are added in order: results are
// deterministic.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../common.h"
#include "cpu_utils.h"

namespace moreau {
namespace cpu {
namespace {

constexpr int64_t kItemElems = 16384;  // elements per work item (at least one row)

// prox_u, prox_coeff and prox_elem_r: ../prox_math.h (shared with the CUDA kernels).

// Rows [r0, r1) of a [R, C] group view; returns sum(delta_new^2) of those rows.
template <typename g_t, int64_t MODE, bool ACC>
double prox_rows(const g_t* g, float* d, float* acc, int64_t r0, int64_t r1, int64_t C, const ProxParams& p) {
  double total = 0.0;
  for (int64_t i = r0; i < r1; ++i) {
    const g_t* gi = g + i * C;
    float* di = d + i * C;
    float* ai = ACC ? acc + i * C : nullptr;
    double ss = 0.0;
#pragma omp simd reduction(+ : ss)
    for (int64_t j = 0; j < C; ++j) {
      const float u = prox_u<MODE>(di[j], to_f32(gi[j]), p);
      ss += static_cast<double>(u * u);
    }
    const float stat = MODE == kModeReference ? static_cast<float>(ss / static_cast<double>(C))
                                              : static_cast<float>(ss);
    const float coeff = prox_coeff<MODE>(sqrt_rn(stat), p);
    double out = 0.0;
#pragma omp simd reduction(+ : out)
    for (int64_t j = 0; j < C; ++j) {
      const float nd = prox_u<MODE>(di[j], to_f32(gi[j]), p) * coeff;
      di[j] = nd;
      if (ACC) ai[j] += nd;
      out += static_cast<double>(nd * nd);
    }
    total += out;
  }
  return total;
}

// Elements [e0, e1) of a 1-D tensor: every element is its own group (r = |u|).
template <typename g_t, int64_t MODE, bool ACC>
double prox_elems(const g_t* g, float* d, float* acc, int64_t e0, int64_t e1, const ProxParams& p) {
  double out = 0.0;
#pragma omp simd reduction(+ : out)
  for (int64_t j = e0; j < e1; ++j) {
    const float u = prox_u<MODE>(d[j], to_f32(g[j]), p);
    const float nd = u * prox_coeff<MODE>(prox_elem_r(u), p);
    d[j] = nd;
    if (ACC) acc[j] += nd;
    out += static_cast<double>(nd * nd);
  }
  return out;
}

// One tensor's update, cut into work items: item i covers rows (or elements) [i*per, (i+1)*per).
struct ProxJob {
  at::Tensor g, delta, acc;
  RowShape shape;
  int64_t per_item;  // rows (2-D) or elements (1-D) per work item
  int64_t items;
};

ProxJob make_job(const at::Tensor& g, const at::Tensor& delta, const at::Tensor& acc) {
  ProxJob job{g, delta, acc, row_shape(delta), 0, 0};
  const int64_t units = job.shape.rows;
  const int64_t unit_elems = job.shape.elementwise ? 1 : job.shape.cols;
  job.per_item = std::max<int64_t>(1, kItemElems / unit_elems);
  job.items = ceil_div(units, job.per_item);
  return job;
}

double run_item(const ProxJob& job, int64_t item, const ProxParams& p) {
  const int64_t u0 = item * job.per_item;
  const int64_t u1 = std::min(job.shape.rows, u0 + job.per_item);
  float* d = job.delta.data_ptr<float>();
  float* a = p.accumulate ? job.acc.data_ptr<float>() : nullptr;
  double result = 0.0;
  MOREAU_DISPATCH_WEIGHT(job.g.scalar_type(), "prox_update_cpu", [&] {
    const scalar_t* g = job.g.data_ptr<scalar_t>();
    auto run = [&](auto mode_tag, auto acc_tag) {
      constexpr int64_t MODE = decltype(mode_tag)::value;
      constexpr bool ACC = decltype(acc_tag)::value;
      result = job.shape.elementwise ? prox_elems<scalar_t, MODE, ACC>(g, d, a, u0, u1, p)
                                     : prox_rows<scalar_t, MODE, ACC>(g, d, a, u0, u1, job.shape.cols, p);
    };
    using Ref = std::integral_constant<int64_t, kModeReference>;
    using Pap = std::integral_constant<int64_t, kModePaper>;
    if (p.mode == kModeReference) {
      p.accumulate ? run(Ref{}, std::true_type{}) : run(Ref{}, std::false_type{});
    } else {
      p.accumulate ? run(Pap{}, std::true_type{}) : run(Pap{}, std::false_type{});
    }
  });
  return result;
}

constexpr const char* kWho = "prox_update (cpu)";  // names this kernel in device errors

// Runs every item of every job in one parallel loop; returns the per-job sums of delta^2.
std::vector<double> run_jobs(const std::vector<ProxJob>& jobs, const ProxParams& p) {
  std::vector<int64_t> first(jobs.size() + 1, 0);
  for (size_t k = 0; k < jobs.size(); ++k) first[k + 1] = first[k] + jobs[k].items;
  std::vector<double> partial(first.back(), 0.0);
  at::parallel_for(0, first.back(), 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const size_t k = std::upper_bound(first.begin(), first.end(), i) - first.begin() - 1;
      partial[i] = run_item(jobs[k], i - first[k], p);
    }
  });
  std::vector<double> sums(jobs.size(), 0.0);
  for (size_t k = 0; k < jobs.size(); ++k)
    for (int64_t i = first[k]; i < first[k + 1]; ++i) sums[k] += partial[i];
  return sums;
}

at::Tensor prox_update_cpu(const at::Tensor& g, const at::Tensor& delta, const std::optional<at::Tensor>& acc,
                           double lr, double soft, double lamb, int64_t prox_mode, bool accumulate) {
  check_prox(g, delta, acc, accumulate, c10::kCPU, kWho);
  check_mode(prox_mode);
  const ProxParams p = prox_params(lr, soft, lamb, prox_mode, accumulate);
  const at::Tensor gc = g.contiguous();
  const std::vector<double> sums = run_jobs({make_job(gc, delta, accumulate ? *acc : at::Tensor())}, p);
  return at::scalar_tensor(static_cast<float>(sums[0]), delta.options().dtype(at::kFloat));
}

at::Tensor prox_update_multi_cpu(at::TensorList gs, at::TensorList deltas, at::TensorList accs, double lr,
                                 double soft, double lamb, int64_t prox_mode, bool accumulate) {
  const size_t n = deltas.size();
  check_prox_multi(gs, deltas, accs, prox_mode, accumulate);
  std::vector<ProxJob> jobs;
  jobs.reserve(n);
  for (size_t k = 0; k < n; ++k) {
    check_prox_multi_item(gs, deltas, accs, k, accumulate, c10::kCPU, kWho);
    jobs.push_back(make_job(gs[k], deltas[k], accumulate ? accs[k] : at::Tensor()));
  }
  const ProxParams p = prox_params(lr, soft, lamb, prox_mode, accumulate);
  const std::vector<double> sums = run_jobs(jobs, p);
  at::Tensor out = at::empty({static_cast<int64_t>(n)}, at::TensorOptions().dtype(at::kFloat));
  for (size_t k = 0; k < n; ++k) out.data_ptr<float>()[k] = static_cast<float>(sums[k]);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(moreau_C, CPU, m) {
  m.impl("prox_update_", &prox_update_cpu);
  m.impl("prox_update_multi_", &prox_update_multi_cpu);
}

}  // namespace cpu
}  // namespace moreau
