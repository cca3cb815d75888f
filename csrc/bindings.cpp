// The schemas of the moreau_C library (one place for all of them) and their Meta kernels.
//
// The schemas mirror the public moreau:: ops of moreau_kernels/ops.py argument for argument;
// the CPU kernels live in cpu/*.cpp and the CUDA kernels in cuda/*.cu. Meta kernels give
// shapes for fake tensors (torch.compile, torch.library.opcheck). philox_bits is a debug op:
// the raw Philox words of counters counter_offset .. counter_offset + ceil(numel/4) - 1, shape
// [Q, 4] int64, for tests of bit-identity with reference.philox_bits / reference.philox4x32.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "common.h"

#ifndef MOREAU_WITH_CUDA
#define MOREAU_WITH_CUDA 0
#endif
#ifndef MOREAU_CUDA_ARCHS_STR
#define MOREAU_CUDA_ARCHS_STR ""
#endif
#ifndef MOREAU_TORCH_VERSION
#define MOREAU_TORCH_VERSION "unknown"
#endif
#ifndef MOREAU_CPU_FLAGS_STR
#define MOREAU_CPU_FLAGS_STR ""
#endif

namespace moreau {
namespace {

// Meta kernels use the SymInt sizes: under torch.compile with dynamic shapes they are symbolic.
at::Tensor philox_normal_meta(const at::Tensor& like, int64_t, int64_t, int64_t) {
  return at::empty_symint(like.sym_sizes(), like.options().dtype(at::kFloat));
}

at::Tensor philox_bits_meta(const at::Tensor& like, int64_t, int64_t, int64_t, int64_t) {
  const c10::SymInt nq = (like.sym_numel() + 3) / 4;
  return at::empty_symint({nq, c10::SymInt(4)}, like.options().dtype(at::kLong));
}

void perturb_out_meta(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                      double, int64_t, int64_t, int64_t) {}

void perturb_multi_meta(at::TensorList, at::TensorList, at::TensorList, double, int64_t, int64_t,
                        at::IntArrayRef) {}

at::Tensor prox_update_meta(const at::Tensor&, const at::Tensor& delta, const std::optional<at::Tensor>&, double,
                            double, double, int64_t, bool) {
  return at::empty({}, delta.options().dtype(at::kFloat));
}

at::Tensor prox_update_multi_meta(at::TensorList, at::TensorList deltas, at::TensorList, double, double, double,
                                  int64_t, bool) {
  auto opts = deltas.empty() ? at::TensorOptions().device(at::kMeta) : deltas[0].options();
  return at::empty({static_cast<int64_t>(deltas.size())}, opts.dtype(at::kFloat));
}

std::tuple<at::Tensor, at::Tensor> channel_saliency_meta(const at::Tensor& w, const std::optional<at::Tensor>&,
                                                         bool) {
  TORCH_CHECK(w.dim() == 2, "moreau_C: channel_saliency needs a 2-D weight, got shape ", w.sizes());
  auto opts = w.options().dtype(at::kFloat);
  return {at::empty_symint({w.sym_size(0)}, opts), at::empty_symint({w.sym_size(1)}, opts)};
}

// How this library was built, as "key=value" lines (read by moreau_kernels.info and the tests).
std::string build_info() {
  std::string simd =
#if defined(__AVX512F__)
      "avx512";
#elif defined(__AVX2__)
      "avx2";
#else
      "none";
#endif
  return std::string("cuda=") + (MOREAU_WITH_CUDA ? "1" : "0") + "\ncuda_archs=" + MOREAU_CUDA_ARCHS_STR +
         "\ntorch=" + MOREAU_TORCH_VERSION + "\ncpu_flags=" + MOREAU_CPU_FLAGS_STR + "\ncpu_simd=" + simd +
         "\nopenmp=" +
#if defined(_OPENMP)
         "1";
#else
         "0";
#endif
}

}  // namespace
}  // namespace moreau

TORCH_LIBRARY(moreau_C, m) {
  m.def("philox_normal(Tensor like, int seed, int step, int index) -> Tensor");
  m.def("philox_bits(Tensor like, int seed, int step, int index, int counter_offset=0) -> Tensor");
  m.def(
      "perturb_out(Tensor w, Tensor delta, Tensor? noise, Tensor(a!) out, float std, int seed, int step, "
      "int index) -> ()");
  m.def(
      "perturb_multi(Tensor[] ws, Tensor[] deltas, Tensor(a!)[] outs, float std, int seed, int step, "
      "int[] indices) -> ()");
  m.def(
      "prox_update_(Tensor g, Tensor(a!) delta, Tensor(b!)? acc, float lr, float soft, float lamb, "
      "int prox_mode, bool accumulate) -> Tensor");
  m.def(
      "prox_update_multi_(Tensor[] gs, Tensor(a!)[] deltas, Tensor(b!)[] accs, float lr, float soft, "
      "float lamb, int prox_mode, bool accumulate) -> Tensor");
  m.def("channel_saliency(Tensor w, Tensor? g, bool vectorize) -> (Tensor, Tensor)");
  m.def("build_info() -> str", &moreau::build_info);
}

TORCH_LIBRARY_IMPL(moreau_C, Meta, m) {
  m.impl("philox_normal", &moreau::philox_normal_meta);
  m.impl("philox_bits", &moreau::philox_bits_meta);
  m.impl("perturb_out", &moreau::perturb_out_meta);
  m.impl("perturb_multi", &moreau::perturb_multi_meta);
  m.impl("prox_update_", &moreau::prox_update_meta);
  m.impl("prox_update_multi_", &moreau::prox_update_multi_meta);
  m.impl("channel_saliency", &moreau::channel_saliency_meta);
}
