#include "quant/quantizer.h"

#include <omp.h>

#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "kernels/base.h"
#include "kernels/half.h"
#include "quant/row_kernels.h"
#include "tests/quant/quant_test_util.h"

namespace fineserve::quant {
namespace {

using testing::check_bound;
using testing::gaussian;
using testing::view;

TEST(AllowedGroups, ColumnWiseThenPowersOfTwoDividingK) {
  EXPECT_EQ(allowed_groups(768), (std::vector<int64_t>{768, 256, 128, 64, 32}));
  EXPECT_EQ(allowed_groups(12288), (std::vector<int64_t>{12288, 4096, 2048, 1024, 512, 256, 128, 64, 32}));
  EXPECT_EQ(allowed_groups(100), (std::vector<int64_t>{100}));
  EXPECT_EQ(allowed_groups(4096), (std::vector<int64_t>{4096, 2048, 1024, 512, 256, 128, 64, 32}));
  EXPECT_EQ(allowed_groups(96), (std::vector<int64_t>{96, 32}));
  EXPECT_EQ(allowed_groups(5120), (std::vector<int64_t>{5120, 1024, 512, 256, 128, 64, 32}));
  EXPECT_EQ(allowed_groups(32), (std::vector<int64_t>{32}));
  EXPECT_EQ(allowed_groups(16), (std::vector<int64_t>{16}));
  EXPECT_TRUE(allowed_groups(0).empty());
  EXPECT_TRUE(allowed_groups(-4).empty());
}

TEST(AllowedGroups, IsAllowedGroup) {
  EXPECT_TRUE(is_allowed_group(768, 768));
  EXPECT_TRUE(is_allowed_group(768, 256));
  EXPECT_TRUE(is_allowed_group(768, 32));
  EXPECT_FALSE(is_allowed_group(768, 512));  // does not divide
  EXPECT_FALSE(is_allowed_group(768, 384));  // divides, but not a power of two
  EXPECT_FALSE(is_allowed_group(768, 16));   // below 32
  EXPECT_TRUE(is_allowed_group(100, 100));
  EXPECT_FALSE(is_allowed_group(100, 50));
  EXPECT_FALSE(is_allowed_group(4096, -1));
  EXPECT_FALSE(is_allowed_group(4096, 0));
  EXPECT_FALSE(is_allowed_group(0, 0));
  for (int64_t k : {96, 100, 768, 4096, 5120, 12288}) {
    for (int64_t g : allowed_groups(k)) EXPECT_TRUE(is_allowed_group(k, g)) << k << " " << g;
  }
}

TEST(ScaleForAbsmax, SmallestFp16ThatDoesNotClip) {
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> log_mag(-30.0f, 13.0f);
  for (int bits : {8, 4, 3, 2}) {
    const int qmax = qmax_for_bits(bits);
    for (int i = 0; i < 20000; ++i) {
      const float absmax = std::exp2(log_mag(rng));
      if (absmax > 65504.0f * static_cast<float>(qmax)) continue;
      const uint16_t s = scale_for_absmax(absmax, bits);
      ASSERT_GT(s, 0);
      ASSERT_LT(s, 0x7c00);
      EXPECT_GE(half_to_float(s) * static_cast<float>(qmax), absmax) << absmax;
      if (s > 1) {
        EXPECT_LT(half_to_float(static_cast<uint16_t>(s - 1)) * static_cast<float>(qmax), absmax) << absmax;
      }
    }
  }
  EXPECT_EQ(scale_for_absmax(0.0f, 4), 0);
  EXPECT_EQ(scale_for_absmax(-0.0f, 4), 0);
  EXPECT_EQ(scale_for_absmax(1e-30f, 4), 1);  // underflows fp16: the smallest positive fp16
  EXPECT_EQ(scale_for_absmax(7.0f, 4), float_to_half(1.0f));
  EXPECT_EQ(scale_for_absmax(127.0f, 8), float_to_half(1.0f));
}

TEST(ScaleForAbsmax, RejectsUnrepresentableMagnitudes) {
  EXPECT_EQ(scale_for_absmax(65504.0f * 127, 8), 0x7bff);
  EXPECT_EQ(scale_for_absmax(65504.0f * 7, 4), 0x7bff);
  try {
    scale_for_absmax(65504.0f * 7 * 1.0001f, 4);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("cannot be represented with fp16 scales"), std::string::npos) << e.what();
  }
  EXPECT_THROW(scale_for_absmax(1e30f, 8), Error);
  EXPECT_THROW(scale_for_absmax(std::numeric_limits<float>::infinity(), 8), Error);
  EXPECT_THROW(scale_for_absmax(std::numeric_limits<float>::quiet_NaN(), 8), Error);
  EXPECT_THROW(scale_for_absmax(1.0f, 5), Error);
}

struct Shape {
  int64_t cols;
  int64_t group;
};

// The bound for every bit width and a mix of groups, K that are not powers of two, odd row counts,
// zero rows and zero groups, and a few large entries.
TEST(Quantize, ErrorBoundHoldsExactly) {
  const Shape shapes[] = {{96, 96}, {96, 32}, {768, 768}, {768, 256}, {768, 32},
                          {5120, 5120}, {5120, 1024}, {5120, 128}, {100, 100}, {4096, 32}};
  uint32_t seed = 1;
  for (const Shape& shape : shapes) {
    const int64_t rows = 7;
    std::vector<float> w = gaussian(rows, shape.cols, seed++);
    for (int64_t c = 0; c < shape.cols; ++c) w[static_cast<size_t>(2 * shape.cols + c)] = 0.0f;  // a zero row
    for (int64_t c = 0; c < shape.group; ++c) w[static_cast<size_t>(4 * shape.cols + c)] = 0.0f;  // a zero group
    w[static_cast<size_t>(5 * shape.cols + shape.cols / 3)] = 0.9f;   // outliers
    w[static_cast<size_t>(6 * shape.cols + shape.cols - 1)] = -1.7f;
    for (int bits : {8, 4, 3, 2}) {
      if (bits == 4 && shape.cols % 2 != 0) continue;
      SCOPED_TRACE("K=" + std::to_string(shape.cols) + " group=" + std::to_string(shape.group) +
                   " bits=" + std::to_string(bits));
      const QuantizedMatrix q = quantize(view(w, rows, shape.cols), bits, shape.group, ScaleRule::Absmax);
      ASSERT_EQ(q.rows, rows);
      ASSERT_EQ(q.cols, shape.cols);
      ASSERT_EQ(q.bits, bits);
      ASSERT_EQ(q.group, shape.group);
      ASSERT_EQ(q.codes.size(), static_cast<size_t>(rows * (bits == 4 ? shape.cols / 2 : shape.cols)));
      ASSERT_EQ(q.scales.size(), static_cast<size_t>(rows * shape.cols / shape.group));
      const double rel = check_bound(w, q);
      EXPECT_NEAR(q.rel_error, rel, 1e-5 * rel + 1e-12);
      EXPECT_LE(q.max_err_over_scale, 0.5);
      EXPECT_GT(q.max_err_over_scale, 0.3);  // some element rounds by a good part of a step
    }
  }
}

TEST(Quantize, OddColumnWiseKWithEightBits) {
  // K = 37: column-wise only, and not a multiple of any vector width.
  const std::vector<float> w = gaussian(5, 37, 99);
  const QuantizedMatrix q = quantize(view(w, 5, 37), 8, 37, ScaleRule::Absmax);
  check_bound(w, q);
  testing::check_search(w, q, quantize(view(w, 5, 37), 8, 37));
  EXPECT_THROW(quantize(view(w, 5, 37), 4, 37), Error);  // 4-bit packing needs an even K
}

TEST(Quantize, TiesRoundToEven) {
  // absmax 7 gives scale exactly 1 at 4 bits, so w = k + 1/2 is a tie.
  std::vector<float> w = {7.0f, 0.5f, 1.5f, 2.5f, -0.5f, -1.5f, -2.5f, 3.5f};
  w.resize(32, 0.0f);
  const QuantizedMatrix q = quantize(view(w, 1, 32), 4, 32, ScaleRule::Absmax);
  EXPECT_EQ(q.scales[0], float_to_half(1.0f));
  const std::vector<int8_t> codes = testing::row_codes(q, 0);
  EXPECT_EQ(std::vector<int8_t>(codes.begin(), codes.begin() + 8), (std::vector<int8_t>{7, 0, 2, 2, 0, -2, -2, 4}));
  check_bound(w, q);
}

TEST(Quantize, AllZeroMatrix) {
  const std::vector<float> w(3 * 64, 0.0f);
  for (int bits : {8, 4}) {
    const QuantizedMatrix q = quantize(view(w, 3, 64), bits, 32);
    for (uint16_t s : q.scales) EXPECT_EQ(s, 0);
    for (uint8_t c : q.codes) EXPECT_EQ(c, bits == 4 ? 0x88 : 0x00);  // code 0 is nibble 8 at 4 bits
    EXPECT_EQ(q.rel_error, 0.0);
    for (float x : dequantize(q)) EXPECT_EQ(x, 0.0f);
  }
}

TEST(Quantize, TinyAndHugeMagnitudes) {
  const int64_t rows = 4, cols = 256;
  for (float magnitude : {1e-30f, 1e-9f, 1e-6f, 3e-5f, 1.0f, 100.0f, 60000.0f}) {
    std::vector<float> w = gaussian(rows, cols, 5, 1.0f);
    for (float& x : w) x *= magnitude;
    for (int bits : {8, 4, 2}) {
      if (magnitude * 6 > 65504.0f * static_cast<float>(qmax_for_bits(bits))) continue;
      SCOPED_TRACE("magnitude " + std::to_string(magnitude) + " bits " + std::to_string(bits));
      check_bound(w, quantize(view(w, rows, cols), bits, 64, ScaleRule::Absmax));
      if (magnitude >= 1e-9f)  // below, the float error sums of rel_error underflow (as for absmax)
        testing::check_search(w, quantize(view(w, rows, cols), bits, 64, ScaleRule::Absmax),
                              quantize(view(w, rows, cols), bits, 64));
    }
  }
  // Too large for an fp16 scale at 4 bits (but not at 8): a clear error naming the place.
  std::vector<float> w = gaussian(rows, cols, 6);
  w[static_cast<size_t>(2 * cols + 70)] = 1e6f;
  EXPECT_NO_THROW(quantize(view(w, rows, cols), 8, 64));
  try {
    quantize(view(w, rows, cols), 4, 64);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("cannot be represented with fp16 scales"), std::string::npos) << msg;
    EXPECT_NE(msg.find("row 2, columns 64..127"), std::string::npos) << msg;
  }
}

