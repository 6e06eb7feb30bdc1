#include "quant/adaptive.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "kernels/base.h"
#include "tests/quant/quant_test_util.h"

namespace fineserve::quant {
namespace {

using testing::gaussian;
using testing::plant_outlier_channels;
using testing::view;

// Brute force: the mean and max over (row, group) of the group absmax at one group size.
std::pair<double, double> brute_range(const std::vector<float>& w, int64_t rows, int64_t cols, int64_t group) {
  double sum = 0, max = 0;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t g = 0; g < cols / group; ++g) {
      double m = 0;
      for (int64_t j = g * group; j < (g + 1) * group; ++j) m = std::max(m, std::fabs(double{w[static_cast<size_t>(r * cols + j)]}));
      sum += m;
      max = std::max(max, m);
    }
  }
  return {sum / static_cast<double>(rows * (cols / group)), max};
}

TEST(RangeLevels, MatchesBruteForceAtEveryCandidate) {
  for (int64_t cols : {int64_t{768}, int64_t{5120}, int64_t{100}, int64_t{96}}) {
    const int64_t rows = 37;
    std::vector<float> w = gaussian(rows, cols, static_cast<uint32_t>(cols));
    plant_outlier_channels(w, cols, {cols / 3}, 20.0f);
    const std::vector<GroupLevel> levels = range_levels(view(w, rows, cols));
    const std::vector<int64_t> groups = allowed_groups(cols);
    ASSERT_EQ(levels.size(), groups.size());
    for (size_t i = 0; i < levels.size(); ++i) {
      SCOPED_TRACE("K=" + std::to_string(cols) + " group " + std::to_string(groups[i]));
      EXPECT_EQ(levels[i].group, groups[i]);
      const auto [mean, max] = brute_range(w, rows, cols, groups[i]);
      EXPECT_NEAR(levels[i].mean_range, mean, 1e-9 * mean);
      EXPECT_EQ(levels[i].max_range, max);
      EXPECT_EQ(levels[i].rel_error, -1.0);
      if (i == 0) {
        EXPECT_EQ(levels[i].ratio, 0.0);
      } else {
        EXPECT_NEAR(levels[i].ratio, levels[i - 1].mean_range / levels[i].mean_range, 1e-12);
        EXPECT_GE(levels[i].ratio, 1.0);  // a child's absmax never exceeds its parent's
      }
    }
  }
}

TEST(RangeLevels, SameAtAnyThreadCountAndRejectsNaN) {
  const int64_t rows = 700, cols = 256;
  std::vector<float> w = gaussian(rows, cols, 3);
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  const std::vector<GroupLevel> one = range_levels(view(w, rows, cols));
  omp_set_num_threads(3);
  const std::vector<GroupLevel> three = range_levels(view(w, rows, cols));
  omp_set_num_threads(saved);
  ASSERT_EQ(one.size(), three.size());
  for (size_t i = 0; i < one.size(); ++i) EXPECT_EQ(one[i].mean_range, three[i].mean_range);

  w[static_cast<size_t>(650 * cols + 17)] = std::numeric_limits<float>::quiet_NaN();
  try {
    range_levels(view(w, rows, cols));
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("row 650, column 17 is NaN"), std::string::npos) << e.what();
  }
}

// Light-tailed weights: uniform in [-0.03, 0.03] (at 4 bits column-wise they measure ~0.067, under
// the error cap, and well under the Gaussian's error at every group).
std::vector<float> uniform(int64_t rows, int64_t cols, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-0.03f, 0.03f);
  std::vector<float> w(static_cast<size_t>(rows * cols));
  for (float& x : w) x = u(rng);
  return w;
}

std::vector<int64_t> spread_channels(int64_t cols) {  // ~1% of the channels (at least 2), spread over K
  std::vector<int64_t> channels;
  for (int64_t c = 0; c < std::max<int64_t>(2, cols / 100); ++c) channels.push_back((c * 997 + 13) % cols);
  return channels;
}

