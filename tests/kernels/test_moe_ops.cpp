// The MoE routing ops: moe_route (softmax, top-k, renormalise) and scatter_add_rows, on known
// values and the fast CPU path against the reference on awkward sizes.
#include <cmath>
#include <random>
#include <vector>

#include <gtest/gtest.h>

#include "kernels/backend.h"
#include "kernels/cpu/cpu_backend.h"

namespace fineserve {
namespace {

TEST(MoeRoute, SoftmaxTopKRenormalised) {
  auto be = make_cpu_backend();
  // Token 0: logits (1, 3, 2, 0) -> experts 1, 2 with weights e^3 / (e^3 + e^2), e^2 / (e^3 + e^2).
  // Token 1: a tie between experts 0 and 3 goes to the lower index first.
  const std::vector<float> logits = {1, 3, 2, 0, 5, -1, 0, 5};
  std::vector<int32_t> ids(4, -1);
  std::vector<float> w(4, NAN);
  be->moe_route(logits.data(), 2, 4, 2, ids.data(), w.data());
  EXPECT_EQ(ids, (std::vector<int32_t>{1, 2, 0, 3}));
  const double e3 = std::exp(3.0), e2 = std::exp(2.0);
  EXPECT_NEAR(w[0], e3 / (e3 + e2), 1e-7);
  EXPECT_NEAR(w[1], e2 / (e3 + e2), 1e-7);
  EXPECT_FLOAT_EQ(w[2], 0.5f);
  EXPECT_FLOAT_EQ(w[3], 0.5f);

  // top_k = n_experts: every expert, most probable first, weights the full softmax.
  be->moe_route(logits.data(), 1, 4, 4, ids.data(), w.data());
  EXPECT_EQ(ids, (std::vector<int32_t>{1, 2, 0, 3}));
  double sum = 0;
  for (float v : w) sum += v;
  EXPECT_NEAR(sum, 1.0, 1e-6);
  EXPECT_GT(w[0], w[1]);
  EXPECT_GT(w[2], w[3]);
}

TEST(MoeRoute, TopOneHasWeightOne) {
  auto be = make_cpu_backend();
  const std::vector<float> logits = {0.1f, -2.0f, 0.3f};
  int32_t id = -1;
  float w = 0;
  be->moe_route(logits.data(), 1, 3, 1, &id, &w);
  EXPECT_EQ(id, 2);
  EXPECT_FLOAT_EQ(w, 1.0f);
}

TEST(ScatterAddRows, RepeatedRowsAddInOrder) {
  auto be = make_cpu_backend();
  std::vector<float> dst = {1, 1, 1, 2, 2, 2};                // [2, 3]
  const std::vector<float> src = {1, 2, 3, 10, 20, 30, 4, 5, 6};  // [3, 3]
  const std::vector<int32_t> rows = {1, 0, 1};
  const std::vector<float> w = {0.5f, 2.0f, -1.0f};
  be->scatter_add_rows(src.data(), rows.data(), w.data(), 3, 3, dst.data(), 2);
  EXPECT_EQ(dst, (std::vector<float>{21, 41, 61, 2 + 0.5f - 4, 2 + 1 - 5, 2 + 1.5f - 6}));
}

// The fast path against the reference: n and dim not multiples of the 8-wide vectors or the
// 64-column slices, big enough to take the threaded branch.
TEST(ScatterAddRows, FastMatchesReference) {
  auto fast = make_cpu_backend();
  auto ref = make_cpu_backend(CpuOptions{.reference = true});
  std::mt19937 rng(7);
  std::normal_distribution<float> nd;
  for (const auto& [n, dim, dst_rows] : std::vector<std::tuple<int, int, int>>{{1, 1, 1}, {3, 769, 2}, {77, 1030, 40}}) {
    std::vector<float> src(static_cast<size_t>(n) * dim), w(static_cast<size_t>(n)), d0(static_cast<size_t>(dst_rows) * dim);
    std::vector<int32_t> rows(static_cast<size_t>(n));
    for (float& v : src) v = nd(rng);
    for (float& v : w) v = nd(rng);
    for (float& v : d0) v = nd(rng);
    for (int32_t& r : rows) r = static_cast<int32_t>(rng() % static_cast<unsigned>(dst_rows));
    std::vector<float> a = d0, b = d0;
    fast->scatter_add_rows(src.data(), rows.data(), w.data(), n, dim, a.data(), dst_rows);
    ref->scatter_add_rows(src.data(), rows.data(), w.data(), n, dim, b.data(), dst_rows);
    for (size_t i = 0; i < a.size(); ++i) ASSERT_NEAR(a[i], b[i], 1e-5f * (1 + std::abs(b[i]))) << n << "x" << dim << " at " << i;
  }
}

}  // namespace
}  // namespace fineserve