TEST(Quantize, NonFiniteWeightsAreErrors) {
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                    -std::numeric_limits<float>::infinity()}) {
    std::vector<float> w = gaussian(300, 96, 8);  // several chunks
    w[static_cast<size_t>(211 * 96 + 45)] = bad;
    try {
      quantize(view(w, 300, 96), 8, 32);
      FAIL() << "expected an error";
    } catch (const Error& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find("row 211, column 45"), std::string::npos) << msg;
      EXPECT_NE(msg.find(std::isnan(bad) ? "NaN" : "infinite"), std::string::npos) << msg;
    }
  }
}

TEST(Quantize, SixteenBitAndUnalignedSources) {
  const int64_t rows = 9, cols = 768;
  // bf16 values for the BF16 source; the Gaussian is fp16-exact for the F16 source.
  const std::vector<float> w16 = gaussian(rows, cols, 11);
  std::vector<float> wbf(w16.size());
  for (size_t i = 0; i < w16.size(); ++i) wbf[i] = bf16_to_float(float_to_bf16(w16[i] * 3.0f));

  for (DType dtype : {DType::F16, DType::BF16, DType::F32}) {
    const std::vector<float>& ref = dtype == DType::BF16 ? wbf : w16;
    const size_t esize = dtype_size(dtype);
    for (size_t offset : {size_t{0}, size_t{1}, size_t{3}}) {
      SCOPED_TRACE(std::string(dtype_name(dtype)) + " at offset " + std::to_string(offset));
      std::vector<char> buffer(offset + ref.size() * esize);
      char* p = buffer.data() + offset;
      for (size_t i = 0; i < ref.size(); ++i) {
        if (dtype == DType::F32) {
          std::memcpy(p + 4 * i, &ref[i], 4);
        } else {
          const uint16_t h = dtype == DType::F16 ? float_to_half(ref[i]) : float_to_bf16(ref[i]);
          std::memcpy(p + 2 * i, &h, 2);
        }
      }
      const QuantizedMatrix got = quantize(MatrixView{p, dtype, rows, cols}, 4, 128);
      const QuantizedMatrix want = quantize(view(ref, rows, cols), 4, 128);
      EXPECT_EQ(got.codes, want.codes);
      EXPECT_EQ(got.scales, want.scales);
      EXPECT_EQ(got.rel_error, want.rel_error);
      check_bound(ref, quantize(MatrixView{p, dtype, rows, cols}, 4, 128, ScaleRule::Absmax));
    }
  }
}

