// Fused IWTD forward on the CPU (DESIGN.md §1 steps 1-7, §3).
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
#include "iwtd_cpu.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <exception>
#include <limits>
#include <memory>
#include <mutex>
#include <type_traits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "philox.h"

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

constexpr float kEps = 1e-8f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kPosInf = std::numeric_limits<float>::infinity();
constexpr int64_t kLanes = 16;  // floats per vector step; rows are padded to a multiple of this

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

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

// The row loops are compiled for several instruction sets and picked at load
// time (GCC/Clang function multi-versioning), so the extension stays portable
// (baseline x86-64) yet uses AVX-512/AVX2 where the CPU has them.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(DROPLE_FAST_NO_CLONES)
#define DROPLE_FAST_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define DROPLE_FAST_CLONES
#endif

// 16 floats; one AVX-512 register, two AVX or four SSE registers. (These helpers
// are internal and always inlined, so the -Wpsabi note about passing 64-byte
// vectors without AVX-512 does not apply; GCC reports it at the end of the
// translation unit, so it is silenced for the whole file.)
#pragma GCC diagnostic ignored "-Wpsabi"
typedef float vecf __attribute__((vector_size(64)));
typedef int32_t veci __attribute__((vector_size(64)));

inline __attribute__((always_inline)) vecf loadv(const float* p) {
  vecf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline __attribute__((always_inline)) void storev(float* p, vecf v) { std::memcpy(p, &v, sizeof(v)); }

inline __attribute__((always_inline)) vecf splat(float x) { return vecf{} + x; }

inline __attribute__((always_inline)) vecf vmax(vecf a, vecf b) { return a > b ? a : b; }

inline __attribute__((always_inline)) float hmax(vecf v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = std::max(m, v[i]);
  return m;
}

inline __attribute__((always_inline)) float hsum(vecf v) {  // fixed pairwise order
  float s[kLanes];
  std::memcpy(s, &v, sizeof(s));
  for (int w = kLanes / 2; w >= 1; w /= 2) {
    for (int i = 0; i < w; ++i) s[i] += s[i + w];
  }
  return s[0];
}

// exp(x) for x <= 0 (and up to 88), float32, about 1 ulp (Cephes expf: Cody-Waite
// reduction by ln 2, degree-5 minimax polynomial). Results below 2^-126 (x < -87.34,
// including -inf) flush to 0; the softmax sums they enter are >= 1.
inline __attribute__((always_inline)) vecf vexp(vecf x) {
  const vecf lo = splat(-87.33654475f), hi = splat(88.0f);
  vecf xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const vecf magic = splat(12582912.0f);  // 1.5 * 2^23: round to nearest integer
  const vecf kf = (xc * splat(1.44269504088896341f) + magic) - magic;
  vecf r = xc - kf * splat(0.693359375f);
  r = r - kf * splat(-2.12194440e-4f);
  const vecf z = r * r;
  vecf p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * z + r + splat(1.0f);
  const veci n = __builtin_convertvector(kf, veci);
  const vecf pow2n = (vecf)((n + 127) << 23);
  const vecf y = p * pow2n;
  return x < lo ? splat(0.f) : y;
}

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
// Work distribution. at::parallel_for cannot be used here: with torch's OpenMP
// backend it is a header-only `#pragma omp parallel`, which this extension
// (built without -fopenmp, so as not to load a second OpenMP runtime) compiles
// as a plain serial loop. Instead the caller and up to get_num_threads() - 1
// helpers from torch's inter-op pool (at::launch) pull work items from one
// atomic counter. The caller drains the queue itself if no helper ever starts,
// so it never waits on a queued task, only on helpers already running items.
// Each item is computed the same way whoever runs it, so results do not
// depend on the thread count.

// Hands out item indices in [0, n); -1 when none are left.
class ItemSource {
 public:
  ItemSource(std::atomic<int64_t>* next, int64_t n) : next_(next), n_(n) {}
  int64_t operator()() {
    const int64_t i = next_->fetch_add(1, std::memory_order_relaxed);
    return i < n_ ? i : -1;
  }

 private:
  std::atomic<int64_t>* next_;
  int64_t n_;
};

struct ItemQueue {
  std::atomic<int64_t> next{0};
  int64_t n = 0;
  std::mutex mu;
  std::condition_variable cv;
  bool closed = false;  // the caller has drained the queue: late helpers must not start
  int active = 0;       // helpers inside `participant`
  std::exception_ptr error;
};

// Runs participant(items) on the calling thread and on up to
// min(at::get_num_threads(), n) - 1 pool threads; every participant pulls
// item indices from `items` until it returns -1. Each participant typically
// sets up its own scratch once, then loops over the items it gets.
template <typename Participant>
void parallel_items(int64_t n, const Participant& participant) {
  if (n <= 0) return;
  const int64_t threads = at::in_parallel_region() ? 1 : std::min<int64_t>(at::get_num_threads(), n);
  if (threads <= 1) {
    std::atomic<int64_t> next{0};
    ItemSource items(&next, n);
    participant(items);
    return;
  }
  auto queue = std::make_shared<ItemQueue>();
  queue->n = n;
  for (int64_t t = 1; t < threads; ++t) {
    at::launch([queue, &participant] {
      {
        std::lock_guard<std::mutex> lock(queue->mu);
        if (queue->closed) return;  // the caller is done (and `participant` may be gone)
        ++queue->active;
      }
      try {
        ItemSource items(&queue->next, queue->n);
        participant(items);
      } catch (...) {
        std::lock_guard<std::mutex> lock(queue->mu);
        if (!queue->error) queue->error = std::current_exception();
        queue->next.store(queue->n);  // stop handing out items
      }
      std::lock_guard<std::mutex> lock(queue->mu);
      if (--queue->active == 0) queue->cv.notify_all();
    });
  }
  std::exception_ptr caller_error;
  try {
    ItemSource items(&queue->next, n);
    participant(items);
  } catch (...) {
    caller_error = std::current_exception();
    queue->next.store(n);
  }
  std::unique_lock<std::mutex> lock(queue->mu);
  queue->closed = true;
  queue->cv.wait(lock, [&] { return queue->active == 0; });
  if (caller_error) std::rethrow_exception(caller_error);
  if (queue->error) std::rethrow_exception(queue->error);
}

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
