// Perturb mode's per-element multiplicative noise on the CPU, as one fused op:
//
//   out[b, j, :] = hidden[b, j, :] * (1 + sigma * n[b, j, :])   where selected[b, j]
//   out[b, j, :] = hidden[b, j, :]                               elsewhere
//
// with n the standard normal Triton's tl.randn(key, counter) gives for the counter
// (b * row_stride + j) * D + d: Box-Muller on the uniforms of Philox words c0 and c1
// (drople_fast/ops/noise.py is the specification). The noise is generated and applied
// in one pass over each selected row; nothing of size (B, S, D) but the output exists.
// Float32 math whatever the storage dtype, rounded once to the output.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "philox.h"

namespace drople_fast {
namespace {

// Triton's pair_uniform_to_normal (first output) on Philox words c0, c1.
inline float box_muller(const philox::Words& w) {
  const float u1 = std::max(1.0e-7f, philox::uniform_from_uint32(w.c0));
  const float u2 = philox::uniform_from_uint32(w.c1);
  const float theta = static_cast<float>(6.283185307179586) * u2;
  return std::sqrt(-2.0f * std::log(u1)) * std::cos(theta);
}

template <typename T>
void perturb_rows(const T* in, T* out, const bool* selected, int64_t B, int64_t S, int64_t D, int64_t row_stride,
                  uint64_t key, float sigma) {
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t j = 0; j < S; ++j) {
      const int64_t row = b * S + j;
      const T* src = in + row * D;
      T* dst = out + row * D;
      if (!selected[row]) {
        std::memcpy(dst, src, sizeof(T) * D);
        continue;
      }
      const uint64_t base = static_cast<uint64_t>((b * row_stride + j) * D);
      for (int64_t d = 0; d < D; ++d) {
        const float n = box_muller(philox::philox4x32(key, base + static_cast<uint64_t>(d)));
        const float factor = 1.0f + sigma * n;
        dst[d] = static_cast<T>(static_cast<float>(src[d]) * factor);
      }
    }
  }
}

}  // namespace

at::Tensor perturb_noise_cpu(const at::Tensor& hidden, const at::Tensor& selected, const at::Tensor& seed,
                             double sigma, int64_t row_stride) {
  TORCH_CHECK(hidden.dim() == 3, "perturb_noise_cpu: hidden must be (B, S, D), got shape ", hidden.sizes());
  const int64_t B = hidden.size(0), S = hidden.size(1), D = hidden.size(2);
  TORCH_CHECK(hidden.device().is_cpu() && hidden.is_contiguous(),
              "perturb_noise_cpu: hidden must be a contiguous CPU tensor");
  TORCH_CHECK(selected.scalar_type() == at::kBool && selected.dim() == 2 && selected.size(0) == B &&
                  selected.size(1) == S && selected.is_contiguous() && selected.device().is_cpu(),
              "perturb_noise_cpu: selected must be contiguous bool (B, S) = (", B, ", ", S, ") on the CPU, got ",
              selected.scalar_type(), " ", selected.sizes());
  TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 1 && seed.device().is_cpu(),
              "perturb_noise_cpu: seed must be a one-element int64 CPU tensor, got ", seed.scalar_type(), " ",
              seed.sizes());
  TORCH_CHECK(sigma >= 0.0, "perturb_noise_cpu: sigma must be >= 0, got ", sigma);
  TORCH_CHECK(row_stride == 0 || row_stride >= S, "perturb_noise_cpu: row_stride must be 0 (= S) or >= S = ", S,
              ", got ", row_stride);
  at::Tensor out = at::empty_like(hidden);
  if (hidden.numel() == 0) return out;
  const uint64_t key = static_cast<uint64_t>(seed.reshape({}).item<int64_t>());
  const int64_t stride = row_stride > 0 ? row_stride : S;
  const float s = static_cast<float>(sigma);
  const bool* sel = selected.data_ptr<bool>();
  switch (hidden.scalar_type()) {
    case at::kFloat:
      perturb_rows<float>(hidden.const_data_ptr<float>(), out.data_ptr<float>(), sel, B, S, D, stride, key, s);
      break;
    case at::kBFloat16:
      perturb_rows<c10::BFloat16>(hidden.const_data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>(), sel, B, S,
                                  D, stride, key, s);
      break;
    case at::kHalf:
      perturb_rows<c10::Half>(hidden.const_data_ptr<c10::Half>(), out.data_ptr<c10::Half>(), sel, B, S, D, stride,
                              key, s);
      break;
    default:
      TORCH_CHECK(false, "perturb_noise_cpu: hidden must be float32, bfloat16 or float16, got ", hidden.scalar_type());
  }
  return out;
}

}  // namespace drople_fast

TORCH_LIBRARY_FRAGMENT(drople_fast, m) {
  m.def("perturb_noise_cpu(Tensor hidden, Tensor selected, Tensor seed, float sigma, int row_stride=0) -> Tensor");
}

TORCH_LIBRARY_IMPL(drople_fast, CPU, m) { m.impl("perturb_noise_cpu", &drople_fast::perturb_noise_cpu); }