TEST(Quantize, RejectsBadArguments) {
  const std::vector<float> w = gaussian(2, 96, 3);
  EXPECT_THROW(quantize(view(w, 2, 96), 5, 32), Error);
  EXPECT_THROW(quantize(view(w, 2, 96), 4, 48), Error);
  EXPECT_THROW(quantize(view(w, 2, 96), 4, 64), Error);
  EXPECT_THROW(quantize(view(w, 2, 96), 4, -1), Error);
  const std::vector<int8_t> ints(2 * 96, 1);
  EXPECT_THROW(quantize(MatrixView{ints.data(), DType::I8, 2, 96}, 8, 32), Error);
  try {
    quantize(view(w, 2, 96), 4, 64);
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("allowed: 96, 32"), std::string::npos) << e.what();
  }
  // An empty matrix is fine.
  const QuantizedMatrix q = quantize(MatrixView{nullptr, DType::F16, 0, 64}, 4, 32);
  EXPECT_TRUE(q.codes.empty());
  EXPECT_EQ(q.rel_error, 0.0);
}

TEST(PackInt4, RoundTripsEveryCodePair) {
  std::vector<int8_t> codes;
  for (int lo = -8; lo <= 7; ++lo) {
    for (int hi = -8; hi <= 7; ++hi) {
      codes.push_back(static_cast<int8_t>(lo));
      codes.push_back(static_cast<int8_t>(hi));
    }
  }
  std::vector<uint8_t> packed(codes.size() / 2), fast(codes.size() / 2);
  pack_int4(codes.data(), static_cast<int64_t>(codes.size()), packed.data());
  detail::pack_int4_fast(reinterpret_cast<const uint8_t*>(codes.data()), static_cast<int64_t>(codes.size()), fast.data());
  EXPECT_EQ(fast, packed);
  for (size_t j = 0; j < packed.size(); ++j) {
    EXPECT_EQ(packed[j] & 0xf, codes[2 * j] + 8);  // element 2j: low nibble, code + 8
    EXPECT_EQ(packed[j] >> 4, codes[2 * j + 1] + 8);
  }
  const int8_t pair[2] = {-7, 7};
  uint8_t one = 0;
  pack_int4(pair, 2, &one);
  EXPECT_EQ(one, 0xf1);
  const int8_t lowest[2] = {-8, 7};  // code -8 is nibble 0
  pack_int4(lowest, 2, &one);
  EXPECT_EQ(one, 0xf0);
  std::vector<int8_t> back(codes.size());
  unpack_int4(packed.data(), static_cast<int64_t>(codes.size()), back.data());
  EXPECT_EQ(back, codes);
}

