// quantize --calibration: the activation statistics of the source model (quant/calibration/) and
// the importance-weighted ("calibrated") scale search they feed (quant/quantizer.h).
#include "quant/calibration/activation_stats.h"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "kernels/base.h"
#include "kernels/half.h"
#include "models/checkpoint/safetensors.h"
#include "quant/adaptive.h"
#include "quant/convert.h"
#include "quant/row_kernels.h"
#include "tests/quant/quant_test_util.h"
#include "tests/scratch_dir.h"

namespace fineserve::quant {
namespace {

const std::filesystem::path kLlama = std::filesystem::path(FINESERVE_TEST_DATA) / "golden" / "llama-gqa";

std::vector<int32_t> some_ids(int n, int vocab) {
  std::vector<int32_t> ids;
  uint32_t x = 12345;
  for (int i = 0; i < n; ++i) {
    x = x * 1664525u + 1013904223u;
    ids.push_back(static_cast<int32_t>((x >> 8) % static_cast<uint32_t>(vocab)));
  }
  return ids;
}

// Importance-weighted squared error of every (row, group), in double, from the stored codes and scales.
std::vector<double> weighted_group_errors(const std::vector<float>& w, const std::vector<float>& imp,
                                          const QuantizedMatrix& q) {
  const int64_t groups = q.cols / q.group;
  std::vector<double> err(static_cast<size_t>(q.rows * groups), 0.0);
  for (int64_t r = 0; r < q.rows; ++r) {
    const std::vector<int8_t> codes = testing::row_codes(q, r);
    for (int64_t j = 0; j < q.cols; ++j) {
      const double s = half_to_float(q.scales[static_cast<size_t>(r * groups + j / q.group)]);
      const double d = w[static_cast<size_t>(r * q.cols + j)] - codes[static_cast<size_t>(j)] * s;
      err[static_cast<size_t>(r * groups + j / q.group)] += imp[static_cast<size_t>(j)] * d * d;
    }
  }
  return err;
}

TEST(CalibratedSearch, NeverWorseThanAbsmaxAndBetterThanDataFreeInWeightedError) {
  const int64_t rows = 64, cols = 256;
  const std::vector<float> w = testing::gaussian(rows, cols, 21);
  // A few inputs carry most of the signal (as activation outliers do), one group carries none.
  std::vector<float> imp(static_cast<size_t>(cols), 1.0f);
  for (int64_t k = 0; k < cols; k += 9) imp[static_cast<size_t>(k)] = 200.0f;
  for (int64_t k = 64; k < 96; ++k) imp[static_cast<size_t>(k)] = 0.0f;
  for (const int bits : {4, 8}) {
    SCOPED_TRACE("bits " + std::to_string(bits));
    const QuantizedMatrix absmax = quantize(testing::view(w, rows, cols), bits, 32, ScaleRule::Absmax);
    const QuantizedMatrix data_free = quantize(testing::view(w, rows, cols), bits, 32, ScaleRule::Search);
    const QuantizedMatrix calibrated = quantize(testing::view(w, rows, cols), bits, 32, ScaleRule::Search, imp.data());
    const std::vector<double> ea = weighted_group_errors(w, imp, absmax), ed = weighted_group_errors(w, imp, data_free),
                              ec = weighted_group_errors(w, imp, calibrated);
    double sum_d = 0, sum_c = 0, sum_norm = 0;
    for (size_t g = 0; g < ea.size(); ++g) {
      EXPECT_LE(ec[g], ea[g] * (1 + 1e-5) + 1e-30) << "group " << g;
      sum_d += ed[g];
      sum_c += ec[g];
    }
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < cols; ++j)
        sum_norm += imp[static_cast<size_t>(j)] * w[static_cast<size_t>(r * cols + j)] * w[static_cast<size_t>(r * cols + j)];
    EXPECT_LT(sum_c, 0.9 * sum_d) << "the calibrated search should cut the weighted error by more than 10%";
    EXPECT_NEAR(calibrated.weighted_rel_error, std::sqrt(sum_c / sum_norm), 1e-3 * calibrated.weighted_rel_error);
    EXPECT_NEAR(data_free.weighted_rel_error, data_free.rel_error, 1e-12) << "no importances: the plain error";
    const int lo = qmin_for_bits(bits), hi = qmax_for_bits(bits);
    for (int64_t r = 0; r < rows; ++r)
      for (const int8_t c : testing::row_codes(calibrated, r)) {
        EXPECT_GE(c, lo);
        EXPECT_LE(c, hi);
      }
  }
}

// The weighted error and so the calibrated choices are the same on the portable and AVX2 paths,
// including a group whose length is not a multiple of the 8 lanes (column-wise, K = 100).
TEST(CalibratedSearch, SameChoicesOnEveryIsa) {
  if (detail::best_isa() == detail::Isa::Baseline) GTEST_SKIP() << "no AVX2 on this CPU";
  const int64_t rows = 16;
  for (const auto& [cols, group] : {std::pair<int64_t, int64_t>{96, 32}, {100, 100}}) {
    SCOPED_TRACE("K " + std::to_string(cols) + " group " + std::to_string(group));
    const std::vector<float> w = testing::gaussian(rows, cols, 41);
    std::vector<float> imp(static_cast<size_t>(cols));
    for (int64_t k = 0; k < cols; ++k)
      imp[static_cast<size_t>(k)] = k % 7 == 0 ? 90.0f : 0.5f + 0.01f * static_cast<float>(k);
    for (const float s : {0.001f, 0.004f, -0.003f}) {
      const detail::Isa saved = detail::set_isa(detail::Isa::Baseline);
      const float a = detail::weighted_group_sq_error(w.data(), imp.data(), cols, s, 7.0f);
      detail::set_isa(detail::Isa::Avx2);
      const float b = detail::weighted_group_sq_error(w.data(), imp.data(), cols, s, 7.0f);
      detail::set_isa(saved);
      EXPECT_EQ(a, b) << s;
    }
    const detail::Isa saved = detail::set_isa(detail::Isa::Baseline);
    const QuantizedMatrix a = quantize(testing::view(w, rows, cols), 4, group, ScaleRule::Search, imp.data());
    detail::set_isa(detail::Isa::Avx2);
    const QuantizedMatrix b = quantize(testing::view(w, rows, cols), 4, group, ScaleRule::Search, imp.data());
    detail::set_isa(saved);
    EXPECT_EQ(a.scales, b.scales);
  }
}

TEST(CalibratedSearch, WeightedErrorLevelsAndConvertReport) {
  const fineserve::testing::ScratchDir scratch;
  const std::filesystem::path dir = scratch.path();
  const int64_t rows = 32, cols = 128;
  const testing::TwoMatrixSource src = testing::write_two_matrix_source(dir, rows, cols, 31);
  const std::vector<float>& a = src.a;
  const std::vector<std::string>& names = src.names;
  std::vector<float> imp(static_cast<size_t>(cols), 1.0f);
  for (int64_t k = 0; k < cols; k += 5) imp[static_cast<size_t>(k)] = 50.0f;
  // error_levels with importances reports the weighted error of what quantize() writes.
  const std::vector<GroupLevel> levels = error_levels(testing::view(a, rows, cols), 4, ScaleRule::Search, imp.data());
  ASSERT_EQ(levels.back().group, 32);
  EXPECT_NEAR(levels.back().rel_error,
              quantize(testing::view(a, rows, cols), 4, 32, ScaleRule::Search, imp.data()).weighted_rel_error, 1e-9);

  ConvertOptions o;
  o.model = dir / "src";
  o.out = dir / "out";
  o.group.mode = GroupMode::Fixed;
  o.group.group = 32;
  o.keep = default_keep_patterns();
  o.importance[names[0]] = imp;
  o.calibration = "test";
  const ConvertReport r = convert_checkpoint(o);
  ASSERT_EQ(r.matrices.size(), 2u);
  for (const MatrixReport& m : r.matrices) EXPECT_EQ(m.calibrated, m.name == names[0]) << m.name;
  EXPECT_EQ(to_json(r)["options"]["calibration"], "test");
  EXPECT_NE(format_report(r).find("calibrated search (test): 1 of 2 matrices"), std::string::npos);

  o.importance[names[0]].pop_back();  // a calibration of another model: refused before writing
  o.overwrite = true;
  EXPECT_THROW(convert_checkpoint(o), Error);
  o.importance[names[0]] = std::vector<float>(static_cast<size_t>(cols), -1.0f);
  EXPECT_THROW(convert_checkpoint(o), Error);
}

TEST(Calibration, StatsForEveryLinearFromItsOwnInput) {
  const ActivationStats s = collect_activation_stats(kLlama, some_ids(150, 512), {.ctx = 64});
  EXPECT_EQ(s.tokens, 150);
  for (int layer = 0; layer < 2; ++layer) {
    const std::string p = "model.layers." + std::to_string(layer) + ".";
    std::map<std::string, std::vector<float>> m;
    for (const char* name : {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}) {
      const auto it = s.mean_sq.find(p + name + ".weight");
      ASSERT_NE(it, s.mean_sq.end()) << p << name;
      m[name] = it->second;
      double total = 0;
      for (const float v : it->second) {
        ASSERT_TRUE(std::isfinite(v) && v >= 0) << p << name;
        total += v;
      }
      EXPECT_GT(total, 0) << p << name;
    }
    EXPECT_EQ(m["self_attn.q_proj"].size(), 64u);
    EXPECT_EQ(m["mlp.down_proj"].size(), 128u);
    // q, k and v read the same normed hidden state, gate and up (one stacked GEMM) the same too;
    // o_proj reads the attention output and gate/up the second norm's output.
    EXPECT_EQ(m["self_attn.q_proj"], m["self_attn.k_proj"]);
    EXPECT_EQ(m["self_attn.q_proj"], m["self_attn.v_proj"]);
    EXPECT_EQ(m["mlp.gate_proj"], m["mlp.up_proj"]);
    EXPECT_NE(m["self_attn.q_proj"], m["self_attn.o_proj"]);
    EXPECT_NE(m["self_attn.q_proj"], m["mlp.gate_proj"]);
  }
  const ActivationStats fewer = collect_activation_stats(kLlama, some_ids(150, 512), {.ctx = 64, .max_tokens = 40});
  EXPECT_EQ(fewer.tokens, 40);
  EXPECT_NE(fewer.mean_sq.at("model.layers.0.self_attn.o_proj.weight"),
            s.mean_sq.at("model.layers.0.self_attn.o_proj.weight"));
  EXPECT_THROW(collect_activation_stats(kLlama, {1}), Error);
  EXPECT_THROW(collect_activation_stats(kLlama, {1, 5000}), Error);
}

}  // namespace
}  // namespace fineserve::quant
