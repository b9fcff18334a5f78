// The fused IWTD CPU kernel (docs/design.md §2 steps 1-7, computed as in §3).
//
// Per sample b and head h the S x S logits q . k^T of that head are formed in a
// thread-local buffer with one single-threaded SGEMM (MKL's sgemm_ where torch
// exports it, at::mm otherwise), then each allowed query row is scanned with
// vectorised loops:
//   * the anchor row's probabilities feed s1 (mean over heads),
//   * each content row's largest probability on another content key feeds s2
//     (exp(maxC - max) / sum, i.e. exp(maxC - lse)),
// then the folded bridge logits (M x D) @ h^T + shift (one more SGEMM per
// sample) give s3 (softmax over valid tokens per bridge token, max over bridge
// tokens), and the per-sample normalisation, drop probability, Philox
// Bernoulli draw and keep order follow. All arithmetic is float32 whatever the
// input dtype (bf16 / fp16 inputs are converted once per head / sample).
// Results do not depend on the number of threads: every work item runs the
// same single-threaded code on the same buffers, and every reduction (over
// keys, over heads) runs in a fixed order.
#include "iwtd_kernel.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include <ATen/ATen.h>

#include "parallel_items.h"
#include "philox.h"
#include "simd.h"

// BLAS entry points that torch's libtorch_cpu exports when it is built with
// MKL (LP64 interface, as torch's own BlasKernel.cpp declares it). Weak, so
// the extension still loads against a torch without them (then at::mm is used).
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
int MKL_Set_Num_Threads_Local(int nt) __attribute__((weak));
}

