// Argument checks and small helpers shared by the CPU and CUDA kernels of moreau_C.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <string>

namespace moreau {

constexpr int64_t kModeReference = 0;  // SPEC §2 (reference.MODE_REFERENCE)
constexpr int64_t kModePaper = 1;      // SPEC §3 (reference.MODE_PAPER)

inline bool is_weight_dtype(c10::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

inline void check_nonempty(const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.numel() > 0, "moreau_C: ", name, " is empty (shape ", t.sizes(),
              "); moreau ops need at least one element");
}

inline void check_weight(const char* name, const at::Tensor& t) {
  TORCH_CHECK(is_weight_dtype(t.scalar_type()), "moreau_C: ", name,
              " must be float32, bfloat16 or float16, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "moreau_C: ", name, " must be contiguous");
}

inline void check_state(const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, "moreau_C: ", name,
              " must be float32 (estimator state stays fp32), got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "moreau_C: ", name, " must be contiguous");
}

inline void check_like(const char* a_name, const at::Tensor& a, const char* b_name, const at::Tensor& b) {
  TORCH_CHECK(a.sizes() == b.sizes(), "moreau_C: ", b_name, " has shape ", b.sizes(), " but ", a_name,
              " has ", a.sizes());
  TORCH_CHECK(a.device() == b.device(), "moreau_C: ", b_name, " is on ", b.device(), " but ", a_name,
              " is on ", a.device());
}

inline void check_key(int64_t seed, int64_t step, int64_t index) {
  TORCH_CHECK(seed >= 0, "moreau_C: seed must be in [0, 2**63), got ", seed);
  TORCH_CHECK(step >= 0 && step < (int64_t(1) << 32) && index >= 0 && index < (int64_t(1) << 32),
              "moreau_C: step and index must be in [0, 2**32), got step=", step, ", index=", index);
}

inline void check_mode(int64_t prox_mode) {
  TORCH_CHECK(prox_mode == kModeReference || prox_mode == kModePaper, "moreau_C: mode must be ",
              kModeReference, " (reference) or ", kModePaper, " (paper), got ", prox_mode);
}

// Row grouping of reference.row_view: ndim >= 2 -> [shape[0], numel/shape[0]]; 1-D -> elementwise.
struct RowShape {
  int64_t rows;
  int64_t cols;
  bool elementwise;
};

inline RowShape row_shape(const at::Tensor& t) {
  if (t.dim() >= 2) return RowShape{t.size(0), t.numel() / t.size(0), false};
  return RowShape{t.numel(), 1, true};
}

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

}  // namespace moreau
