// The fused IWTD CPU kernel behind torch.ops.drople_fast.iwtd_cpu: raw pointers
// in, raw pointers out. Arguments are checked by the op entry (iwtd_cpu.cpp);
// the kernel trusts them.
#pragma once

#include <cstdint>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace drople_fast {

// One call's sizes, scalars and the small inputs every work item reads.
struct Problem {
  int64_t B, H, S, Dh, D, M;
  bool causal;
  float scale;      // float(1 / sqrt(Dh)), as the reference multiplies its float32 logits
  float p_max;      // float(p_max)
  float p_range;    // float(p_max - p_min) (difference taken in double, as in Python)
  int64_t seed;
  int64_t row_stride;  // Philox offset of token j of sample b is b * row_stride + j
  const bool* eligible;
  const bool* valid;
  const int64_t* anchor;
  const float* folded;
  const float* shift;
};

// The five (preallocated, contiguous) results.
struct Outputs {
  float* importance;
  float* drop_prob;
  bool* drop_mask;
  int64_t* keep_count;
  int64_t* keep_order;
};

// q, k: (B, H, S, Dh); hidden: (B, S, D); each of float, c10::BFloat16 or c10::Half
// (instantiated for all nine pairs in iwtd_kernel.cpp). All arithmetic is float32.
template <typename qk_t, typename h_t>
void iwtd_kernel(const Problem& P, const qk_t* q, const qk_t* k, const h_t* hidden, const Outputs& out);

}  // namespace drople_fast