// quantize() over many chunks and threads equals quantize_row row by row, and the same run with a
// different thread count gives the same bits, error statistics included.
TEST(Quantize, MatchesRowByRowAtAnyThreadCount) {
  const int64_t rows = 301, cols = 768, group = 64;
  std::vector<float> w = gaussian(rows, cols, 21);
  testing::plant_outlier_channels(w, cols, {5, 400}, 12.0f);
  const int saved_threads = omp_get_max_threads();
  for (int bits : {8, 4}) {
    omp_set_num_threads(1);
    const QuantizedMatrix one = quantize(view(w, rows, cols), bits, group);
    omp_set_num_threads(4);
    const QuantizedMatrix four = quantize(view(w, rows, cols), bits, group);
    EXPECT_EQ(one.codes, four.codes);
    EXPECT_EQ(one.scales, four.scales);
    EXPECT_EQ(one.rel_error, four.rel_error);
    EXPECT_EQ(one.max_err_over_scale, four.max_err_over_scale);

    std::vector<int8_t> codes(static_cast<size_t>(cols));
    std::vector<uint16_t> scales(static_cast<size_t>(cols / group));
    std::vector<float> deq(static_cast<size_t>(cols));
    const std::vector<float> all = dequantize(four);
    for (int64_t r = 0; r < rows; ++r) {
      quantize_row(w.data() + r * cols, cols, bits, group, codes.data(), scales.data());
      ASSERT_EQ(testing::row_codes(four, r), codes) << "row " << r;
      ASSERT_TRUE(std::equal(scales.begin(), scales.end(), four.scales.begin() + r * (cols / group))) << "row " << r;
      dequantize_row(codes.data(), scales.data(), cols, group, deq.data());
      ASSERT_TRUE(std::equal(deq.begin(), deq.end(), all.begin() + r * cols)) << "row " << r;
    }
  }
  omp_set_num_threads(saved_threads);
}