namespace drople_fast {
namespace {

using simd::kLanes;
using simd::round_up;
using simd::vecf;
using simd::veci;
using simd::loadv;
using simd::storev;
using simd::splat;
using simd::vmax;
using simd::hmax;
using simd::hsum;
using simd::vexp;

constexpr float kEps = 1e-8f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kPosInf = std::numeric_limits<float>::infinity();

// Row-major C (m x n, leading dimension ldc) = A (m x kd, lda) . B (n x kd, ldb)^T,
// single-threaded (the caller pins MKL to one thread; see MklSingleThread).
void gemm_nt(int64_t m, int64_t n, int64_t kd, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
             int64_t ldc) {
  if (sgemm_ != nullptr) {
    // Column-major view: C^T (n x m) = B (as kd x n, transposed) . A (as kd x m).
    const int im = static_cast<int>(m), in = static_cast<int>(n), ik = static_cast<int>(kd);
    const int ilda = static_cast<int>(lda), ildb = static_cast<int>(ldb), ildc = static_cast<int>(ldc);
    const float one = 1.f, zero = 0.f;
    sgemm_("T", "N", &in, &im, &ik, &one, B, &ildb, A, &ilda, &zero, C, &ildc);
    return;
  }
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor a = at::from_blob(const_cast<float*>(A), {m, kd}, {lda, 1}, f32);
  at::Tensor b = at::from_blob(const_cast<float*>(B), {n, kd}, {ldb, 1}, f32);
  at::Tensor c = at::from_blob(C, {m, n}, {ldc, 1}, f32);
  c.copy_(at::mm(a, b.t()));
}

// Pins MKL to one thread in this scope, so a work item's SGEMM never splits its
// reduction whatever torch's thread count (inside at::parallel_for MKL would
// run single-threaded anyway; this also covers the inline, one-chunk case).
struct MklSingleThread {
  int saved = 0;
  bool active = false;
  MklSingleThread() {
    if (MKL_Set_Num_Threads_Local != nullptr) {
      saved = MKL_Set_Num_Threads_Local(1);
      active = true;
    }
  }
  ~MklSingleThread() {
    if (active) MKL_Set_Num_Threads_Local(saved);
  }
  MklSingleThread(const MklSingleThread&) = delete;
  MklSingleThread& operator=(const MklSingleThread&) = delete;
};

// ---------------------------------------------------------------------------
// Vectorised row loops (n a multiple of kLanes unless stated otherwise).

// t[i] = t[i] * scale + add + neg[i] for i < n (n a multiple of kLanes); neg is 0 or -inf.
DROPLE_FAST_CLONES
void affine_mask(float* __restrict t, float scale, float add, const float* __restrict neg, int64_t n) {
  const vecf vs = splat(scale), va = splat(add);
  for (int64_t i = 0; i < n; i += kLanes) storev(t + i, (loadv(t + i) * vs + va) + loadv(neg + i));
}

// One logits row: t[i] = t[i] * scale + neg_valid[i] for i < nk and -inf for
// nk <= i < round_up(nk, kLanes) (keys hidden by the causal mask, or padding);
// *m1 = max_i t[i] (the softmax max), *m2 = max_i (t[i] + neg_other[i]).
DROPLE_FAST_CLONES
void scale_mask_max2(float* __restrict t, float scale, const float* __restrict neg_valid,
                     const float* __restrict neg_other, int64_t nk, float* m1, float* m2) {
  const vecf vs = splat(scale), ninf = splat(kNegInf);
  vecf a = ninf, c = ninf;
  int64_t i = 0;
  for (; i + kLanes <= nk; i += kLanes) {
    const vecf v = loadv(t + i) * vs + loadv(neg_valid + i);
    storev(t + i, v);
    a = vmax(a, v);
    c = vmax(c, v + loadv(neg_other + i));
  }
  if (i < nk) {
    veci lane;
    for (int l = 0; l < kLanes; ++l) lane[l] = l;
    const veci live = lane < static_cast<int32_t>(nk - i);
    const vecf v = live ? loadv(t + i) * vs + loadv(neg_valid + i) : ninf;
    storev(t + i, v);
    a = vmax(a, v);
    c = vmax(c, v + loadv(neg_other + i));
  }
  *m1 = hmax(a);
  *m2 = hmax(c);
}

// max_i t[i].
DROPLE_FAST_CLONES
float max1(const float* __restrict t, int64_t n) {
  vecf a = splat(kNegInf);
  for (int64_t i = 0; i < n; i += kLanes) a = vmax(a, loadv(t + i));
  return hmax(a);
}

// sum_i exp(t[i] - m), lanes summed in a fixed order.
DROPLE_FAST_CLONES
float sum_exp(const float* __restrict t, float m, int64_t n) {
  const vecf vm = splat(m);
  vecf s0 = {}, s1 = {};
  int64_t i = 0;
  for (; i + 2 * kLanes <= n; i += 2 * kLanes) {
    s0 += vexp(loadv(t + i) - vm);
    s1 += vexp(loadv(t + i + kLanes) - vm);
  }
  if (i < n) s0 += vexp(loadv(t + i) - vm);
  return hsum(s0 + s1);
}

// acc[i] += exp(t[i] - m) / sum.
DROPLE_FAST_CLONES
void add_softmax(const float* __restrict t, float m, float sum, float* __restrict acc, int64_t n) {
  const vecf vm = splat(m), vsum = splat(sum);
  for (int64_t i = 0; i < n; i += kLanes) storev(acc + i, loadv(acc + i) + vexp(loadv(t + i) - vm) / vsum);
}

// acc[i] = max(acc[i], exp(t[i] - m) / sum).
DROPLE_FAST_CLONES
void max_softmax(const float* __restrict t, float m, float sum, float* __restrict acc, int64_t n) {
  const vecf vm = splat(m), vsum = splat(sum);
  for (int64_t i = 0; i < n; i += kLanes) storev(acc + i, vmax(loadv(acc + i), vexp(loadv(t + i) - vm) / vsum));
}

// ---------------------------------------------------------------------------
// The algorithm.

// Per-thread scratch; sized once per chunk of work items. Rows are padded to
// Spad = round_up(S, kLanes) columns; the GEMMs never write the padding, which
// stays 0 (and is masked to -inf by neg_valid before any max or exp).
struct Scratch {
  int64_t Spad;
  std::vector<float> qf, kf;       // S x Dh: one head's q and k as float (non-float inputs only)
  std::vector<float> hf;           // S x D: one sample's hidden states as float (non-float inputs only)
  std::vector<float> logits;       // S x Spad: one head's q . k^T
  std::vector<float> gate;         // M x Spad: bridge logits
  std::vector<float> neg_valid;    // Spad: 0 for valid keys, -inf otherwise
  std::vector<float> neg_content;  // Spad: 0 for content keys (valid, not the anchor), -inf otherwise
  std::vector<float> s1, s2, s3;   // Spad each

