// Fused importance-weighted token dropout (IWTD) forward on the CPU.
//
// Semantics: drople_fast/ops/reference.py::iwtd_reference (docs/design.md §2
// steps 1-7, computed from q/k as in §3 without materialising the attention
// map). Entry and checks: iwtd_cpu.cpp; the computation: iwtd_kernel.cpp.
#pragma once

#include <tuple>

#include <ATen/core/Tensor.h>

namespace drople_fast {

// Arguments (all CPU, contiguous):
//   q, k      (B, H, S, Dh)  float32 / bfloat16 / float16, same dtype
//   hidden    (B, S, D)      float32 / bfloat16 / float16
//   eligible  (B, S) bool,   valid (B, S) bool,   anchor (B,) int64 in [0, S)
//   folded    (M, D) float32 (bridge tokens folded through the bridge map), shift (M,) float32
//   causal    text tower (key k visible from query j only if k <= j)
//   p_min <= p_max in [0, 1];  seed: one-element int64 tensor (Philox key)
//   row_stride: Philox offset of (b, j) is b * row_stride + j (0 means S)
// Returns (importance f32 (B,S), drop_prob f32 (B,S), drop_mask bool (B,S),
//          keep_count int64 (B,), keep_order int64 (B,S): kept positions first
//          in original order, then -1).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> iwtd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& hidden, const at::Tensor& eligible,
    const at::Tensor& valid, const at::Tensor& anchor, const at::Tensor& folded, const at::Tensor& shift,
    bool causal, double p_min, double p_max, const at::Tensor& seed, int64_t row_stride = 0);

}  // namespace drople_fast
