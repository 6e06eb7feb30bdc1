// The bit budget (quant/bit_budget.h): the budget is met, the allocation is near the brute-force
// optimum, and real error tables from quantizing planted-outlier matrices get the bits where the
// error is.
#include "quant/bit_budget.h"

#include <cmath>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "kernels/base.h"
#include "quant/adaptive.h"
#include "tests/quant/quant_test_util.h"

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

}  // namespace
}  // namespace fineserve::quant