  Scratch(const Problem& P, bool float_qk, bool float_h) : Spad(round_up(P.S, kLanes)) {
    if (!float_qk) {
      qf.assign(P.S * P.Dh, 0.f);
      kf.assign(P.S * P.Dh, 0.f);
    }
    if (!float_h) hf.assign(P.S * P.D, 0.f);
    logits.assign(P.S * Spad, 0.f);
    gate.assign(P.M * Spad, 0.f);
    neg_valid.assign(Spad, kNegInf);
    neg_content.assign(Spad, kNegInf);
    s1.assign(Spad, 0.f);
    s2.assign(Spad, 0.f);
    s3.assign(Spad, 0.f);
  }

  // The key masks of sample b.
  void set_sample(const Problem& P, int64_t b) {
    const bool* valid = P.valid + b * P.S;
    const int64_t a = P.anchor[b];
    for (int64_t j = 0; j < P.S; ++j) {
      neg_valid[j] = valid[j] ? 0.f : kNegInf;
      neg_content[j] = (valid[j] && j != a) ? 0.f : kNegInf;
    }
  }
};

template <typename T>
void to_float(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// Adds head h of sample b to s1 (anchor-row probabilities) and s2 (each content
// row's largest probability on another content key). q, k: this head's (S, Dh).
// w.set_sample(P, b) must have been called.
template <typename qk_t>
void head_stats(const Problem& P, const qk_t* q, const qk_t* k, int64_t b, float* s1, float* s2, Scratch& w) {
  const int64_t S = P.S, Dh = P.Dh, Spad = w.Spad;
  const bool* valid = P.valid + b * S;
  const int64_t a = P.anchor[b];
  const float* qp;
  const float* kp;
  if constexpr (std::is_same_v<qk_t, float>) {
    qp = q;
    kp = k;
  } else {
    to_float(q, w.qf.data(), S * Dh);
    to_float(k, w.kf.data(), S * Dh);
    qp = w.qf.data();
    kp = w.kf.data();
  }
  float* logits = w.logits.data();
  gemm_nt(S, S, Dh, qp, Dh, kp, Dh, logits, Spad);

  float* neg_content = w.neg_content.data();
  for (int64_t j = 0; j < S; ++j) {
    if (!(valid[j] || j == a)) continue;  // rows of padding are never used, except the anchor's
    float* t = logits + j * Spad;
    const int64_t nk = P.causal ? j + 1 : S;  // keys k <= j when causal
    const int64_t npad = round_up(nk, kLanes);
    const float saved = neg_content[j];
    neg_content[j] = kNegInf;  // best *other* content key
    float mx, cmax;
    scale_mask_max2(t, P.scale, w.neg_valid.data(), neg_content, nk, &mx, &cmax);
    neg_content[j] = saved;
    if (mx == kNegInf) continue;  // no allowed key: the reference row is all zeros
    const float sum = sum_exp(t, mx, npad);
    if (valid[j] && j != a && cmax != kNegInf) s2[j] += std::exp(cmax - mx) / sum;
    if (j == a) add_softmax(t, mx, sum, s1, npad);  // masked keys add exp(-inf) = 0
  }
}

// s3_j = max_m softmax_over_valid_tokens(folded_m . h_j + shift_m). h: (S, D) of sample b.
// w.set_sample(P, b) must have been called.
template <typename h_t>
void bridge_score(const Problem& P, const h_t* h, float* s3, Scratch& w) {
  const int64_t S = P.S, D = P.D, M = P.M, Spad = w.Spad;
  const float* hp;
  if constexpr (std::is_same_v<h_t, float>) {
    hp = h;
  } else {
    to_float(h, w.hf.data(), S * D);
    hp = w.hf.data();
  }
  float* gate = w.gate.data();
  gemm_nt(M, S, D, P.folded, D, hp, D, gate, Spad);
  std::fill(s3, s3 + Spad, 0.f);
  for (int64_t m = 0; m < M; ++m) {
    float* g = gate + m * Spad;
    affine_mask(g, 1.f, P.shift[m], w.neg_valid.data(), Spad);
    const float mx = max1(g, Spad);
    if (mx == kNegInf) continue;  // no valid token at all
    const float sum = sum_exp(g, mx, Spad);
    max_softmax(g, mx, sum, s3, Spad);  // invalid tokens stay 0
  }
}

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

}  // namespace

template <typename qk_t, typename h_t>
void iwtd_kernel(const Problem& P, const qk_t* q, const qk_t* k, const h_t* hidden, const Outputs& out) {
  const int64_t B = P.B, H = P.H, S = P.S, Dh = P.Dh;
  const int64_t head_stride = S * Dh;
  constexpr bool float_qk = std::is_same_v<qk_t, float>;
  constexpr bool float_h = std::is_same_v<h_t, float>;

  auto finish_sample = [&](int64_t b, Scratch& w) {
    for (int64_t j = 0; j < S; ++j) {
      w.s1[j] /= static_cast<float>(H);
      w.s2[j] /= static_cast<float>(H);
    }
    bridge_score<h_t>(P, hidden + b * S * P.D, w.s3.data(), w);
    finalize(P, b, w.s1.data(), w.s2.data(), w.s3.data(), out);
  };

  if (B >= at::get_num_threads() || H == 1) {
    // Enough samples to keep every thread busy: one sample per work item.
    parallel_items(B, [&](ItemSource& items) {
      MklSingleThread single;
      Scratch w(P, float_qk, float_h);
      for (int64_t b; (b = items()) >= 0;) {
        w.set_sample(P, b);
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
  const int64_t Spad = round_up(S, kLanes);
  std::vector<float> head_s1(B * H * Spad, 0.f), head_s2(B * H * Spad, 0.f);
  parallel_items(B * H, [&](ItemSource& items) {
    MklSingleThread single;
    Scratch w(P, float_qk, /*float_h=*/true);
    for (int64_t i; (i = items()) >= 0;) {
      w.set_sample(P, i / H);
      head_stats<qk_t>(P, q + i * head_stride, k + i * head_stride, i / H, head_s1.data() + i * Spad,
                       head_s2.data() + i * Spad, w);
    }
  });
  parallel_items(B, [&](ItemSource& items) {
    MklSingleThread single;
    Scratch w(P, /*float_qk=*/true, float_h);
    for (int64_t b; (b = items()) >= 0;) {
      w.set_sample(P, b);
      std::fill(w.s1.begin(), w.s1.end(), 0.f);
      std::fill(w.s2.begin(), w.s2.end(), 0.f);
      for (int64_t h = 0; h < H; ++h) {
        const float* a1 = head_s1.data() + (b * H + h) * Spad;
        const float* a2 = head_s2.data() + (b * H + h) * Spad;
        for (int64_t j = 0; j < S; ++j) {
          w.s1[j] += a1[j];
          w.s2[j] += a2[j];
        }
      }
      finish_sample(b, w);
    }
  });
}

#define DROPLE_FAST_INSTANTIATE(QK, H) \
  template void iwtd_kernel<QK, H>(const Problem&, const QK*, const QK*, const H*, const Outputs&);
#define DROPLE_FAST_INSTANTIATE_H(QK)          \
  DROPLE_FAST_INSTANTIATE(QK, float)           \
  DROPLE_FAST_INSTANTIATE(QK, c10::BFloat16)   \
  DROPLE_FAST_INSTANTIATE(QK, c10::Half)
DROPLE_FAST_INSTANTIATE_H(float)
DROPLE_FAST_INSTANTIATE_H(c10::BFloat16)
DROPLE_FAST_INSTANTIATE_H(c10::Half)
#undef DROPLE_FAST_INSTANTIATE_H
#undef DROPLE_FAST_INSTANTIATE

}  // namespace drople_fast
