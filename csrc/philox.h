// Philox4x32-10 counter-based RNG, bit-identical to Triton's tl.rand and to
// drople_fast/philox.py (the specification).
//
//   key     = (seed & 0xffffffff, (seed >> 32) & 0xffffffff)
//   counter = (offset_lo, offset_hi, 0, 0)
//   output  = word c0 after 10 rounds
//   uniform = Triton's uint_to_uniform_float(c0) in [0, 1)
//
// Header-only, no torch dependency, so the C++ unit tests can use it alone.
#pragma once

#include <cstdint>

namespace drople_fast {
namespace philox {

constexpr uint32_t kKeyA = 0x9E3779B9u;
constexpr uint32_t kKeyB = 0xBB67AE85u;
constexpr uint32_t kRoundA = 0xD2511F53u;
constexpr uint32_t kRoundB = 0xCD9E8D57u;
constexpr int kRounds = 10;

// High 32 bits of a 32x32-bit product (CUDA's __umulhi).
inline uint32_t umulhi(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

// The four output words of Philox4x32-10 for key `seed` and counter (offset, 0)
// (Triton's randint4x).
struct Words {
  uint32_t c0, c1, c2, c3;
};

inline Words philox4x32(uint64_t seed, uint64_t offset) {
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
  uint32_t c0 = static_cast<uint32_t>(offset);
  uint32_t c1 = static_cast<uint32_t>(offset >> 32);
  uint32_t c2 = 0;
  uint32_t c3 = 0;
  for (int r = 0; r < kRounds; ++r) {
    const uint32_t lo_b = kRoundB * c2;  // unsigned arithmetic wraps mod 2^32
    const uint32_t hi_b = umulhi(kRoundB, c2);
    const uint32_t lo_a = kRoundA * c0;
    const uint32_t hi_a = umulhi(kRoundA, c0);
    const uint32_t n0 = hi_b ^ c1 ^ k0;
    const uint32_t n2 = hi_a ^ c3 ^ k1;
    c0 = n0;
    c1 = lo_b;
    c2 = n2;
    c3 = lo_a;
    k0 += kKeyA;
    k1 += kKeyB;
  }
  return {c0, c1, c2, c3};
}

// First output word of Philox4x32-10 for key `seed` and counter (offset, 0).
inline uint32_t philox4x32_c0(uint64_t seed, uint64_t offset) { return philox4x32(seed, offset).c0; }

// Triton's uint_to_uniform_float: reinterpret as int32, fold negatives with
// x -> -x - 1, scale by the largest float s with (2^31 - 1) * s < 1.
inline float uniform_from_uint32(uint32_t x) {
  int32_t s = static_cast<int32_t>(x);
  if (s < 0) s = ~s;  // == -s - 1, written without the signed overflow of -INT32_MIN
  // Rounded from the double literal exactly as torch.tensor(4.6566127342e-10, float32) does.
  const float scale = static_cast<float>(4.6566127342e-10);
  return static_cast<float>(s) * scale;
}

// The uniform draw of token j of sample b: offset b * S + j.
inline float token_uniform(int64_t seed, int64_t offset) {
  return uniform_from_uint32(philox4x32_c0(static_cast<uint64_t>(seed), static_cast<uint64_t>(offset)));
}

}  // namespace philox
}  // namespace drople_fast