TEST(Quantize, RowScalesMatchScaleForAbsmax) {
  // Groups whose magnitudes span fp16's range (subnormal scales included), and zero groups, so the
  // vectorised scale computation meets every case in its 8-group blocks.
  const int64_t cols = 32 * 64;
  std::mt19937 rng(4);
  std::uniform_real_distribution<float> log_mag(-36.0f, 18.0f);
  std::vector<float> w = gaussian(1, cols, 4, 1.0f);
  for (int64_t g = 0; g < cols / 32; ++g) {
    const float m = g % 9 == 4 ? 0.0f : std::exp2(log_mag(rng));
    for (int64_t j = 0; j < 32; ++j) w[static_cast<size_t>(g * 32 + j)] *= m;
  }
  std::vector<int8_t> codes(static_cast<size_t>(cols));
  std::vector<uint16_t> scales(static_cast<size_t>(cols / 32));
  quantize_row(w.data(), cols, 8, 32, codes.data(), scales.data(), ScaleRule::Absmax);
  for (int64_t g = 0; g < cols / 32; ++g) {
    float absmax = 0;
    for (int64_t j = 0; j < 32; ++j) absmax = std::max(absmax, std::fabs(w[static_cast<size_t>(g * 32 + j)]));
    EXPECT_EQ(scales[static_cast<size_t>(g)], scale_for_absmax(absmax, 8)) << "group " << g << " absmax " << absmax;
  }
}

// The portable loops and the AVX2 ones give the same codes and scales (the error sums only differ
// in the order of additions).
TEST(Quantize, PortableAndVectorPathsAgree) {
  if (detail::best_isa() == detail::Isa::Baseline) GTEST_SKIP() << "no AVX2 on this CPU";
  const Shape shapes[] = {{100, 100}, {96, 32}, {768, 768}, {5120, 1024}, {4096, 32}, {200, 200}};
  uint32_t seed = 40;
  for (const Shape& shape : shapes) {
    std::vector<float> w = gaussian(5, shape.cols, seed++);
    for (int64_t c = 0; c < std::min<int64_t>(shape.cols, 64); ++c) w[static_cast<size_t>(c)] = 0.0f;
    w[static_cast<size_t>(3 * shape.cols + 7)] = 2.0f;
    for (int bits : {8, 4, 3}) {
     for (ScaleRule rule : {ScaleRule::Absmax, ScaleRule::SignedAbsmax, ScaleRule::Search}) {
      SCOPED_TRACE("K=" + std::to_string(shape.cols) + " group " + std::to_string(shape.group) + " bits " +
                   std::to_string(bits) + " " + scale_rule_name(rule));
      const detail::Isa saved = detail::set_isa(detail::Isa::Baseline);
      const QuantizedMatrix portable = quantize(view(w, 5, shape.cols), bits, shape.group, rule);
      detail::set_isa(detail::Isa::Avx2);
      const QuantizedMatrix vector = quantize(view(w, 5, shape.cols), bits, shape.group, rule);
      detail::set_isa(saved);
      EXPECT_EQ(portable.codes, vector.codes);
      EXPECT_EQ(portable.scales, vector.scales);
      EXPECT_NEAR(portable.rel_error, vector.rel_error, 2e-5 * vector.rel_error);  // float sums, other order
      EXPECT_NEAR(portable.max_err_over_scale, vector.max_err_over_scale, 1e-6);
     }
    }
  }
}

}  // namespace
}  // namespace fineserve::quant
