// The full code range and the per-group scale search (quant/quantizer.h, ScaleRule), and the exact
// decoding of the extreme codes (int4 -8 = nibble 0, int8 -128) by the CPU kernels.
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "kernels/cpu/gemm.h"
#include "kernels/cpu/reference.h"
#include "kernels/cpu/simd.h"
#include "kernels/half.h"
#include "quant/quantizer.h"
#include "quant/row_kernels.h"
#include "tests/quant/quant_test_util.h"

namespace fineserve::quant {
namespace {

using testing::gaussian;
using testing::view;

// Laplace-distributed weights (heavier tails than a Gaussian, like trained LLM weights).
std::vector<float> laplace(int64_t rows, int64_t cols, uint32_t seed) {
  std::mt19937 rng(seed);
  std::exponential_distribution<float> e(50.0f);
  std::bernoulli_distribution sign(0.5);
  std::vector<float> w(static_cast<size_t>(rows * cols));
  for (float& x : w) x = half_to_float(float_to_half(sign(rng) ? e(rng) : -e(rng)));
  return w;
}

TEST(ScaleSearch, NeverWorseThanAbsmaxInAnyGroupAndCodesInRange) {
  struct Case {
    const char* name;
    std::vector<float> w;
    int64_t cols;
  };
  const int64_t rows = 8;
  std::vector<Case> cases;
  cases.push_back({"gaussian", gaussian(rows, 768, 1), 768});
  cases.push_back({"laplace", laplace(rows, 512, 2), 512});
  std::vector<float> outliers = gaussian(rows, 1024, 3);
  testing::plant_outlier_channels(outliers, 1024, {7, 300, 301, 999}, 15.0f);
  cases.push_back({"outliers", outliers, 1024});
  std::vector<float> odd = gaussian(rows, 37, 4);
  cases.push_back({"odd K", odd, 37});
  for (const Case& c : cases) {
    for (int bits : {8, 4, 3, 2}) {
      for (int64_t group : allowed_groups(c.cols)) {
        if (bits == 4 && c.cols % 2 != 0) continue;
        SCOPED_TRACE(std::string(c.name) + " bits " + std::to_string(bits) + " group " + std::to_string(group));
        const QuantizedMatrix absmax = quantize(view(c.w, rows, c.cols), bits, group, ScaleRule::Absmax);
        const QuantizedMatrix searched = quantize(view(c.w, rows, c.cols), bits, group);
        EXPECT_EQ(searched.rule, ScaleRule::Search);
        const double e = testing::check_search(c.w, absmax, searched);
        EXPECT_LE(e, absmax.rel_error * (1 + 1e-5));
        // The signed rule alone is not guaranteed better per group, but its codes stay in range.
        testing::check_search(c.w, absmax, quantize(view(c.w, rows, c.cols), bits, group, ScaleRule::SignedAbsmax),
                              /*never_worse=*/false);
      }
    }
  }
}

TEST(ScaleSearch, CutsTheInt4ErrorOfGaussianGroups) {
  // The gain the search exists for: at 4 bits and groups of 32 the 16th level and clipping help.
  const std::vector<float> w = gaussian(64, 1024, 5);
  const double absmax = quantize(view(w, 64, 1024), 4, 32, ScaleRule::Absmax).rel_error;
  const double signed_absmax = quantize(view(w, 64, 1024), 4, 32, ScaleRule::SignedAbsmax).rel_error;
  const double searched = quantize(view(w, 64, 1024), 4, 32).rel_error;
  EXPECT_LT(signed_absmax, absmax);
  EXPECT_LT(searched, 0.9 * absmax) << "absmax " << absmax << " searched " << searched;
  EXPECT_LE(searched, signed_absmax);
}

TEST(ScaleSearch, SignedAbsmaxMapsTheExtremeToTheLowestCode) {
  for (int bits : {8, 4}) {
    const int qmin = qmin_for_bits(bits);
    for (float sign : {1.0f, -1.0f}) {
      std::vector<float> w = gaussian(1, 64, 6);
      w[5] = sign * 0.5f;  // the group's extreme, of either sign
      const QuantizedMatrix q = quantize(view(w, 1, 64), bits, 32, ScaleRule::SignedAbsmax);
      const std::vector<int8_t> codes = testing::row_codes(q, 0);
      EXPECT_EQ(codes[5], qmin) << "bits " << bits << " sign " << sign;
      const float s = half_to_float(q.scales[0]);
      EXPECT_EQ(std::signbit(s), sign > 0);  // a positive extreme needs a negative scale
      EXPECT_NEAR(codes[5] * s, w[5], 1e-3 * 0.5);
    }
  }
}

// A matrix whose codes include -8 / -128 in every position of a 32-column block, decoded by the
// reference linear, the fast CPU GEMV (m = 1) and GEMM (m = 5), and dequantize_rows: all exactly
// code * scale (the fast paths keep codes + 8 in nibbles and the last nibble of each word in two's
// complement, see kernels/cpu/gemm.cpp).
TEST(ExtremeCodes, DecodeExactlyOnEveryCpuPath) {
  const int64_t rows = 9, cols = 96;
  for (int bits : {4, 8}) {
    for (int64_t group : {int64_t{32}, cols}) {
      SCOPED_TRACE("bits " + std::to_string(bits) + " group " + std::to_string(group));
      std::vector<float> w = gaussian(rows, cols, 7, 1.0f);
      // Plant a negative extreme at a different column of every row, so every nibble / byte
      // position of the packed layouts gets code -8 / -128 somewhere.
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t g = 0; g < cols / group; ++g) w[static_cast<size_t>(r * cols + g * group + (r * 5 + g * 3) % group)] = -9.0f;
      const QuantizedMatrix q = quantize(view(w, rows, cols), bits, group, ScaleRule::SignedAbsmax);
      const int qmin = qmin_for_bits(bits);
      int lowest = 0;
      for (int64_t r = 0; r < rows; ++r)
        for (int8_t c : testing::row_codes(q, r)) lowest += c == qmin;
      ASSERT_GE(lowest, rows * (cols / group));

      const std::vector<float> deq = dequantize(q);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c)
          ASSERT_EQ(deq[static_cast<size_t>(r * cols + c)],
                    testing::row_codes(q, r)[static_cast<size_t>(c)] * half_to_float(q.scales[static_cast<size_t>(r * (cols / group) + c / group)]));

      WeightMatrix wm;
      wm.rows = rows;
      wm.cols = cols;
      wm.bits = bits;
      wm.dtype = bits == 4 ? DType::U8 : DType::I8;
      wm.group = group;
      wm.data = q.codes.data();
      wm.scales = q.scales.data();
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c) ASSERT_EQ(cpu::ref::weight_at(wm, r, c), deq[static_cast<size_t>(r * cols + c)]);

