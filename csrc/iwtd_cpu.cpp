// Fused IWTD forward on the CPU (DESIGN.md §1 steps 1-7, §3).
//
// Per sample b, head h and allowed query row j the logits q_j . k_k / sqrt(Dh)
// are formed one row block at a time (never an S x S map):
//   * the anchor row's probabilities feed s1 (mean over heads),
//   * each content row's largest probability on another content key feeds s2
//     (exp(maxC - max) / sum, i.e. exp(maxC - lse)),
// then the folded bridge logits (M x D) @ h_j + shift give s3 (softmax over
// valid tokens per bridge token, max over bridge tokens), and the per-sample
// normalisation, drop probability, Philox Bernoulli draw and keep order follow.
// All arithmetic is float32 whatever the input dtype. Results do not depend
// on the number of threads (every reduction runs in a fixed order).
#include "iwtd_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "philox.h"

namespace drople_fast {
namespace {

constexpr float kEps = 1e-8f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kPosInf = std::numeric_limits<float>::infinity();
constexpr int64_t kRowBlock = 4;   // query rows per micro-kernel tile
constexpr int64_t kKeyBlock = 16;  // keys per micro-kernel tile (two 8-float vectors)

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// The two hot loops are compiled for several instruction sets and picked at
// load time (GCC/Clang function multi-versioning), so the extension stays
// portable (baseline x86-64) yet uses AVX2/AVX-512 where the CPU has them.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(DROPLE_FAST_NO_CLONES)
#define DROPLE_FAST_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define DROPLE_FAST_CLONES
#endif

// 8 floats; lowered to one AVX register or two SSE registers by the compiler.
// (These helpers are internal and always inlined, so the -Wpsabi note about
// passing 32-byte vectors without AVX does not apply.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
typedef float vec8 __attribute__((vector_size(32)));

inline vec8 load8(const float* p) {
  vec8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store8(float* p, vec8 v) { std::memcpy(p, &v, sizeof(v)); }

// logits[r, key] = q_r . k_key for kRowBlock query rows (qb: kRowBlock x Dh) and
// keys [0, n_pad) of kt (Dh x ld, K transposed); n_pad is a multiple of kKeyBlock.
// Register-tiled kRowBlock x kKeyBlock; the key loads are contiguous.
DROPLE_FAST_CLONES
void logits_block(const float* __restrict kt, const float* __restrict qb, float* __restrict logits, int64_t Dh,
                  int64_t ld, int64_t n_pad) {
  static_assert(kRowBlock == 4 && kKeyBlock == 16, "micro-kernel is written for a 4 x 16 tile");
  for (int64_t k0 = 0; k0 < n_pad; k0 += kKeyBlock) {
    vec8 a00 = {}, a01 = {}, a10 = {}, a11 = {}, a20 = {}, a21 = {}, a30 = {}, a31 = {};
    const float* kp = kt + k0;
    for (int64_t d = 0; d < Dh; ++d, kp += ld) {
      const vec8 k0v = load8(kp), k1v = load8(kp + 8);
      const float q0 = qb[d], q1 = qb[Dh + d], q2 = qb[2 * Dh + d], q3 = qb[3 * Dh + d];
      a00 += q0 * k0v;
      a01 += q0 * k1v;
      a10 += q1 * k0v;
      a11 += q1 * k1v;
      a20 += q2 * k0v;
      a21 += q2 * k1v;
      a30 += q3 * k0v;
      a31 += q3 * k1v;
    }
    float* out = logits + k0;
    store8(out, a00);
    store8(out + 8, a01);
    store8(out + ld, a10);
    store8(out + ld + 8, a11);
    store8(out + 2 * ld, a20);
    store8(out + 2 * ld + 8, a21);
    store8(out + 3 * ld, a30);
    store8(out + 3 * ld + 8, a31);
  }
}

// out[m * stride] = folded_m . h + shift_m for m < M (folded: M x D).
DROPLE_FAST_CLONES
void bridge_logits(const float* __restrict folded, const float* __restrict shift, const float* __restrict h,
                   int64_t M, int64_t D, float* __restrict out, int64_t stride) {
  for (int64_t m = 0; m < M; ++m) {
    const float* f = folded + m * D;
    vec8 acc0 = {}, acc1 = {};
    int64_t i = 0;
    for (; i + 16 <= D; i += 16) {
      acc0 += load8(f + i) * load8(h + i);
      acc1 += load8(f + i + 8) * load8(h + i + 8);
    }
    const vec8 acc = acc0 + acc1;
    float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (; i < D; ++i) s += f[i] * h[i];
    out[m * stride] = s + shift[m];
  }
}

#pragma GCC diagnostic pop

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

// Per-thread scratch; sized once per chunk of work items.
struct Scratch {
  std::vector<float> kt;      // Dh x Spad: K of one head, transposed, float, zero-padded keys
  std::vector<float> qb;      // kRowBlock x Dh: a block of query rows as float
  std::vector<float> logits;  // kRowBlock x Spad
  std::vector<float> s1, s2, s3;  // S each
  std::vector<float> gate;    // M x S bridge logits
  std::vector<float> hrow;    // D: one hidden row as float

  explicit Scratch(const Problem& P) {
    const int64_t Spad = round_up(P.S, kKeyBlock);
    kt.assign(P.Dh * Spad, 0.f);
    qb.assign(kRowBlock * P.Dh, 0.f);
    logits.assign(kRowBlock * Spad, 0.f);
    s1.assign(P.S, 0.f);
    s2.assign(P.S, 0.f);
    s3.assign(P.S, 0.f);
    gate.assign(P.M * P.S, 0.f);
    hrow.assign(P.D, 0.f);
  }
};

// Adds head h of sample b to s1 (anchor-row probabilities) and s2 (each content
// row's largest probability on another content key). q, k: this head's (S, Dh).
template <typename qk_t>
void head_stats(const Problem& P, const qk_t* q, const qk_t* k, int64_t b, float* s1, float* s2, Scratch& w) {
  const int64_t S = P.S, Dh = P.Dh;
  const int64_t Spad = round_up(S, kKeyBlock);
  const bool* valid = P.valid + b * S;
  const int64_t a = P.anchor[b];
  float* kt = w.kt.data();
  float* qb = w.qb.data();
  float* logits = w.logits.data();

  // K^T of this head as float, once (padding columns S..Spad stay zero).
  for (int64_t key = 0; key < S; ++key) {
    const qk_t* kr = k + key * Dh;
    for (int64_t d = 0; d < Dh; ++d) kt[d * Spad + key] = static_cast<float>(kr[d]);
  }

  for (int64_t j0 = 0; j0 < S; j0 += kRowBlock) {
    const int64_t rows = std::min(kRowBlock, S - j0);
    bool needed = false;  // rows of padding are never used, except the anchor's
    for (int64_t r = 0; r < rows; ++r) needed |= valid[j0 + r] || (j0 + r == a);
    if (!needed) continue;
    const int64_t n_keys = P.causal ? j0 + rows : S;
    const int64_t n_pad = round_up(n_keys, kKeyBlock);

    for (int64_t r = 0; r < kRowBlock; ++r) {
      float* qr = qb + r * Dh;
      if (r < rows) {
        const qk_t* src = q + (j0 + r) * Dh;
        for (int64_t d = 0; d < Dh; ++d) qr[d] = static_cast<float>(src[d]);
      } else {
        std::fill(qr, qr + Dh, 0.f);
      }
    }

    logits_block(kt, qb, logits, Dh, Spad, n_pad);

    for (int64_t r = 0; r < rows; ++r) {
      const int64_t j = j0 + r;
      if (!(valid[j] || j == a)) continue;
      float* l = logits + r * Spad;
      const int64_t nk = P.causal ? j + 1 : S;  // keys k <= j when causal
      for (int64_t key = 0; key < nk; ++key) l[key] *= P.scale;
      float mx = kNegInf;
      for (int64_t key = 0; key < nk; ++key) {
        if (valid[key]) mx = std::max(mx, l[key]);
      }
      if (mx == kNegInf) continue;  // no allowed key: the reference row is all zeros
      float sum = 0.f;
      float cmax = kNegInf;  // best other content key (k in C, k != j)
      for (int64_t key = 0; key < nk; ++key) {
        if (!valid[key]) continue;
        sum += std::exp(l[key] - mx);
        if (key != a && key != j) cmax = std::max(cmax, l[key]);
      }
      if (valid[j] && j != a && cmax != kNegInf) s2[j] += std::exp(cmax - mx) / sum;
      if (j == a) {
        for (int64_t key = 0; key < nk; ++key) {
          if (valid[key]) s1[key] += std::exp(l[key] - mx) / sum;
        }
      }
    }
  }
}

// s3_j = max_m softmax_over_valid_tokens(folded_m . h_j + shift_m). h: (S, D) of sample b.
template <typename h_t>
void bridge_score(const Problem& P, const h_t* h, int64_t b, float* s3, Scratch& w) {
  const int64_t S = P.S, D = P.D, M = P.M;
  const bool* valid = P.valid + b * S;
  float* gate = w.gate.data();
  for (int64_t j = 0; j < S; ++j) {
    s3[j] = 0.f;
    if (!valid[j]) continue;
    const float* hj;
    if constexpr (std::is_same_v<h_t, float>) {
      hj = h + j * D;
    } else {
      float* row = w.hrow.data();
      const h_t* src = h + j * D;
      for (int64_t d = 0; d < D; ++d) row[d] = static_cast<float>(src[d]);
      hj = row;
    }
    bridge_logits(P.folded, P.shift, hj, M, D, gate + j, S);
  }
  for (int64_t m = 0; m < M; ++m) {
    const float* g = gate + m * S;
    float mx = kNegInf;
    for (int64_t j = 0; j < S; ++j) {
      if (valid[j]) mx = std::max(mx, g[j]);
    }
    if (mx == kNegInf) continue;  // no valid token at all
    float sum = 0.f;
    for (int64_t j = 0; j < S; ++j) {
      if (valid[j]) sum += std::exp(g[j] - mx);
    }
    for (int64_t j = 0; j < S; ++j) {
      if (valid[j]) s3[j] = std::max(s3[j], std::exp(g[j] - mx) / sum);
    }
  }
}

struct Outputs {
  float* importance;
  float* drop_prob;
  bool* drop_mask;
  int64_t* keep_count;
  int64_t* keep_order;
};

// Steps 4-7 for sample b from its three raw scores (s1, s2 already head means).
void finalize(const Problem& P, int64_t b, const float* s1, const float* s2, const float* s3, const Outputs& out) {
  const int64_t S = P.S;
  const bool* valid = P.valid + b * S;
  const bool* eligible = P.eligible + b * S;
  const int64_t a = P.anchor[b];
  float* imp = out.importance + b * S;
  float* prob = out.drop_prob + b * S;
  bool* mask = out.drop_mask + b * S;
  int64_t* order = out.keep_order + b * S;

  auto content = [&](int64_t j) { return valid[j] && j != a; };
  float sum1 = 0.f, sum2 = 0.f, sum3 = 0.f;
  for (int64_t j = 0; j < S; ++j) {
    if (!content(j)) continue;
    sum1 += s1[j];
    sum2 += s2[j];
    sum3 += s3[j];
  }
  const float d1 = sum1 + kEps, d2 = sum2 + kEps, d3 = sum3 + kEps;
  float lo = kPosInf, hi = kNegInf;
  for (int64_t j = 0; j < S; ++j) {
    if (!content(j)) {
      imp[j] = 0.f;
      continue;
    }
    const float v = (s1[j] / d1 + s2[j] / d2 + s3[j] / d3) / 3.0f;
    imp[j] = v;
    lo = std::min(lo, v);
    hi = std::max(hi, v);
  }
  float span = hi - lo;
  if (!(span > 0.f)) span = 1.f;  // zero range (or empty C) counts as one

  int64_t kept = 0;
  for (int64_t j = 0; j < S; ++j) {
    bool drop = false;
    if (eligible[j] && content(j)) {
      const float normalised = (imp[j] - lo) / span;
      const float scaled = normalised * P.p_range;
      const float p = P.p_max - scaled;
      prob[j] = p;
      drop = philox::token_uniform(P.seed, b * P.row_stride + j) < p;
    } else {
      prob[j] = 0.f;
    }
    mask[j] = drop;
    if (valid[j] && !drop) order[kept++] = j;
  }
  for (int64_t i = kept; i < S; ++i) order[i] = -1;
  out.keep_count[b] = kept;
}

template <typename qk_t, typename h_t>
void run(const Problem& P, const qk_t* q, const qk_t* k, const h_t* hidden, const Outputs& out) {
  const int64_t B = P.B, H = P.H, S = P.S, Dh = P.Dh;
  const int64_t head_stride = S * Dh;

  auto finish_sample = [&](int64_t b, Scratch& w) {
    for (int64_t j = 0; j < S; ++j) {
      w.s1[j] /= static_cast<float>(H);
      w.s2[j] /= static_cast<float>(H);
    }
    bridge_score<h_t>(P, hidden + b * S * P.D, b, w.s3.data(), w);
    finalize(P, b, w.s1.data(), w.s2.data(), w.s3.data(), out);
  };

  if (B >= at::get_num_threads() || H == 1) {
    // Enough samples to keep every thread busy: one sample per work item, O(S) extra memory.
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      Scratch w(P);
      for (int64_t b = begin; b < end; ++b) {
        std::fill(w.s1.begin(), w.s1.end(), 0.f);
        std::fill(w.s2.begin(), w.s2.end(), 0.f);
        for (int64_t h = 0; h < H; ++h) {
          const int64_t off = (b * H + h) * head_stride;
          head_stats<qk_t>(P, q + off, k + off, b, w.s1.data(), w.s2.data(), w);
        }
        finish_sample(b, w);
      }
    });
    return;
  }
  // Few samples: spread (sample, head) pairs over the threads, then reduce over
  // heads in the same order as above (bit-identical results).
  std::vector<float> head_s1(B * H * S, 0.f), head_s2(B * H * S, 0.f);
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    Scratch w(P);
    for (int64_t i = begin; i < end; ++i) {
      head_stats<qk_t>(P, q + i * head_stride, k + i * head_stride, i / H, head_s1.data() + i * S,
                       head_s2.data() + i * S, w);
    }
  });
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    Scratch w(P);
    for (int64_t b = begin; b < end; ++b) {
      std::fill(w.s1.begin(), w.s1.end(), 0.f);
      std::fill(w.s2.begin(), w.s2.end(), 0.f);
      for (int64_t h = 0; h < H; ++h) {
        const float* a1 = head_s1.data() + (b * H + h) * S;
        const float* a2 = head_s2.data() + (b * H + h) * S;
        for (int64_t j = 0; j < S; ++j) {
          w.s1[j] += a1[j];
          w.s2[j] += a2[j];
        }
      }
      finish_sample(b, w);
    }
  });
}

