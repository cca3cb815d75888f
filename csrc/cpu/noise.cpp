// CPU kernels of philox_normal, perturb_out and perturb_multi (and the philox_bits debug op).
//
// Noise is generated in blocks of kBlock elements (a multiple of 4, so every block starts on a
// Philox counter boundary): one pass fills the Philox words of the block, a second turns them
// into normals with the vectorisable log/sin/cos of vec_math.h, a third applies the perturbation
// while the block is still in L1. Blocks are independent, so they run in parallel.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../common.h"
#include "../rng.h"
#include "cpu_utils.h"
#include "philox_simd.h"
#include "vec_math.h"

namespace moreau {
namespace cpu {
namespace {

constexpr int64_t kBlock = 2048;  // elements per work item (multiple of 4)
constexpr int64_t kGrainBlocks = 8;

// z[0 .. 4*ceil(n/4)) = normals of elements e0 .. e0+n (e0 % 4 == 0, n <= kBlock).
// Words (x0, x1) of counter i sit at pair i, words (x2, x3) at pair kQ + i, so every loop
// below runs over contiguous arrays and vectorises; the last loop interleaves the lanes.
void normals_block(float* z, int64_t e0, int64_t n, const Key& key) {
  constexpr int64_t kQ = kBlock / 4;
  alignas(64) uint32_t wa[2 * kQ];
  alignas(64) uint32_t wb[2 * kQ];
  alignas(64) float zc[2 * kQ];
  alignas(64) float zs[2 * kQ];
  const int64_t nq = (n + 3) / 4;
  philox_batch(static_cast<uint64_t>(e0) / 4, nq, key.seed, key.step, key.index, wa, wb, wa + kQ, wb + kQ);
  auto box_muller_range = [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const float u1 = uniform_open0(wa[p]);
      const float u2 = uniform_closed0(wb[p]);
      const float r = __builtin_sqrtf(-2.0f * vecmath::log_pos(u1));
      const float theta = u2 * kTwoPiF32;
      float s, c;
      vecmath::sincos_0_2pi(theta, s, c);
      zc[p] = r * c;
      zs[p] = r * s;
    }
  };
  box_muller_range(0, nq);
  box_muller_range(kQ, kQ + nq);
  for (int64_t i = 0; i < nq; ++i) {
    z[4 * i] = zc[i];
    z[4 * i + 1] = zs[i];
    z[4 * i + 2] = zc[kQ + i];
    z[4 * i + 3] = zs[kQ + i];
  }
}

// out = (w + xi*|std*w|) + delta in fp32, rounded once to scalar_t; xi from Philox or `noise`.
template <typename scalar_t>
void perturb_range(const scalar_t* w, const float* delta, const float* noise, scalar_t* out, float std_f,
                   int64_t e0, int64_t n, const Key& key) {
  alignas(64) float z[kBlock];
  const float* xi = noise ? noise + e0 : z;
  if (!noise) normals_block(z, e0, n, key);
  for (int64_t j = 0; j < n; ++j) {
    const float w32 = to_f32(w[e0 + j]);
    const float sigma = std::fabs(std_f * w32);
    const float v = (w32 + xi[j] * sigma) + delta[e0 + j];
    out[e0 + j] = from_f32<scalar_t>(v);
  }
}

at::Tensor philox_normal_cpu(const at::Tensor& like, int64_t seed, int64_t step, int64_t index) {
  check_nonempty("like", like);
  const Key key = make_key(seed, step, index);
  at::Tensor out = at::empty(like.sizes(), like.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  const int64_t numel = out.numel();
  at::parallel_for(0, ceil_div(numel, kBlock), kGrainBlocks, [&](int64_t b0, int64_t b1) {
    alignas(64) float z[kBlock];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t e0 = b * kBlock;
      const int64_t n = std::min(kBlock, numel - e0);
      normals_block(z, e0, n, key);
      std::copy(z, z + n, o + e0);
    }
  });
  return out;
}

at::Tensor philox_bits_cpu(const at::Tensor& like, int64_t seed, int64_t step, int64_t index,
                           int64_t counter_offset) {
  check_nonempty("like", like);
  check_counter_offset(counter_offset);
  const Key key = make_key(seed, step, index);
  const int64_t nq = ceil_div(like.numel(), 4);
  at::Tensor out = at::empty({nq, 4}, like.options().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  at::parallel_for(0, ceil_div(nq, kBlock), 1, [&](int64_t b0, int64_t b1) {
    alignas(64) uint32_t x[4][kBlock];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t q0 = b * kBlock;
      const int64_t n = std::min(kBlock, nq - q0);
      philox_batch(static_cast<uint64_t>(q0 + counter_offset), n, key.seed, key.step, key.index, x[0], x[1], x[2], x[3]);
      for (int64_t i = 0; i < n; ++i)
        for (int k = 0; k < 4; ++k) o[4 * (q0 + i) + k] = x[k][i];
    }
  });
  return out;
}

void perturb_out_cpu(const at::Tensor& w, const at::Tensor& delta, const std::optional<at::Tensor>& noise,
                     const at::Tensor& out, double std, int64_t seed, int64_t step, int64_t index) {
  check_perturb(w, delta, out);
  const Key key = make_key(seed, step, index);
  const at::Tensor noise32 = noise_f32(w, noise);
  const float* nz = noise32.defined() ? noise32.data_ptr<float>() : nullptr;
  const float std_f = static_cast<float>(std);
  const int64_t numel = w.numel();
  MOREAU_DISPATCH_WEIGHT(w.scalar_type(), "perturb_out_cpu", [&] {
    const scalar_t* wp = w.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const float* dp = delta.data_ptr<float>();
    at::parallel_for(0, ceil_div(numel, kBlock), kGrainBlocks, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t e0 = b * kBlock;
        perturb_range<scalar_t>(wp, dp, nz, op, std_f, e0, std::min(kBlock, numel - e0), key);
      }
    });
  });
}

