// fp16 / bf16 conversions: kernels/half.h against exhaustive and nearest-value references, and the
// vectorised cpu::to_f32 / from_f32 against the scalar ones.
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "kernels/cpu/convert.h"
#include "kernels/half.h"
#include "tests/kernels/kernel_test_util.h"

namespace fineserve {
namespace {

bool half_is_nan(uint16_t h) { return (h & 0x7c00u) == 0x7c00u && (h & 0x3ffu) != 0; }

// Exact value of a half bit pattern in double, from its fields (independent of half_to_float).
double half_value(uint16_t h) {
  const int e = (h >> 10) & 0x1f, m = h & 0x3ff;
  const double mag = e == 0 ? std::ldexp(m, -24) : std::ldexp(1024 + m, e - 25);
  return (h & 0x8000u) ? -mag : mag;
}

TEST(Half, AllPatternsRoundTrip) {
  for (uint32_t i = 0; i < 65536; ++i) {
    const auto h = static_cast<uint16_t>(i);
    const float f = half_to_float(h);
    if (half_is_nan(h)) {
      EXPECT_TRUE(std::isnan(f)) << i;
      EXPECT_TRUE(half_is_nan(float_to_half(f))) << i;
      EXPECT_EQ(float_to_half(f) & 0x8000u, h & 0x8000u) << i;
      continue;
    }
    if ((h & 0x7fffu) == 0x7c00u) {
      EXPECT_TRUE(std::isinf(f)) << i;
    } else {
      EXPECT_EQ(static_cast<double>(f), half_value(h)) << i;
    }
    EXPECT_EQ(float_to_half(f), h) << i;
  }
}

// The correctly rounded half of f (nearest, ties to even mantissa), by search over all finite halves.
uint16_t nearest_half(float f) {
  static const std::vector<uint16_t> positives = [] {
    std::vector<uint16_t> v;
    for (uint16_t h = 0; h < 0x7c00u; ++h) v.push_back(h);  // ascending values
    return v;
  }();
  if (std::isnan(f)) return 0x7e00;
  const uint16_t sign = std::signbit(f) ? 0x8000u : 0u;
  const double a = std::fabs(static_cast<double>(f));
  // 65520 is halfway between 65504 (odd mantissa) and 2^16: the tie and beyond go to infinity.
  if (a >= 65520.0) return sign | 0x7c00u;
  auto it = std::lower_bound(positives.begin(), positives.end(), a,
                             [](uint16_t h, double v) { return half_value(h) < v; });
  if (it == positives.end()) return sign | 0x7bffu;  // between 65504 and the tie: the largest half
  uint16_t hi = *it;
  if (half_value(hi) == a || it == positives.begin()) return sign | hi;
  uint16_t lo = *(it - 1);
  const double dlo = a - half_value(lo), dhi = half_value(hi) - a;
  if (dlo < dhi) return sign | lo;
  if (dhi < dlo) return sign | hi;
  return sign | ((lo & 1u) ? hi : lo);
}

uint16_t nearest_bf16(float f) {
  const uint32_t x = std::bit_cast<uint32_t>(f);
  if (std::isnan(f)) return 0x7fc0;
  const uint32_t lo = x & 0xffff0000u, hi = lo + 0x10000u;
  const double v = std::fabs(static_cast<double>(f));
  const double vlo = std::fabs(static_cast<double>(std::bit_cast<float>(lo)));
  // The next bf16 up in magnitude; past the largest finite one it is 2^128 (rounding gives inf).
  const double vhi = (hi & 0x7fffffffu) == 0x7f800000u ? std::ldexp(1.0, 128)
                                                        : std::fabs(static_cast<double>(std::bit_cast<float>(hi)));
  if (v - vlo < vhi - v) return static_cast<uint16_t>(lo >> 16);
  if (vhi - v < v - vlo) return static_cast<uint16_t>(hi >> 16);
  return static_cast<uint16_t>(((lo >> 16) & 1u) ? hi >> 16 : lo >> 16);
}

std::vector<float> tricky_floats() {
  std::vector<float> v = {0.0f, -0.0f, 1.0f, -1.0f, 65504.0f, 65519.99f, 65520.0f, -65520.0f, 65536.0f, 1e10f,
                          std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
                          std::numeric_limits<float>::max(), std::numeric_limits<float>::denorm_min(),
                          std::numeric_limits<float>::min(), 3.4028235e38f};
  // Exact ties and near-ties around half's subnormal and normal spacing.
  for (int e = -26; e <= 16; ++e) {
    for (int k = 0; k < 8; ++k) {
      const double base = std::ldexp(1.0 + k / 8.0, e);
      for (double frac : {0.5, 1.5, 2.5}) {
        // half spacing at this magnitude: 2^-24 below 2^-14, else 2^(e-10)
        const double ulp = e < -14 ? std::ldexp(1.0, -24) : std::ldexp(1.0, e - 10);
        const float t = static_cast<float>(base + frac * ulp);
        v.push_back(t);
        v.push_back(std::nextafter(t, 0.0f));
        v.push_back(std::nextafter(t, 1e30f));
        v.push_back(-t);
      }
    }
  }
  return v;
}

TEST(Half, FloatToHalfMatchesNearest) {
  for (float f : tricky_floats()) {
    const uint16_t got = float_to_half(f), want = nearest_half(f);
    EXPECT_EQ(got, want) << "f=" << f << " bits=" << std::hex << std::bit_cast<uint32_t>(f);
  }
  // A strided sweep over all float bit patterns (both signs, every exponent).
  for (uint64_t bits = 0; bits < (uint64_t{1} << 32); bits += 40009) {
    const float f = std::bit_cast<float>(static_cast<uint32_t>(bits));
    const uint16_t got = float_to_half(f), want = nearest_half(f);
    if (std::isnan(f)) {
      EXPECT_TRUE(half_is_nan(got)) << bits;
    } else {
      ASSERT_EQ(got, want) << "bits=" << std::hex << bits;
    }
  }
}

TEST(Half, FloatToBf16MatchesNearest) {
  for (float f : tricky_floats()) EXPECT_EQ(float_to_bf16(f), nearest_bf16(f)) << f;
  for (uint64_t bits = 0; bits < (uint64_t{1} << 32); bits += 30011) {
    const float f = std::bit_cast<float>(static_cast<uint32_t>(bits));
    const uint16_t got = float_to_bf16(f);
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(bf16_to_float(got))) << bits;
    } else {
      ASSERT_EQ(got, nearest_bf16(f)) << "bits=" << std::hex << bits;
    }
  }
  // Ties: exactly halfway between two bf16 values go to the even one.
  EXPECT_EQ(float_to_bf16(std::bit_cast<float>(0x3f808000u)), 0x3f80);  // 1 + 2^-8: even below
  EXPECT_EQ(float_to_bf16(std::bit_cast<float>(0x3f818000u)), 0x3f82);  // odd below: round up
  EXPECT_EQ(float_to_bf16(std::bit_cast<float>(0x7f7fffffu)), 0x7f80);  // FLT_MAX rounds to inf
}

