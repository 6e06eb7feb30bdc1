// The bit budget (quant/bit_budget.h): the budget is met, the allocation is near the brute-force
// optimum, and real error tables from quantizing planted-outlier matrices get the bits where the
// error is.
#include "quant/bit_budget.h"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <optional>
#include <span>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "kernels/base.h"
#include "models/checkpoint/safetensors.h"
#include "quant/adaptive.h"
#include "quant/convert.h"
#include "quant/format.h"
#include "tests/quant/quant_test_util.h"
#include "tests/scratch_dir.h"

namespace fineserve::quant {
namespace {

// Options shaped like real ones: int8 and int4 at groups K..32, errors falling with the group.
BudgetMatrix synthetic_matrix(std::mt19937& rng, int i) {
  std::uniform_real_distribution<double> u(0.5, 2.0);
  BudgetMatrix m;
  m.name = "m" + std::to_string(i);
  m.weights = static_cast<int64_t>(1000 * u(rng));
  const double e4 = 0.1 * u(rng), e8 = e4 / 16;
  const double outlier = u(rng);  // how much fine groups help
  for (int bits : {8, 4}) {
    for (int64_t g : {int64_t{1024}, int64_t{256}, int64_t{64}, int64_t{32}}) {
      const double e = (bits == 8 ? e8 : e4) * (1 + outlier * std::log2(static_cast<double>(g) / 32) / 5);
      m.options.push_back({bits, g, bits + 16.0 / static_cast<double>(g), e});
    }
  }
  return m;
}

double error_of(const std::vector<BudgetMatrix>& ms, const std::vector<size_t>& c) {
  double e = 0;
  for (size_t i = 0; i < ms.size(); ++i) e += static_cast<double>(ms[i].weights) * std::pow(ms[i].options[c[i]].rel_error, 2);
  return e;
}

TEST(BitBudget, MeetsTheBudgetAndIsNearTheOptimum) {
  std::mt19937 rng(1);
  std::vector<BudgetMatrix> ms;
  for (int i = 0; i < 5; ++i) ms.push_back(synthetic_matrix(rng, i));
  double n = 0;
  for (const BudgetMatrix& m : ms) n += static_cast<double>(m.weights);
  for (double target : {4.02, 4.1, 4.25, 4.5, 5.0, 6.0, 7.0, 8.2, 8.5}) {
    SCOPED_TRACE("target " + std::to_string(target));
    const BudgetAllocation a = allocate_bits(ms, target);
    ASSERT_TRUE(a.feasible);
    EXPECT_LE(a.bits_per_weight, target + 1e-12);
    // Brute force over all 8^5 allocations.
    double best = INFINITY;
    std::vector<size_t> c(ms.size(), 0);
    std::function<void(size_t, double)> walk = [&](size_t i, double bits) {
      if (bits > target * n + 1e-9) return;
      if (i == ms.size()) {
        best = std::min(best, error_of(ms, c));
        return;
      }
      for (size_t j = 0; j < ms[i].options.size(); ++j) {
        c[i] = j;
        walk(i + 1, bits + static_cast<double>(ms[i].weights) * ms[i].options[j].bits_per_weight);
      }
    };
    walk(0, 0);
    EXPECT_NEAR(a.weighted_error, error_of(ms, a.choice), 1e-12 * a.weighted_error);
    EXPECT_LE(a.weighted_error, 1.1 * best) << "brute-force optimum " << best;
    EXPECT_GE(a.weighted_error, best * (1 - 1e-12));
  }
}

TEST(BitBudget, InfeasibleAndBadInput) {
  std::mt19937 rng(2);
  std::vector<BudgetMatrix> ms{synthetic_matrix(rng, 0), synthetic_matrix(rng, 1)};
  const BudgetAllocation a = allocate_bits(ms, 4.0);  // the cheapest option is 4 + 16/1024 bits
  EXPECT_FALSE(a.feasible);
  EXPECT_GT(a.bits_per_weight, 4.0);
  EXPECT_THROW(allocate_bits(ms, 0), Error);
  EXPECT_THROW(allocate_bits(ms, NAN), Error);
  ms[1].options.clear();
  EXPECT_THROW(allocate_bits(ms, 5), Error);
}

// On real error tables: a Gaussian and a planted-outlier matrix of the same shape. At 4.5 bits both
// get int4 g32 (int8 anywhere would force the other far coarser); at 6.3 the outlier matrix gets
// int8 and the Gaussian one stays int4.
TEST(BitBudget, SpendsTheBitsWhereTheErrorIs) {
  const int64_t rows = 64, cols = 1024;
  std::vector<float> plain = testing::gaussian(rows, cols, 3);
  std::vector<float> outliers = testing::gaussian(rows, cols, 4);
  testing::plant_outlier_channels(outliers, cols, {10, 500, 501, 900}, 20.0f);
  std::vector<BudgetMatrix> ms;
  for (const std::vector<float>* w : {&plain, &outliers}) {
    BudgetMatrix m{"m", rows * cols, 1.0, {}};
    for (int bits : {8, 4})
      for (const GroupLevel& l : error_levels(testing::view(*w, rows, cols), bits, ScaleRule::Search))
        m.options.push_back({bits, l.group, bits + 16.0 / static_cast<double>(l.group), l.rel_error});
    ms.push_back(m);
  }
  for (double target : {4.5, 6.3}) {
    const BudgetAllocation a = allocate_bits(ms, target);
    ASSERT_TRUE(a.feasible);
    EXPECT_LE(a.bits_per_weight, target);
    EXPECT_GT(a.bits_per_weight, target - 0.25);  // the budget is used
    const BudgetOption& g = ms[0].options[a.choice[0]];
    const BudgetOption& o = ms[1].options[a.choice[1]];
    const std::string what = "target " + std::to_string(target) + ": gaussian int" + std::to_string(g.bits) + " g" +
                             std::to_string(g.group) + ", outliers int" + std::to_string(o.bits) + " g" +
                             std::to_string(o.group);
    EXPECT_EQ(g.bits, 4) << what;
    EXPECT_EQ(o.bits, target > 6 ? 8 : 4) << what;
    EXPECT_GE(o.bits_per_weight, g.bits_per_weight) << what;
  }
}

// Priors by name: the default has none (every matrix weighs 1); the weights of all matches multiply.
TEST(BitBudget, SaliencePriorsByName) {
  EXPECT_TRUE(default_salience_priors().empty());
  const std::vector<SaliencePrior> priors{{"\\.v_proj\\.", 4}, {"\\.(down_proj|fc2)\\.", 2}};
  EXPECT_EQ(salience_of("model.layers.3.self_attn.v_proj.weight", priors), 4.0);
  EXPECT_EQ(salience_of("model.layers.3.mlp.down_proj.weight", priors), 2.0);
  EXPECT_EQ(salience_of("model.decoder.layers.0.fc2.weight", priors), 2.0);
  EXPECT_EQ(salience_of("model.layers.3.self_attn.q_proj.weight", priors), 1.0);
  EXPECT_EQ(salience_of("model.decoder.layers.0.fc1.weight", priors), 1.0);
  EXPECT_EQ(salience_of("anything", default_salience_priors()), 1.0);
  EXPECT_EQ(salience_of("layers.0.v_proj.weight", {{"v_proj", 3}, {"layers\\.0\\.", 2}}), 6.0);
  EXPECT_THROW(salience_of("x", {{"(", 2}}), Error);
  EXPECT_THROW(salience_of("x", {{"x", 0}}), Error);
  EXPECT_THROW(salience_of("x", {{"x", -1}}), Error);
}

// Two identical Gaussian matrices and a budget that affords int8 for one of them: with equal salience
// the tie goes to the first; with the second 8x as salient, the second gets it.
TEST(BitBudget, SalienceMovesTheBits) {
  const int64_t rows = 64, cols = 1024;
  const std::vector<float> w = testing::gaussian(rows, cols, 5);
  BudgetMatrix m{"m", rows * cols, 1.0, {}};
  for (int bits : {8, 4})
    for (const GroupLevel& l : error_levels(testing::view(w, rows, cols), bits, ScaleRule::Search))
      m.options.push_back({bits, l.group, bits + 16.0 / static_cast<double>(l.group), l.rel_error});
  std::vector<BudgetMatrix> ms{m, m};
  BudgetAllocation a = allocate_bits(ms, 6.3);
  ASSERT_TRUE(a.feasible);
  EXPECT_EQ(ms[0].options[a.choice[0]].bits, 8);
  EXPECT_EQ(ms[1].options[a.choice[1]].bits, 4);
  ms[1].salience = 8;
  a = allocate_bits(ms, 6.3);
  ASSERT_TRUE(a.feasible);
  EXPECT_LE(a.bits_per_weight, 6.3);
  EXPECT_EQ(ms[0].options[a.choice[0]].bits, 4);
  EXPECT_EQ(ms[1].options[a.choice[1]].bits, 8);
}

// `quantize --target-bits` end to end on a two-matrix checkpoint: the budget mixes int8 and int4,
// a salience prior decides which matrix gets the int8, and the written checkpoint's metadata reads
// back (mixed bits without --expert-bits once wrote expert_bits "0", which readers reject).
TEST(BitBudget, ConvertWritesMixedBitsThatReadBack) {
  const fineserve::testing::ScratchDir scratch;
  const std::filesystem::path dir = scratch.path();
  const int64_t rows = 64, cols = 256;
  const std::vector<std::string> names = testing::write_two_matrix_source(dir, rows, cols, 11).names;
  ConvertOptions o;
  o.model = dir / "src";
  o.out = dir / "out";
  o.target_bits = 6.3;  // room for one matrix at int8
  o.keep = default_keep_patterns();
  o.salience = {{"v_proj", 4}};
  const ConvertReport r = convert_checkpoint(o);
  ASSERT_EQ(r.matrices.size(), 2u);
  std::map<std::string, int> bits;
  for (const MatrixReport& m : r.matrices) bits[m.name] = m.bits;
  EXPECT_EQ(bits["layers.0.v_proj.weight"], 8) << "the prior weighs v_proj 4x";
  EXPECT_EQ(bits["layers.0.q_proj.weight"], 4);
  const ckpt::Checkpoint q = ckpt::Checkpoint::open(o.out);
  const std::optional<FormatMetadata> meta = read_header_metadata(q.metadata(), "test");
  ASSERT_TRUE(meta.has_value());
  EXPECT_EQ(meta->bits_of("layers.0.v_proj"), 8);
  EXPECT_EQ(meta->bits_of("layers.0.q_proj"), 4);
  EXPECT_EQ(meta->group_mode, "target-bits");
}

}  // namespace
}  // namespace fineserve::quant