// The adaptive rule's decisions are scale-free in K: Gaussian weights stay at the coarsest group the
// error cap allows (column-wise at 8 bits, 32 at 4 bits) at every K; planted outlier channels refine
// further at 8 bits, at small and large K alike.
TEST(Adaptive, GaussianStaysAtTheCoarsestGroupTheCapAllowsAtEveryK) {
  for (int64_t cols : {int64_t{256}, int64_t{768}, int64_t{4096}}) {
    for (int bits : {4, 8}) {
      const int64_t rows = cols >= 4096 ? 48 : 96;
      const std::vector<float> w = gaussian(rows, cols, static_cast<uint32_t>(cols) + 1);
      GroupOptions options;
      options.bits = bits;
      const GroupDecision d = choose_group(view(w, rows, cols), options);
      EXPECT_EQ(d.mode, GroupMode::Adaptive);
      EXPECT_EQ(d.group, bits == 8 ? cols : 32) << "K=" << cols << " bits " << bits << ": " << d.reason;
      ASSERT_FALSE(d.levels.empty());
      for (const GroupLevel& l : d.levels) {
        EXPECT_GT(l.gaussian_rel_error, 0);
        EXPECT_NEAR(l.rel_error / l.gaussian_rel_error, 1.0, 0.1) << "K=" << cols << " group " << l.group;
      }
      EXPECT_NE(d.reason.find("Gaussian"), std::string::npos) << d.reason;
      if (bits == 4) {
        EXPECT_NE(d.reason.find("> cap 0.086"), std::string::npos) << d.reason;
      }
      // Without the cap (the rule before it), a Gaussian matrix stays column-wise at 4 bits too.
      options.error_cap = 0.99;
      EXPECT_EQ(choose_group(view(w, rows, cols), options).group, cols) << "K=" << cols << " bits " << bits;
    }
  }
}

TEST(Adaptive, PlantedOutlierChannelsRefineAtEveryK) {
  for (int64_t cols : {int64_t{256}, int64_t{768}, int64_t{4096}}) {
    const int64_t rows = cols >= 4096 ? 48 : 96;
    std::vector<float> w = gaussian(rows, cols, 77 + static_cast<uint32_t>(cols));
    plant_outlier_channels(w, cols, spread_channels(cols), 10.0f);
    for (int bits : {4, 8}) {
      GroupOptions options;
      options.bits = bits;
      const GroupDecision d = choose_group(view(w, rows, cols), options);
      EXPECT_LT(d.group, cols) << "K=" << cols << " bits " << bits << ": " << d.reason;
      const double err_column = quantize(view(w, rows, cols), bits, cols).rel_error;
      const double err_chosen = quantize(view(w, rows, cols), bits, d.group).rel_error;
      EXPECT_LT(err_chosen, 0.8 * err_column) << "K=" << cols << ": " << d.reason;
    }
  }
}

// At 4 bits the rule still tells matrices apart: light-tailed (uniform) weights already meet the cap
// column-wise and stay there at every K; the same weights with planted outlier channels refine.
TEST(Adaptive, LightTailedWeightsStayColumnWiseAtFourBitsUnlessOutliers) {
  for (int64_t cols : {int64_t{256}, int64_t{768}, int64_t{4096}}) {
    const int64_t rows = cols >= 4096 ? 48 : 96;
    std::vector<float> w = uniform(rows, cols, 5 + static_cast<uint32_t>(cols));
    const GroupDecision plain = choose_group(view(w, rows, cols), GroupOptions{});
    EXPECT_EQ(plain.group, cols) << "K=" << cols << ": " << plain.reason;
    EXPECT_LT(plain.levels.front().rel_error, kDefaultErrorCap);
    plant_outlier_channels(w, cols, spread_channels(cols), 10.0f);
    const GroupDecision outliers = choose_group(view(w, rows, cols), GroupOptions{});
    EXPECT_LT(outliers.group, cols) << "K=" << cols << ": " << outliers.reason;
    EXPECT_LT(quantize(view(w, rows, cols), 4, outliers.group).rel_error,
              0.8 * quantize(view(w, rows, cols), 4, cols).rel_error)
        << "K=" << cols << ": " << outliers.reason;
  }
}

// The cap is a property of the bits and the group only: it is llama.cpp Q4_0's error on Gaussian
// weights; at 4 bits with the search, Gaussian weights meet it at 32 and at no coarser group; at 8
// bits at every group.
TEST(Adaptive, ErrorCapAdmitsGroupsByTheGaussianError) {
  EXPECT_NEAR(gaussian_rel_error(4, 32, ScaleRule::SignedAbsmax), kDefaultErrorCap, 0.002);
  EXPECT_LE(gaussian_rel_error(4, 32, ScaleRule::Search), kDefaultErrorCap);
  EXPECT_GT(gaussian_rel_error(4, 64, ScaleRule::Search), kDefaultErrorCap);
  EXPECT_LE(gaussian_rel_error(8, 4096, ScaleRule::Search), kDefaultErrorCap / 5);
  const int64_t rows = 64, cols = 1024;
  const std::vector<float> w = gaussian(rows, cols, 21);
  GroupOptions options;
  for (double cap : {0.99, 0.1, 0.093, 0.086, 0.01}) {
    options.error_cap = cap;
    const GroupDecision d = choose_group(view(w, rows, cols), options);
    // Gaussian weights are within the tolerance everywhere: the decision is the coarsest group under the cap.
    int64_t want = 32;
    for (const GroupLevel& l : d.levels) {
      if (gaussian_rel_error(4, l.group, ScaleRule::Search) <= cap) {
        want = l.group;
        break;
      }
    }
    EXPECT_EQ(d.group, want) << "cap " << cap << ": " << d.reason;
  }
  for (double bad : {-1.0, 1.0, 2.0}) {
    options.error_cap = bad;
    EXPECT_THROW(choose_group(view(w, rows, cols), options), Error) << bad;
  }
}