TEST(Convert, VectorisedMatchesScalar) {
  for (int64_t n : {0, 1, 7, 8, 9, 31, 1000, 4099}) {
    std::vector<float> src = testing::random_floats(static_cast<size_t>(n), 11 + static_cast<uint32_t>(n), -70000.0f, 70000.0f);
    const std::vector<float> tricky = tricky_floats();
    for (size_t i = 0; i < src.size(); i += 3) src[i] = tricky[i % tricky.size()];
    if (n > 2) src[1] = std::numeric_limits<float>::quiet_NaN();
    for (DType t : {DType::F16, DType::BF16}) {
      std::vector<uint16_t> got(static_cast<size_t>(n) + 1, 0xdead);  // +1: no write past n
      cpu::from_f32(src.data(), n, t, got.data());
      EXPECT_EQ(got[static_cast<size_t>(n)], 0xdead);
      for (int64_t i = 0; i < n; ++i) {
        const uint16_t want = t == DType::F16 ? float_to_half(src[static_cast<size_t>(i)]) : float_to_bf16(src[static_cast<size_t>(i)]);
        if (std::isnan(src[static_cast<size_t>(i)])) {
          EXPECT_TRUE(std::isnan(t == DType::F16 ? half_to_float(got[static_cast<size_t>(i)]) : bf16_to_float(got[static_cast<size_t>(i)])));
        } else {
          ASSERT_EQ(got[static_cast<size_t>(i)], want) << dtype_name(t) << " n=" << n << " i=" << i;
        }
      }
      // Back to fp32 from an odd offset (unaligned source).
      std::vector<uint16_t> shifted(static_cast<size_t>(n) + 1);
      std::copy(got.begin(), got.begin() + n, shifted.begin() + 1);
      std::vector<float> back(static_cast<size_t>(n) + 1, 1234.5f);
      cpu::to_f32(shifted.data() + 1, t, n, back.data());
      EXPECT_EQ(back[static_cast<size_t>(n)], 1234.5f);
      for (int64_t i = 0; i < n; ++i) {
        const uint16_t h = got[static_cast<size_t>(i)];
        const float want = t == DType::F16 ? half_to_float(h) : bf16_to_float(h);
        if (std::isnan(want)) {
          EXPECT_TRUE(std::isnan(back[static_cast<size_t>(i)]));
        } else {
          ASSERT_EQ(back[static_cast<size_t>(i)], want) << dtype_name(t) << " i=" << i;
        }
      }
    }
    std::vector<float> copy(static_cast<size_t>(n));
    cpu::to_f32(src.data(), DType::F32, n, copy.data());
    for (int64_t i = 0; i < n; ++i)
      EXPECT_EQ(std::bit_cast<uint32_t>(copy[static_cast<size_t>(i)]), std::bit_cast<uint32_t>(src[static_cast<size_t>(i)]));
  }
}

}  // namespace
}  // namespace fineserve
