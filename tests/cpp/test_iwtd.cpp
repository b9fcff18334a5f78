// Invariants of the fused CPU IWTD operator (csrc/iwtd_cpu.cpp, csrc/iwtd_kernel.cpp). The exact
// comparison with the PyTorch reference lives in tests/test_cpp_backend.py;
// these checks need only libtorch and run under ctest.
#include <cmath>
#include <cstdio>
#include <functional>
#include <string>
#include <tuple>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include "iwtd_cpu.h"
#include "philox.h"

namespace {

int failures = 0;

#define EXPECT(cond, ...)                                             \
  do {                                                               \
    if (!(cond)) {                                                   \
      std::fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                             \
      std::fprintf(stderr, "\n");                                    \
      ++failures;                                                    \
    }                                                                \
  } while (0)

using Result = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

struct Inputs {
  at::Tensor q, k, hidden, eligible, valid, anchor, folded, shift, seed;
  bool causal = false;
  double p_min = 0.1, p_max = 0.5;

  Result run() const {
    return drople_fast::iwtd_cpu(q, k, hidden, eligible, valid, anchor, folded, shift, causal, p_min, p_max, seed);
  }
};

Inputs make_inputs(int64_t B, int64_t H, int64_t S, int64_t Dh, int64_t D, int64_t M, bool causal, bool eos_anchor,
                   int64_t seed) {
  at::manual_seed(1234 + B * 100 + S);
  Inputs in;
  in.q = at::randn({B, H, S, Dh}) * 1.5;
  in.k = at::randn({B, H, S, Dh}) * 1.5;
  in.hidden = at::randn({B, S, D});
  at::Tensor lengths = at::randint(2, S + 1, {B}, at::kLong);
  lengths[0] = S;
  in.valid = at::arange(S, at::kLong).unsqueeze(0) < lengths.unsqueeze(1);
  in.eligible = (at::rand({B, S}) < 0.8) & in.valid;
  in.anchor = eos_anchor ? (lengths - 1).contiguous() : at::zeros({B}, at::kLong);
  in.folded = at::randn({M, D}) * 0.3;
  in.shift = at::randn({M}) * 0.1;
  in.seed = at::full({1}, seed, at::kLong);
  in.causal = causal;
  return in;
}

bool same(const Result& a, const Result& b) {
  return at::equal(std::get<0>(a), std::get<0>(b)) && at::equal(std::get<1>(a), std::get<1>(b)) &&
         at::equal(std::get<2>(a), std::get<2>(b)) && at::equal(std::get<3>(a), std::get<3>(b)) &&
         at::equal(std::get<4>(a), std::get<4>(b));
}

// Structural invariants that hold for any input.
void check_invariants(const Inputs& in, const Result& r, const std::string& name) {
  const auto& [importance, drop_prob, drop_mask, keep_count, keep_order] = r;
  const int64_t B = in.q.size(0), S = in.q.size(2);
  const int64_t seed = in.seed.item<int64_t>();
  EXPECT(importance.scalar_type() == at::kFloat && drop_prob.scalar_type() == at::kFloat, "%s dtypes", name.c_str());
  EXPECT(drop_mask.scalar_type() == at::kBool && keep_count.scalar_type() == at::kLong &&
            keep_order.scalar_type() == at::kLong,
        "%s dtypes", name.c_str());
  auto imp = importance.accessor<float, 2>();
  auto prob = drop_prob.accessor<float, 2>();
  auto mask = drop_mask.accessor<bool, 2>();
  auto order = keep_order.accessor<int64_t, 2>();
  auto valid = in.valid.accessor<bool, 2>();
  auto elig = in.eligible.accessor<bool, 2>();
  auto anchor = in.anchor.accessor<int64_t, 1>();
  for (int64_t b = 0; b < B; ++b) {
    int64_t kept = 0;
    double imp_sum = 0.0;
    for (int64_t j = 0; j < S; ++j) {
      const bool content = valid[b][j] && j != anchor[b];
      const bool e = content && elig[b][j];
      if (!content) EXPECT(imp[b][j] == 0.f, "%s importance outside C b=%ld j=%ld", name.c_str(), (long)b, (long)j);
      EXPECT(imp[b][j] >= 0.f, "%s importance >= 0", name.c_str());
      imp_sum += imp[b][j];
      if (e) {
        EXPECT(prob[b][j] >= in.p_min - 1e-6 && prob[b][j] <= in.p_max + 1e-6, "%s p=%g outside [p_min, p_max]",
              name.c_str(), prob[b][j]);
        const float u = drople_fast::philox::token_uniform(seed, b * S + j);
        EXPECT(mask[b][j] == (u < prob[b][j]), "%s mask is not the Philox draw at b=%ld j=%ld", name.c_str(), (long)b,
              (long)j);
      } else {
        EXPECT(prob[b][j] == 0.f && !mask[b][j], "%s drop outside E at b=%ld j=%ld", name.c_str(), (long)b, (long)j);
      }
      if (valid[b][j] && !mask[b][j]) {
        EXPECT(order[b][kept] == j, "%s keep_order[%ld][%ld]=%ld want %ld", name.c_str(), (long)b, (long)kept,
              (long)order[b][kept], (long)j);
        ++kept;
      }
    }
    for (int64_t i = kept; i < S; ++i) EXPECT(order[b][i] == -1, "%s keep_order padding", name.c_str());
    EXPECT(keep_count[b].item<int64_t>() == kept, "%s keep_count", name.c_str());
    // Each score is normalised to sum 1 over C, so their mean does too -- unless
    // a score is zero on all of C (causal rows with no other content key).
    int64_t n_content = 0;
    for (int64_t j = 0; j < S; ++j) n_content += valid[b][j] && j != anchor[b];
    if (!in.causal && n_content >= 2) {
      EXPECT(std::abs(imp_sum - 1.0) < 1e-4, "%s sum of importance over C = %g", name.c_str(), imp_sum);
    } else {
      EXPECT(imp_sum < 1.0 + 1e-4, "%s sum of importance over C = %g", name.c_str(), imp_sum);
    }
  }
}

void test_random_cases() {
  for (bool causal : {false, true}) {
    for (bool eos : {false, true}) {
      for (auto shape : {std::make_tuple(1, 1, 2), std::make_tuple(3, 2, 13), std::make_tuple(5, 3, 37)}) {
        const auto [B, H, S] = shape;
        Inputs in = make_inputs(B, H, S, 8, 12, 5, causal, eos, 7 + S);
        const std::string name = "random B=" + std::to_string(B) + " H=" + std::to_string(H) + " S=" +
                                 std::to_string(S) + (causal ? " causal" : "") + (eos ? " eos" : "");
        const Result r = in.run();
        check_invariants(in, r, name);
        EXPECT(same(r, in.run()), "%s is not deterministic", name.c_str());
      }
    }
  }
}

void test_thread_count_invariance() {
  Inputs in = make_inputs(3, 4, 29, 16, 20, 6, false, false, 11);
  const int saved = at::get_num_threads();
  at::set_num_threads(1);
  const Result one = in.run();  // per-sample path
  at::set_num_threads(8);
  const Result many = in.run();  // per-(sample, head) path (B < threads)
  at::set_num_threads(saved);
  EXPECT(same(one, many), "results depend on the number of threads");
}

void test_bf16_matches_rounded_fp32() {
  Inputs in = make_inputs(2, 3, 17, 8, 12, 4, true, true, 5);
  Inputs low = in;
  low.q = in.q.to(at::kBFloat16);
  low.k = in.k.to(at::kBFloat16);
  low.hidden = in.hidden.to(at::kBFloat16);
  Inputs rounded = in;
  rounded.q = low.q.to(at::kFloat);
  rounded.k = low.k.to(at::kFloat);
  rounded.hidden = low.hidden.to(at::kFloat);
  EXPECT(same(low.run(), rounded.run()), "bf16 differs from fp32 on the same rounded values");
}

void test_all_equal_scores() {
  Inputs in = make_inputs(2, 2, 9, 8, 12, 3, false, false, 3);
  in.q.zero_();
  in.k.zero_();
  in.hidden.zero_();
  in.shift.zero_();
  const Result r = in.run();
  check_invariants(in, r, "all-equal");
  const at::Tensor e = in.eligible & (at::arange(9, at::kLong).unsqueeze(0) != in.anchor.unsqueeze(1)) & in.valid;
  const at::Tensor p = std::get<1>(r);
  EXPECT(at::equal(p.masked_select(e), at::full({e.sum().item<int64_t>()}, static_cast<float>(in.p_max))),
        "zero range must give p = p_max on E");
}

void test_all_ineligible() {
  Inputs in = make_inputs(2, 2, 9, 8, 12, 3, false, false, 3);
  in.eligible.zero_();
  const Result r = in.run();
  check_invariants(in, r, "all-ineligible");
  EXPECT(!std::get<2>(r).any().item<bool>(), "nothing may drop");
  EXPECT(at::equal(std::get<3>(r), in.valid.sum(1)), "every valid token is kept");
}

void test_dispatcher_and_errors() {
  Inputs in = make_inputs(2, 2, 9, 8, 12, 3, true, true, 9);
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("drople_fast::iwtd_cpu", "")
                .typed<Result(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, bool,
                              double, double, const at::Tensor&, int64_t)>();
  const Result via_op = op.call(in.q, in.k, in.hidden, in.eligible, in.valid, in.anchor, in.folded, in.shift,
                                in.causal, in.p_min, in.p_max, in.seed, /*row_stride=*/0);
  EXPECT(same(via_op, in.run()), "dispatcher call differs from the direct call");

  auto expect_error = [](const char* what, const std::function<void()>& fn, const char* needle) {
    try {
      fn();
      EXPECT(false, "%s: no error raised", what);
    } catch (const c10::Error& err) {
      EXPECT(std::string(err.what()).find(needle) != std::string::npos, "%s: unexpected message: %s", what,
            err.what());
    }
  };
  expect_error("int eligible", [&] { Inputs bad = in; bad.eligible = in.eligible.to(at::kInt); bad.run(); },
               "eligible must be bool");
  expect_error("transposed q", [&] { Inputs bad = in; bad.q = in.q.transpose(2, 3).contiguous().transpose(2, 3); bad.run(); },
               "q must be contiguous");
  expect_error("anchor range", [&] { Inputs bad = in; bad.anchor = in.anchor.clone().fill_(9); bad.run(); },
               "outside [0, 9)");
  expect_error("double q", [&] { Inputs bad = in; bad.q = in.q.to(at::kDouble); bad.k = in.k.to(at::kDouble); bad.run(); },
               "q must be float32, bfloat16 or float16");
  expect_error("folded width", [&] { Inputs bad = in; bad.folded = at::zeros({3, 5}); bad.run(); },
               "folded must have shape (M, D) = [3, 12], got [3, 5]");
}

}  // namespace

int main() {
  test_random_cases();
  test_thread_count_invariance();
  test_bf16_matches_rounded_fp32();
  test_all_equal_scores();
  test_all_ineligible();
  test_dispatcher_and_errors();
  if (failures) {
    std::fprintf(stderr, "%d iwtd check(s) failed\n", failures);
    return 1;
  }
  std::printf("iwtd: all invariants hold\n");
  return 0;
}