TEST(Adaptive, ToleranceControlsHowFarItRefines) {
  const int64_t rows = 64, cols = 1024;
  std::vector<float> w = gaussian(rows, cols, 8);
  plant_outlier_channels(w, cols, {100, 900}, 6.0f);
  GroupOptions options;
  options.error_cap = 0.99;  // every group is a candidate
  options.tolerance = 1e9;   // anything is close enough: column-wise
  EXPECT_EQ(choose_group(view(w, rows, cols), options).group, cols);
  // The decision is the coarsest level within the tolerance.
  for (double t : {1.0, 1.1, 1.25, 1.5, 2.0}) {
    options.tolerance = t;
    const GroupDecision d = choose_group(view(w, rows, cols), options);
    size_t i = 0;
    while (i + 1 < d.levels.size() && d.levels[i].rel_error > t * d.levels[i].gaussian_rel_error) ++i;
    EXPECT_EQ(d.group, d.levels[i].group) << "tolerance " << t << ": " << d.reason;
  }
  options.tolerance = 0.5;
  EXPECT_THROW(choose_group(view(w, rows, cols), options), Error);
}

TEST(Adaptive, GaussianReferenceIsDeterministicAndGrowsWithTheGroup) {
  const double e32 = gaussian_rel_error(4, 32, ScaleRule::Absmax);
  EXPECT_EQ(e32, gaussian_rel_error(4, 32, ScaleRule::Absmax));  // cached, and the same sample
  EXPECT_LT(e32, gaussian_rel_error(4, 256, ScaleRule::Absmax));
  EXPECT_LT(gaussian_rel_error(4, 256, ScaleRule::Absmax), gaussian_rel_error(4, 4096, ScaleRule::Absmax));
  EXPECT_LT(gaussian_rel_error(4, 32, ScaleRule::Search), e32);
  EXPECT_LT(gaussian_rel_error(8, 32, ScaleRule::Absmax), e32 / 10);
}

// The paper's α rule stays selectable (GroupMode::Alpha).
TEST(Alpha, GaussianStaysCoarseAtLargeK) {
  for (int64_t cols : {int64_t{2048}, int64_t{4096}, int64_t{5120}}) {
    const std::vector<float> w = gaussian(96, cols, static_cast<uint32_t>(cols) + 1);
    GroupOptions options;
    options.mode = GroupMode::Alpha;
    const GroupDecision d = choose_group(view(w, 96, cols), options);
    EXPECT_EQ(d.mode, GroupMode::Alpha);
    EXPECT_GE(d.group, 1024) << "K=" << cols << ": " << d.reason;
    EXPECT_NE(d.reason.find("α"), std::string::npos) << d.reason;
  }
}

TEST(Alpha, AlphaControlsHowFarItRefines) {
  const int64_t rows = 32, cols = 1024;
  const std::vector<float> w = gaussian(rows, cols, 5);
  GroupOptions options;
  options.mode = GroupMode::Alpha;
  options.alpha = 1e9;  // nothing beats it: column-wise
  GroupDecision d = choose_group(view(w, rows, cols), options);
  EXPECT_EQ(d.group, cols);
  EXPECT_NE(d.reason.find("column-wise"), std::string::npos) << d.reason;
  options.alpha = 1.0;  // every halving shrinks random ranges a little: all the way down
  d = choose_group(view(w, rows, cols), options);
  EXPECT_EQ(d.group, 32);
  EXPECT_NE(d.reason.find("finest"), std::string::npos) << d.reason;
  // The decision is the walk down the ratios: stop at the first one <= alpha.
  for (double alpha : {1.02, 1.05, 1.08, 1.1, 1.15, 1.2}) {
    options.alpha = alpha;
    d = choose_group(view(w, rows, cols), options);
    size_t i = 0;
    while (i + 1 < d.levels.size() && d.levels[i + 1].ratio > alpha) ++i;
    EXPECT_EQ(d.group, d.levels[i].group) << "alpha " << alpha << ": " << d.reason;
  }
  options.alpha = -1;
  EXPECT_THROW(choose_group(view(w, rows, cols), options), Error);
  options.alpha = std::numeric_limits<double>::quiet_NaN();
  EXPECT_THROW(choose_group(view(w, rows, cols), options), Error);
}