// One parallel loop over (tensor, block) work items of every tensor in the lists.
void perturb_multi_cpu(at::TensorList ws, at::TensorList deltas, at::TensorList outs, double std, int64_t seed,
                       int64_t step, at::IntArrayRef indices) {
  check_perturb_multi(ws, deltas, outs, indices);
  const size_t n = ws.size();
  std::vector<int64_t> first_block(n + 1, 0);
  std::vector<Key> keys(n);
  for (size_t k = 0; k < n; ++k) {
    check_perturb(ws[k], deltas[k], outs[k]);
    check_device("perturb_multi (cpu)", ws[k], c10::kCPU);
    keys[k] = make_key(seed, step, indices[k]);
    first_block[k + 1] = first_block[k] + ceil_div(ws[k].numel(), kBlock);
  }
  const float std_f = static_cast<float>(std);
  at::parallel_for(0, first_block[n], kGrainBlocks, [&](int64_t b0, int64_t b1) {
    int64_t b = b0;
    while (b < b1) {
      // tensor k owns blocks [first_block[k], first_block[k+1])
      const size_t k = std::upper_bound(first_block.begin(), first_block.end(), b) - first_block.begin() - 1;
      const int64_t stop = std::min(b1, first_block[k + 1]);
      const at::Tensor& w = ws[k];
      const int64_t numel = w.numel();
      MOREAU_DISPATCH_WEIGHT(w.scalar_type(), "perturb_multi_cpu", [&] {
        const scalar_t* wp = w.data_ptr<scalar_t>();
        scalar_t* op = outs[k].data_ptr<scalar_t>();
        const float* dp = deltas[k].data_ptr<float>();
        for (int64_t bb = b; bb < stop; ++bb) {
          const int64_t e0 = (bb - first_block[k]) * kBlock;
          perturb_range<scalar_t>(wp, dp, nullptr, op, std_f, e0, std::min(kBlock, numel - e0), keys[k]);
        }
      });
      b = stop;
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(moreau_C, CPU, m) {
  m.impl("philox_normal", &philox_normal_cpu);
  m.impl("philox_bits", &philox_bits_cpu);
  m.impl("perturb_out", &perturb_out_cpu);
  m.impl("perturb_multi", &perturb_multi_cpu);
}

}  // namespace cpu
}  // namespace moreau