// Calls f(T{}) with T the C++ type of a float32 / bfloat16 / float16 tensor.
template <typename F>
void dispatch_float(const at::Tensor& t, const char* name, F&& f) {
  switch (t.scalar_type()) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    case at::kHalf: f(c10::Half{}); break;
    default:
      TORCH_CHECK(false, "iwtd_cpu: ", name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

void check_cpu_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "iwtd_cpu: ", name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.is_contiguous(), "iwtd_cpu: ", name, " must be contiguous (shape ", t.sizes(), ", strides ",
              t.strides(), ")");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> iwtd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& hidden, const at::Tensor& eligible,
    const at::Tensor& valid, const at::Tensor& anchor, const at::Tensor& folded, const at::Tensor& shift,
    bool causal, double p_min, double p_max, const at::Tensor& seed, int64_t row_stride) {
  TORCH_CHECK(q.dim() == 4, "iwtd_cpu: q must be (B, H, S, Dh), got shape ", q.sizes());
  TORCH_CHECK(k.sizes() == q.sizes(), "iwtd_cpu: k must have the shape of q ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), "iwtd_cpu: q and k must have one dtype, got ", q.scalar_type(),
              " and ", k.scalar_type());
  const int64_t B = q.size(0), H = q.size(1), S = q.size(2), Dh = q.size(3);
  TORCH_CHECK(H >= 1 && Dh >= 1, "iwtd_cpu: q needs at least one head and Dh >= 1, got shape ", q.sizes());
  TORCH_CHECK(hidden.dim() == 3 && hidden.size(0) == B && hidden.size(1) == S,
              "iwtd_cpu: hidden must be (B, S, D) = (", B, ", ", S, ", D) to match q, got ", hidden.sizes());
  const int64_t D = hidden.size(2);
  TORCH_CHECK(eligible.scalar_type() == at::kBool && eligible.dim() == 2 && eligible.size(0) == B &&
                  eligible.size(1) == S,
              "iwtd_cpu: eligible must be bool (B, S) = (", B, ", ", S, "), got ", eligible.scalar_type(), " ",
              eligible.sizes());
  TORCH_CHECK(valid.scalar_type() == at::kBool && valid.dim() == 2 && valid.size(0) == B && valid.size(1) == S,
              "iwtd_cpu: valid must be bool (B, S) = (", B, ", ", S, "), got ", valid.scalar_type(), " ",
              valid.sizes());
  TORCH_CHECK(anchor.scalar_type() == at::kLong && anchor.dim() == 1 && anchor.size(0) == B,
              "iwtd_cpu: anchor must be int64 (B,) = (", B, ",), got ", anchor.scalar_type(), " ", anchor.sizes());
  TORCH_CHECK(folded.scalar_type() == at::kFloat && folded.dim() == 2 && folded.size(1) == D && folded.size(0) >= 1,
              "iwtd_cpu: folded must be float32 (M, D) with M >= 1 and D = ", D, ", got ", folded.scalar_type(), " ",
              folded.sizes());
  const int64_t M = folded.size(0);
  TORCH_CHECK(shift.scalar_type() == at::kFloat && shift.dim() == 1 && shift.size(0) == M,
              "iwtd_cpu: shift must be float32 (M,) = (", M, ",), got ", shift.scalar_type(), " ", shift.sizes());
  TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 1,
              "iwtd_cpu: seed must be a one-element int64 tensor, got ", seed.scalar_type(), " ", seed.sizes());
  TORCH_CHECK(row_stride <= 0 || row_stride >= S, "iwtd_cpu: row_stride must be 0 (= S) or >= S = ", S,
              ", got ", row_stride);
  TORCH_CHECK(0.0 <= p_min && p_min <= p_max && p_max <= 1.0,
              "iwtd_cpu: need 0 <= p_min <= p_max <= 1, got p_min=", p_min, " p_max=", p_max);
  check_cpu_contiguous(q, "q");
  check_cpu_contiguous(k, "k");
  check_cpu_contiguous(hidden, "hidden");
  check_cpu_contiguous(eligible, "eligible");
  check_cpu_contiguous(valid, "valid");
  check_cpu_contiguous(anchor, "anchor");
  check_cpu_contiguous(folded, "folded");
  check_cpu_contiguous(shift, "shift");
  TORCH_CHECK(seed.device().is_cpu(), "iwtd_cpu: seed must be a CPU tensor, got device ", seed.device());

  const int64_t* anchor_ptr = anchor.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(0 <= anchor_ptr[b] && anchor_ptr[b] < S, "iwtd_cpu: anchor[", b, "] = ", anchor_ptr[b],
                " is outside [0, ", S, ")");
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
      run<qk_t, h_t>(P, q.const_data_ptr<qk_t>(), k.const_data_ptr<qk_t>(), hidden.const_data_ptr<h_t>(), out);
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
