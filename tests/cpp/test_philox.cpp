// Known-answer tests for csrc/philox.h against drople_fast/philox.py (the
// specification, itself bit-identical to Triton's tl.rand). The table was
// generated with:
//   philox4x32(torch.tensor(seed), torch.tensor(offsets)) and uniform_from_uint32(...)
// Seed 0 / offset 0 also equals the Random123 Philox4x32-10 known-answer
// vector (key 0, counter 0 -> first word 0x6627e8d5).
#include <cinttypes>
#include <cstdint>
#include <cstdio>
#include <cstring>

#include "philox.h"

namespace {

struct Kat {
  int64_t seed;
  int64_t offset;
  uint32_t word;          // philox4x32(seed, offset)
  uint32_t uniform_bits;  // float32 bits of uniform_from_uint32(word)
};

const Kat kKat[] = {
    {0LL, 0LL, 0x6627E8D5u, 0x3F4C4FD1u},
    {0LL, 1LL, 0xF8E4CCA4u, 0x3D63666Au},
    {0LL, 2LL, 0x04FAA329u, 0x3D1F5464u},
    {0LL, 196LL, 0xCB0ABB6Eu, 0x3ED3D511u},
    {0LL, 1000LL, 0x0AADDB88u, 0x3DAADDB7u},
    {0LL, 2147483648LL, 0xBF9C529Bu, 0x3F00C75Au},
    {0LL, 4294967301LL, 0xAC2FBCCAu, 0x3F27A085u},
    {0LL, 1099511627899LL, 0x758BEECBu, 0x3F6B17DDu},
    {1LL, 0LL, 0xE3E80670u, 0x3E60BFCBu},
    {1LL, 1LL, 0xAC08141Bu, 0x3F27EFD7u},
    {1LL, 2LL, 0x3F55B3F0u, 0x3EFD56CFu},
    {1LL, 196LL, 0xDE906094u, 0x3E85BE7Du},
    {1LL, 1000LL, 0x2E6B4A7Du, 0x3EB9AD29u},
    {1LL, 2147483648LL, 0xACBF06DBu, 0x3F2681F1u},
    {1LL, 4294967301LL, 0xC17B6722u, 0x3EFA1262u},
    {1LL, 1099511627899LL, 0xA921294Bu, 0x3F2DBDACu},
    {42LL, 0LL, 0x9CEAF053u, 0x3F462A1Eu},
    {42LL, 1LL, 0xFCDB2127u, 0x3CC937B5u},
    {42LL, 2LL, 0xD36C0225u, 0x3EB24FF6u},
    {42LL, 196LL, 0x0B7702B9u, 0x3DB7702Bu},
    {42LL, 1000LL, 0xC7F39578u, 0x3EE031A9u},
    {42LL, 2147483648LL, 0x2BF9E5DBu, 0x3EAFE796u},
    {42LL, 4294967301LL, 0x131A8A04u, 0x3E18D44Fu},
    {42LL, 1099511627899LL, 0xBB675DE9u, 0x3F093143u},
    {4294967303LL, 0LL, 0x59C2C148u, 0x3F338582u},
    {4294967303LL, 1LL, 0x0DE2D9B0u, 0x3DDE2D9Au},
    {4294967303LL, 2LL, 0xFAF077E2u, 0x3D21F103u},
    {4294967303LL, 196LL, 0x346C7A12u, 0x3ED1B1E7u},
    {4294967303LL, 1000LL, 0xA4EDF3BDu, 0x3F362418u},
    {4294967303LL, 2147483648LL, 0x80EB5DACu, 0x3F7E2944u},
    {4294967303LL, 4294967301LL, 0x562B8959u, 0x3F2C5712u},
    {4294967303LL, 1099511627899LL, 0xD7997629u, 0x3EA19A26u},
    {-1LL, 0LL, 0x72A47709u, 0x3F6548EDu},
    {-1LL, 1LL, 0x19FED511u, 0x3E4FF6A8u},
    {-1LL, 2LL, 0x17625282u, 0x3E3B1293u},
    {-1LL, 196LL, 0x676F83B7u, 0x3F4EDF06u},
    {-1LL, 1000LL, 0xE1B10477u, 0x3E7277DBu},
    {-1LL, 2147483648LL, 0xBF47D986u, 0x3F01704Cu},
    {-1LL, 4294967301LL, 0x1236F804u, 0x3E11B7BFu},
    {-1LL, 1099511627899LL, 0xDF9E7510u, 0x3E81862Bu},
    {1311768467463790320LL, 0LL, 0x092C9B44u, 0x3D92C9B3u},
    {1311768467463790320LL, 1LL, 0x389D999Au, 0x3EE27665u},
    {1311768467463790320LL, 2LL, 0x85099817u, 0x3F75ECCFu},
    {1311768467463790320LL, 196LL, 0xC97BF625u, 0x3EDA1026u},
    {1311768467463790320LL, 1000LL, 0x7B69A4D7u, 0x3F76D349u},
    {1311768467463790320LL, 2147483648LL, 0x18832415u, 0x3E441920u},
    {1311768467463790320LL, 4294967301LL, 0x092CECB1u, 0x3D92CECAu},
    {1311768467463790320LL, 1099511627899LL, 0xA7832E99u, 0x3F30F9A2u},
    {INT64_MIN, 0LL, 0xA41C1BE6u, 0x3F37C7C7u},
    {INT64_MIN, 1LL, 0xE29B9F84u, 0x3E6B2303u},
    {INT64_MIN, 2LL, 0x8FB60D6Fu, 0x3F6093E4u},
    {INT64_MIN, 196LL, 0x4E2AC1CEu, 0x3F1C5583u},
    {INT64_MIN, 1000LL, 0xF9319260u, 0x3D59CDB3u},
    {INT64_MIN, 2147483648LL, 0x5F4856A7u, 0x3F3E90ACu},
    {INT64_MIN, 4294967301LL, 0x9069C376u, 0x3F5F2C78u},
    {INT64_MIN, 1099511627899LL, 0x26D89C75u, 0x3E9B6271u},
};

uint32_t bits_of(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof(b));
  return b;
}