      // One-hot inputs read single weights through each kernel: exact whatever the summation order.
      for (const int64_t m : {int64_t{1}, int64_t{5}}) {
        std::vector<float> x(static_cast<size_t>(m * cols), 0.0f), y_ref(static_cast<size_t>(m * rows)),
            y_fast(static_cast<size_t>(m * rows));
        for (int64_t c0 = 0; c0 < cols; c0 += m) {
          std::fill(x.begin(), x.end(), 0.0f);
          for (int64_t i = 0; i < m && c0 + i < cols; ++i) x[static_cast<size_t>(i * cols + c0 + i)] = 1.0f;
          cpu::ref::linear(wm, x.data(), m, nullptr, DType::F32, y_ref.data());
          for (int64_t i = 0; i < m && c0 + i < cols; ++i)
            for (int64_t r = 0; r < rows; ++r)
              ASSERT_EQ(y_ref[static_cast<size_t>(i * rows + r)], deq[static_cast<size_t>(r * cols + c0 + i)]);
          if (!cpu::has_avx2()) continue;
          const cpu::PackedWeight packed = cpu::pack_weight(wm);
          cpu::linear(packed, x.data(), m, nullptr, DType::F32, y_fast.data(), cpu::best_isa(), 1);
          for (int64_t i = 0; i < m && c0 + i < cols; ++i)
            for (int64_t r = 0; r < rows; ++r)
              ASSERT_EQ(y_fast[static_cast<size_t>(i * rows + r)], deq[static_cast<size_t>(r * cols + c0 + i)])
                  << "m " << m << " row " << r << " col " << c0 + i;
        }
      }
    }
  }
}

TEST(ScaleSearch, ErrorEstimateAgreesAcrossIsas) {
  if (detail::best_isa() == detail::Isa::Baseline) GTEST_SKIP() << "no AVX2 on this CPU";
  const std::vector<float> w = laplace(1, 100, 9);
  for (float s : {0.001f, 0.003f, -0.002f, 0.0101f}) {
    const detail::Isa saved = detail::set_isa(detail::Isa::Baseline);
    const float a = detail::group_sq_error(w.data(), 100, s, 7.0f);
    detail::set_isa(detail::Isa::Avx2);
    const float b = detail::group_sq_error(w.data(), 100, s, 7.0f);
    detail::set_isa(saved);
    EXPECT_EQ(a, b) << s;
  }
}

}  // namespace
}  // namespace fineserve::quant
