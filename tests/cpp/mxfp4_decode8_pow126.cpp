// Host check of mxfp4_decode8_pow126_bf16 (common/moe_math.h), the bit placement behind the CUDA
// decode GEMV's shift decode: every nibble in every position of 2^20 words (all-equal and mixed
// patterns included) must give bf16 bits of exactly FP4_VALUES[nibble] * 2^-126 (sign of -0 kept),
// and times 2^(min(s, 128) - 1) * 2^(max(s, 128) - 128) (the kernel's factors) the MXFP4 value at
// every scale byte s. The factors are powers of two, so the double products are exact. Run by
// tests/test_moe.py; exits 1 on a mismatch.
#include <algorithm>
#include <cmath>
#include <cstdio>

#include "common/moe_math.h"

namespace {

double bf16_value(uint32_t h) {
  const uint32_t e = (h >> 7) & 0xFFu, m = h & 0x7Fu;
  double v = e == 0 ? std::ldexp(m / 128.0, -126) : std::ldexp(1.0 + m / 128.0, static_cast<int>(e) - 127);
  if (e == 0xFFu) v = m != 0 ? NAN : INFINITY;
  return (h >> 15) ? -v : v;
}

}  // namespace

int main() {
  const double fp4[16] = {0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6};
  const uint32_t fixed[] = {0u, 0xFFFFFFFFu, 0x76543210u, 0xFEDCBA98u, 0x89ABCDEFu, 0x01234567u, 0x88888888u};
  long bad = 0;
  for (uint32_t t = 0; t < (1u << 20); ++t) {
    const uint32_t w = t < 7 ? fixed[t] : (t * 2654435761u) ^ (t << 13);
    uint32_t out[4];
    gptoss::mxfp4_decode8_pow126_bf16(w, out);
    for (int j = 0; j < 4; ++j) {
      for (int h = 0; h < 2; ++h) {
        const uint32_t nib = (w >> (4 * (j + 4 * h))) & 15u;
        const double got = bf16_value((out[j] >> (16 * h)) & 0xFFFFu), want = std::ldexp(fp4[nib], -126);
        if (got != want || std::signbit(got) != std::signbit(want)) {
          if (bad++ < 5) std::printf("w=%08x pair %d half %d: %g, expected %g\n", w, j, h, got, want);
        }
        for (uint32_t s = t % 97 == 0 ? 0u : 128u; s < 256u; s += t % 97 == 0 ? 1u : 127u) {
          const double f1 = std::ldexp(1.0, static_cast<int>(std::min(s, 128u)) - 1);
          const double f2 = std::ldexp(1.0, static_cast<int>(std::max(s, 128u)) - 128);
          const double v = got * f1 * f2, ref = std::ldexp(fp4[nib], static_cast<int>(s) - 127);
          if (v != ref) {
            if (bad++ < 5) std::printf("nibble %u, scale %u: %g, expected %g\n", nib, s, v, ref);
          }
        }
      }
    }
  }
  std::printf("mismatches: %ld\n", bad);
  return bad != 0 ? 1 : 0;
}
