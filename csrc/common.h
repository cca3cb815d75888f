// Argument checks and small helpers shared by the CPU and CUDA kernels of moreau_C.
// Host code only (plain inline functions): every op's checks live here once, and both
// backends call them, so the two raise the same errors in the same order.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>

#include "prox_math.h"

namespace moreau {

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

// Tensors of a kernel of one backend: `who` names the kernel in the message
// ("the cuda kernel", "prox_update (cpu)").
inline void check_device(const char* who, const at::Tensor& t, c10::DeviceType type) {
  TORCH_CHECK(t.device().type() == type, "moreau_C: ", who, " got a tensor on ", t.device());
}

// ---- philox_normal, philox_bits, perturb_out, perturb_multi

// Philox key of one tensor (plain data: the CUDA kernels take it by value).
struct Key {
  uint64_t seed;
  uint32_t step;
  uint32_t index;
};

inline Key make_key(int64_t seed, int64_t step, int64_t index) {
  check_key(seed, step, index);
  return Key{static_cast<uint64_t>(seed), static_cast<uint32_t>(step), static_cast<uint32_t>(index)};
}

inline void check_counter_offset(int64_t counter_offset) {
  TORCH_CHECK(counter_offset >= 0, "moreau_C: counter_offset must be >= 0, got ", counter_offset);
}

// perturb_out / one tensor of perturb_multi (no device check: each backend adds its own).
inline void check_perturb(const at::Tensor& w, const at::Tensor& delta, const at::Tensor& out) {
  check_nonempty("w", w);
  check_weight("w", w);
  check_like("w", w, "delta", delta);
  check_state("delta", delta);
  check_like("w", w, "out", out);
  TORCH_CHECK(out.scalar_type() == w.scalar_type() && out.is_contiguous(), "moreau_C: out must be a contiguous ",
              w.scalar_type(), " tensor, got ", out.scalar_type());
}

// The explicit noise of perturb_out as a contiguous fp32 tensor (undefined without noise).
inline at::Tensor noise_f32(const at::Tensor& w, const std::optional<at::Tensor>& noise) {
  at::Tensor noise32;
  if (noise.has_value()) {
    check_like("w", w, "noise", *noise);
    TORCH_CHECK(noise->is_floating_point(), "moreau_C: noise must be a floating tensor, got ", noise->scalar_type());
    noise32 = noise->to(at::kFloat).contiguous();
  }
  return noise32;
}

inline void check_perturb_multi(at::TensorList ws, at::TensorList deltas, at::TensorList outs,
                                at::IntArrayRef indices) {
  const size_t n = ws.size();
  TORCH_CHECK(deltas.size() == n && outs.size() == n && indices.size() == n,
              "moreau_C: ws, deltas, outs and indices must have the same length");
}

// ---- prox_update_, prox_update_multi_

// prox_update_ / one tensor of prox_update_multi_; delta must be on a `type` device.
inline void check_prox(const at::Tensor& g, const at::Tensor& delta, const std::optional<at::Tensor>& acc,
                       bool accumulate, c10::DeviceType type, const char* who) {
  check_nonempty("g", g);
  check_weight("g", g);
  check_like("delta", delta, "g", g);
  check_state("delta", delta);
  check_device(who, delta, type);
  if (acc.has_value()) {
    check_like("delta", delta, "acc", *acc);
    check_state("acc", *acc);
  } else {
    TORCH_CHECK(!accumulate, "moreau_C: accumulate=True needs an acc tensor");
  }
}

// The list arguments of prox_update_multi_ and its mode.
inline void check_prox_multi(at::TensorList gs, at::TensorList deltas, at::TensorList accs, int64_t prox_mode,
                             bool accumulate) {
  const size_t n = deltas.size();
  TORCH_CHECK(gs.size() == n && (accs.empty() || accs.size() == n),
              "moreau_C: gs and deltas must have the same length, accs empty or the same length");
  TORCH_CHECK(!accumulate || !accs.empty(), "moreau_C: accumulate=True needs one acc per delta");
  check_mode(prox_mode);
}

// Tensor k of prox_update_multi_: the checks of prox_update_ and a contiguous gradient.
inline void check_prox_multi_item(at::TensorList gs, at::TensorList deltas, at::TensorList accs, size_t k,
                                  bool accumulate, c10::DeviceType type, const char* who) {
  std::optional<at::Tensor> acc = accs.empty() ? std::nullopt : std::optional<at::Tensor>(accs[k]);
  check_prox(gs[k], deltas[k], acc, accumulate, type, who);
  TORCH_CHECK(gs[k].is_contiguous(), "moreau_C: prox_update_multi_ needs contiguous gradients");
}

// ---- channel_saliency

inline void check_saliency_w(const at::Tensor& w) {
  check_nonempty("w", w);
  TORCH_CHECK(w.dim() == 2, "moreau_C: channel_saliency needs a 2-D weight, got shape ", w.sizes());
  TORCH_CHECK(is_weight_dtype(w.scalar_type()), "moreau_C: w must be float32, bfloat16 or float16, got ",
              w.scalar_type());
}

// The optional gradient of channel_saliency, checked against w, as a contiguous tensor
// (undefined without g).
inline at::Tensor saliency_g(const at::Tensor& w, const std::optional<at::Tensor>& g) {
  at::Tensor gc;
  if (g.has_value()) {
    check_like("w", w, "g", *g);
    TORCH_CHECK(is_weight_dtype(g->scalar_type()), "moreau_C: g must be float32, bfloat16 or float16, got ",
                g->scalar_type());
    gc = g->contiguous();
  }
  return gc;
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

}  // namespace moreau
