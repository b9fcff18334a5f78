// torch.ops.drople_fast.iwtd_cpu: the op entry (argument checks, dtype
// dispatch, output allocation) and its registration. The computation is in
// iwtd_kernel.cpp.
#include "iwtd_cpu.h"

#include <cmath>
#include <cstdint>

#include <ATen/ATen.h>
#include <torch/library.h>

#include "iwtd_kernel.h"

// Argument checks in the style of flash-attention's CHECK_SHAPE / CHECK_DEVICE:
// each failure is a one-line c10::Error naming the argument, e.g.
//   "iwtd_cpu: eligible must have shape (B, S) = [2, 9], got [2, 8]".
#define IWTD_CHECK(cond, ...) TORCH_CHECK(cond, "iwtd_cpu: ", __VA_ARGS__)
#define CHECK_DIM(x, n, dims) IWTD_CHECK((x).dim() == (n), #x " must be " dims ", got shape ", (x).sizes())
#define CHECK_SHAPE(x, dims, ...)                                                                    \
  IWTD_CHECK((x).sizes() == at::IntArrayRef({__VA_ARGS__}), #x " must have shape " dims " = ",       \
             at::IntArrayRef({__VA_ARGS__}), ", got ", (x).sizes())
#define CHECK_DTYPE(x, dtype, name) \
  IWTD_CHECK((x).scalar_type() == (dtype), #x " must be " name ", got ", (x).scalar_type())
#define CHECK_CPU(x) IWTD_CHECK((x).device().is_cpu(), #x " must be a CPU tensor, got device ", (x).device())
#define CHECK_CONTIGUOUS(x)                                                                               \
  IWTD_CHECK((x).is_contiguous(), #x " must be contiguous (shape ", (x).sizes(), ", strides ", (x).strides(), \
             ")")
#define CHECK_CPU_CONTIGUOUS(x) \
  do {                          \
    CHECK_CPU(x);               \
    CHECK_CONTIGUOUS(x);        \
  } while (0)

namespace drople_fast {
namespace {

// Calls f(T{}) with T the C++ type of a float32 / bfloat16 / float16 tensor.
template <typename F>
void dispatch_float(const at::Tensor& t, const char* name, F&& f) {
  switch (t.scalar_type()) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    case at::kHalf: f(c10::Half{}); break;
    default: IWTD_CHECK(false, name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> iwtd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& hidden, const at::Tensor& eligible,
    const at::Tensor& valid, const at::Tensor& anchor, const at::Tensor& folded, const at::Tensor& shift,
    bool causal, double p_min, double p_max, const at::Tensor& seed, int64_t row_stride) {
  CHECK_DIM(q, 4, "(B, H, S, Dh)");
  const int64_t B = q.size(0), H = q.size(1), S = q.size(2), Dh = q.size(3);
  IWTD_CHECK(H >= 1 && Dh >= 1, "q needs at least one head and Dh >= 1, got shape ", q.sizes());
  CHECK_SHAPE(k, "(B, H, S, Dh)", B, H, S, Dh);
  IWTD_CHECK(k.scalar_type() == q.scalar_type(), "k must have the dtype of q (", q.scalar_type(), "), got ",
             k.scalar_type());
  CHECK_DIM(hidden, 3, "(B, S, D)");
  const int64_t D = hidden.size(2);
  CHECK_SHAPE(hidden, "(B, S, D)", B, S, D);
  CHECK_DTYPE(eligible, at::kBool, "bool");
  CHECK_SHAPE(eligible, "(B, S)", B, S);
  CHECK_DTYPE(valid, at::kBool, "bool");
  CHECK_SHAPE(valid, "(B, S)", B, S);
  CHECK_DTYPE(anchor, at::kLong, "int64");
  CHECK_SHAPE(anchor, "(B,)", B);
  CHECK_DTYPE(folded, at::kFloat, "float32");
  CHECK_DIM(folded, 2, "(M, D)");
  const int64_t M = folded.size(0);
  IWTD_CHECK(M >= 1, "folded must have at least one bridge token (M >= 1), got shape ", folded.sizes());
  CHECK_SHAPE(folded, "(M, D)", M, D);
  CHECK_DTYPE(shift, at::kFloat, "float32");
  CHECK_SHAPE(shift, "(M,)", M);
  CHECK_DTYPE(seed, at::kLong, "int64");
  IWTD_CHECK(seed.numel() == 1, "seed must have one element, got shape ", seed.sizes());
  IWTD_CHECK(row_stride <= 0 || row_stride >= S, "row_stride must be 0 (= S) or >= S = ", S, ", got ", row_stride);
  IWTD_CHECK(0.0 <= p_min && p_min <= p_max && p_max <= 1.0, "need 0 <= p_min <= p_max <= 1, got p_min=", p_min,
             " p_max=", p_max);
  CHECK_CPU_CONTIGUOUS(q);
  CHECK_CPU_CONTIGUOUS(k);
  CHECK_CPU_CONTIGUOUS(hidden);
  CHECK_CPU_CONTIGUOUS(eligible);
  CHECK_CPU_CONTIGUOUS(valid);
  CHECK_CPU_CONTIGUOUS(anchor);
  CHECK_CPU_CONTIGUOUS(folded);
  CHECK_CPU_CONTIGUOUS(shift);
  CHECK_CPU(seed);

  const int64_t* anchor_ptr = anchor.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    IWTD_CHECK(0 <= anchor_ptr[b] && anchor_ptr[b] < S, "anchor[", b, "] = ", anchor_ptr[b], " is outside [0, ", S,
               ")");
  }

  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor importance = at::empty({B, S}, f32);
  at::Tensor drop_prob = at::empty({B, S}, f32);
  at::Tensor drop_mask = at::empty({B, S}, f32.dtype(at::kBool));
  at::Tensor keep_count = at::empty({B}, f32.dtype(at::kLong));
  at::Tensor keep_order = at::empty({B, S}, f32.dtype(at::kLong));
  if (B == 0 || S == 0) return {importance, drop_prob, drop_mask, keep_count.zero_(), keep_order};

  Problem P;
  P.B = B;
  P.H = H;
  P.S = S;
  P.Dh = Dh;
  P.D = D;
  P.M = M;
  P.causal = causal;
  P.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(Dh)));
  P.p_max = static_cast<float>(p_max);
  P.p_range = static_cast<float>(p_max - p_min);
  P.seed = seed.reshape({}).item<int64_t>();
  P.row_stride = row_stride > 0 ? row_stride : S;
  P.eligible = eligible.data_ptr<bool>();
  P.valid = valid.data_ptr<bool>();
  P.anchor = anchor_ptr;
  P.folded = folded.data_ptr<float>();
  P.shift = shift.data_ptr<float>();
  const Outputs out{importance.data_ptr<float>(), drop_prob.data_ptr<float>(), drop_mask.data_ptr<bool>(),
                    keep_count.data_ptr<int64_t>(), keep_order.data_ptr<int64_t>()};

  dispatch_float(q, "q", [&](auto qk_tag) {
    using qk_t = decltype(qk_tag);
    dispatch_float(hidden, "hidden", [&](auto h_tag) {
      using h_t = decltype(h_tag);
      iwtd_kernel<qk_t, h_t>(P, q.const_data_ptr<qk_t>(), k.const_data_ptr<qk_t>(), hidden.const_data_ptr<h_t>(),
                             out);
    });
  });
  return {importance, drop_prob, drop_mask, keep_count, keep_order};
}

}  // namespace drople_fast

TORCH_LIBRARY_FRAGMENT(drople_fast, m) {
  m.def(
      "iwtd_cpu(Tensor q, Tensor k, Tensor hidden, Tensor eligible, Tensor valid, Tensor anchor, "
      "Tensor folded, Tensor shift, bool causal, float p_min, float p_max, Tensor seed, int row_stride=0) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(drople_fast, CPU, m) { m.impl("iwtd_cpu", &drople_fast::iwtd_cpu); }