TEST(Adaptive, OnlyColumnWiseAllowedAndZeroMatrices) {
  const std::vector<float> w = gaussian(8, 100, 2);
  GroupDecision d = choose_group(view(w, 8, 100), GroupOptions{});
  EXPECT_EQ(d.group, 100);
  EXPECT_EQ(d.levels.size(), 1u);
  EXPECT_FALSE(d.reason.empty());

  const std::vector<float> zeros(8 * 256, 0.0f);
  d = choose_group(view(zeros, 8, 256), GroupOptions{});
  EXPECT_EQ(d.group, 256);
  GroupOptions alpha;
  alpha.mode = GroupMode::Alpha;
  d = choose_group(view(zeros, 8, 256), alpha);
  EXPECT_EQ(d.group, 256);
  for (size_t i = 1; i < d.levels.size(); ++i) EXPECT_EQ(d.levels[i].ratio, 1.0);
}

TEST(Fixed, AllowedGroupsAndErrors) {
  const std::vector<float> w = gaussian(4, 768, 9);
  GroupOptions options;
  options.mode = GroupMode::Fixed;
  options.group = -1;
  GroupDecision d = choose_group(view(w, 4, 768), options);
  EXPECT_EQ(d.group, 768);
  EXPECT_EQ(d.mode, GroupMode::Fixed);
  options.group = 128;
  EXPECT_EQ(choose_group(view(w, 4, 768), options).group, 128);

  options.group = 100;
  try {
    choose_group(view(w, 4, 768), options);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("group 100 does not divide K=768 (allowed: 768, 256, 128, 64, 32)"),
              std::string::npos)
        << e.what();
  }
  for (int64_t bad : {int64_t{384}, int64_t{16}, int64_t{512}, int64_t{0}, int64_t{-2}}) {
    options.group = bad;
    EXPECT_THROW(choose_group(view(w, 4, 768), options), Error) << bad;
  }
  options.group = 128;
  options.bits = 5;
  EXPECT_THROW(choose_group(view(w, 4, 768), options), Error);
}

TEST(MaxRelError, CoarsestGroupMeetingTheTarget) {
  const int64_t rows = 40, cols = 768;
  std::vector<float> w = gaussian(rows, cols, 31);
  plant_outlier_channels(w, cols, {3, 300, 301, 700}, 8.0f);
  for (int bits : {4, 8}) {
    const std::vector<int64_t> groups = allowed_groups(cols);
    std::vector<double> brute;
    for (int64_t g : groups) brute.push_back(quantize(view(w, rows, cols), bits, g).rel_error);

    GroupOptions options;
    options.mode = GroupMode::MaxRelError;
    options.bits = bits;
    // Targets between every pair of neighbouring errors, and one below all of them.
    for (size_t i = 0; i + 1 < brute.size(); ++i) {
      options.max_rel_error = std::sqrt(brute[i] * brute[i + 1]);
      const GroupDecision d = choose_group(view(w, rows, cols), options);
      size_t want = 0;
      while (want < brute.size() && brute[want] > options.max_rel_error) ++want;
      ASSERT_LT(want, brute.size());
      EXPECT_EQ(d.group, groups[want]) << d.reason;
      EXPECT_TRUE(d.target_met);
      ASSERT_EQ(d.levels.size(), groups.size());
      for (size_t l = 0; l < groups.size(); ++l) EXPECT_NEAR(d.levels[l].rel_error, brute[l], 1e-12);
    }
    options.max_rel_error = brute.back() * 0.5;
    const GroupDecision missed = choose_group(view(w, rows, cols), options);
    EXPECT_FALSE(missed.target_met);
    EXPECT_EQ(missed.group, 32);
    EXPECT_NE(missed.reason.find("not met"), std::string::npos) << missed.reason;
  }
  GroupOptions options;
  options.mode = GroupMode::MaxRelError;
  options.max_rel_error = 0;
  EXPECT_THROW(choose_group(view(w, rows, cols), options), Error);
}

}  // namespace
}  // namespace fineserve::quant