int failures = 0;

#define EXPECT_EQ_U32(got, want, what)                                                                     \
  do {                                                                                                      \
    const uint32_t g_ = (got), w_ = (want);                                                                 \
    if (g_ != w_) {                                                                                         \
      std::fprintf(stderr, "FAIL %s: got 0x%08X want 0x%08X\n", what, g_, w_);                            \
      ++failures;                                                                                           \
    }                                                                                                       \
  } while (0)

}  // namespace

int main() {
  using namespace drople_fast::philox;
  char what[160];
  for (const Kat& kat : kKat) {
    std::snprintf(what, sizeof(what), "seed=%" PRId64 " offset=%" PRId64, kat.seed, kat.offset);
    EXPECT_EQ_U32(philox4x32_c0(static_cast<uint64_t>(kat.seed), static_cast<uint64_t>(kat.offset)), kat.word, what);
    EXPECT_EQ_U32(bits_of(uniform_from_uint32(kat.word)), kat.uniform_bits, what);
    EXPECT_EQ_U32(bits_of(token_uniform(kat.seed, kat.offset)), kat.uniform_bits, what);
  }
  // uint_to_uniform_float edge cases (from drople_fast/philox.py::uniform_from_uint32).
  const uint32_t edges[][2] = {{0x0u, 0x0u},          {0x1u, 0x2FFFFFFFu},        {0x7FFFFFFFu, 0x3F7FFFFFu},
                               {0x80000000u, 0x3F7FFFFFu}, {0xFFFFFFFFu, 0x0u}, {0x80000001u, 0x3F7FFFFFu},
                               {0x3039u, 0x36C0E3FFu}};
  for (const auto& e : edges) {
    std::snprintf(what, sizeof(what), "uniform_from_uint32(0x%08X)", e[0]);
    EXPECT_EQ_U32(bits_of(uniform_from_uint32(e[0])), e[1], what);
  }
  // Every uniform is in [0, 1).
  for (uint64_t off = 0; off < 100000; ++off) {
    const float u = token_uniform(7, static_cast<int64_t>(off));
    if (!(u >= 0.f && u < 1.f)) {
      std::fprintf(stderr, "FAIL uniform out of [0,1): %g at offset %" PRIu64 "\n", u, off);
      ++failures;
      break;
    }
  }
  EXPECT_EQ_U32(umulhi(0xFFFFFFFFu, 0xFFFFFFFFu), 0xFFFFFFFEu, "umulhi(max, max)");
  EXPECT_EQ_U32(umulhi(kRoundA, 0x12345678u),
                static_cast<uint32_t>((0xD2511F53ull * 0x12345678ull) >> 32), "umulhi(kRoundA, x)");
  if (failures) {
    std::fprintf(stderr, "%d philox check(s) failed\n", failures);
    return 1;
  }
  std::printf("philox: %zu known answers ok\n", sizeof(kKat) / sizeof(kKat[0]));
  return 0;
}
