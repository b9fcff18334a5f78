// Portable 16-lane float32 vectors (GCC/Clang vector extensions) and the few
// operations the IWTD row loops need: load/store, max, fixed-order horizontal
// reductions and a vectorised exp. Header-only; no torch dependency.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

// The row loops are compiled for several instruction sets and picked at load
// time (GCC/Clang function multi-versioning), so the extension stays portable
// (baseline x86-64) yet uses AVX-512/AVX2 where the CPU has them.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(DROPLE_FAST_NO_CLONES)
#define DROPLE_FAST_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define DROPLE_FAST_CLONES
#endif

namespace drople_fast {
namespace simd {

constexpr int64_t kLanes = 16;  // floats per vector step; rows are padded to a multiple of this

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// 16 floats; one AVX-512 register, two AVX or four SSE registers. (These helpers
// are internal and always inlined, so the -Wpsabi note about passing 64-byte
// vectors without AVX-512 does not apply; GCC reports it at the end of the
// translation unit, so it is silenced for every file that includes this header.)
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

}  // namespace simd
}  // namespace drople_fast
