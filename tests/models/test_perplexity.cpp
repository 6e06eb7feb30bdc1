// Perplexity with a sliding window: against transformers' logits (one window) and against a
// brute-force re-computation of every window (several overlapping windows, awkward sizes).
#include "models/perplexity.h"

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "kernels/backend.h"
#include "kernels/base.h"
#include "models/checkpoint/safetensors.h"
#include "models/model.h"
#include "quant/convert.h"
#include "tests/models/golden_util.h"

namespace fineserve {
namespace {
namespace fs = std::filesystem;

const fs::path kGolden = fs::path(FINESERVE_TEST_DATA) / "golden" / "llama-gqa";

double nll(const float* row, int64_t vocab, int32_t target) {
  double mx = row[0];
  for (int64_t k = 0; k < vocab; ++k) mx = std::max(mx, static_cast<double>(row[k]));
  double sum = 0;
  for (int64_t k = 0; k < vocab; ++k) sum += std::exp(row[k] - mx);
  return mx + std::log(sum) - row[target];
}

TEST(Perplexity, OneWindowMatchesTransformersLogits) {
  const auto meta = nlohmann::json::parse(std::ifstream(kGolden / "golden.json"));
  const ckpt::Checkpoint golden = ckpt::Checkpoint::open(kGolden / "golden.safetensors");
  const auto ids = meta["prompts"][2]["ids"].get<std::vector<int32_t>>();
  const ckpt::TensorView t = golden.get("logits.2");
  std::vector<float> ref(static_cast<size_t>(t.numel()));
  std::memcpy(ref.data(), t.data, t.nbytes());
  const int64_t vocab = t.shape()[1];
  double want = 0;
  for (size_t i = 0; i + 1 < ids.size(); ++i) want += nll(ref.data() + i * vocab, vocab, ids[i + 1]);

  auto backend = make_cpu_backend();
  auto model = load_model(kGolden, *backend);
  for (int chunk : {256, 5}) {
    PerplexityOptions o;
    o.ctx = 64;
    o.stride = 64;
    o.chunk = chunk;
    const PerplexityResult r = perplexity(*model, ids, o);
    EXPECT_EQ(r.tokens, static_cast<int64_t>(ids.size()) - 1);
    EXPECT_EQ(r.windows, 1);
    EXPECT_NEAR(r.nll_sum, want, 1e-4 * want) << "chunk " << chunk;
    const double want_ppl = std::exp(want / static_cast<double>(ids.size() - 1));
    EXPECT_NEAR(r.ppl(), want_ppl, 1e-4 * want_ppl);
  }
}

TEST(Perplexity, SlidingWindowsScoreEachTokenOnce) {
  auto backend = make_cpu_backend();
  auto model = load_model(kGolden, *backend);
  const int64_t vocab = model->info().vocab_size;
  std::vector<int32_t> ids;
  for (int i = 0; i < 29; ++i) ids.push_back(static_cast<int32_t>((i * 37 + 11) % vocab));

  for (const auto& [ctx, stride, chunk] : {std::tuple{7, 3, 2}, std::tuple{12, 12, 5}, std::tuple{10, 4, 3}}) {
    // Brute force: every window from scratch, scoring the tokens no earlier window scored.
    double want = 0;
    int64_t scored = 1, count = 0;
    int windows = 0;
    for (int64_t begin = 0;; begin += stride) {
      const int64_t end = std::min<int64_t>(begin + ctx, static_cast<int64_t>(ids.size()));
      const std::vector<int32_t> w(ids.begin() + begin, ids.begin() + end);
      const std::vector<float> logits = testing::prefill_logits(*model, w);
      for (int64_t tok = std::max(scored, begin + 1); tok < end; ++tok) {
        want += nll(logits.data() + (tok - 1 - begin) * vocab, vocab, ids[static_cast<size_t>(tok)]);
        ++count;
      }
      scored = end;
      ++windows;
      if (end == static_cast<int64_t>(ids.size())) break;
    }
    PerplexityOptions o;
    o.ctx = ctx;
    o.stride = stride;
    o.chunk = chunk;
    int64_t last_done = 0;
    const PerplexityResult r = perplexity(*model, ids, o, [&](int64_t done, int64_t total) {
      EXPECT_GT(done, last_done);
      EXPECT_EQ(total, count);
      last_done = done;
    });
    EXPECT_EQ(last_done, count);
    EXPECT_EQ(r.tokens, count) << ctx << "/" << stride;
    // Overlapping windows score every token but the first; disjoint ones skip each window's first.
    EXPECT_EQ(count, stride < ctx ? 28 : 28 - (windows - 1));
    EXPECT_EQ(r.windows, windows);
    EXPECT_NEAR(r.nll_sum, want, 1e-6 * want) << ctx << "/" << stride;
  }
}

// KL(P_ref || P) against a brute-force sum over one window's logits of both models, and zero for a
// model against itself. The quantized model comes from `--target-bits 4.5` (mixed int8/int4), which
// must load, meet its budget and stay closer to the reference than column-wise int4.
TEST(Perplexity, KlDivergenceAgainstAReference) {
  const auto meta = nlohmann::json::parse(std::ifstream(kGolden / "golden.json"));
  const auto ids = meta["prompts"][2]["ids"].get<std::vector<int32_t>>();
  testing::Scratch tmp;
  quant::ConvertOptions budget = testing::convert_options(kGolden, tmp.path() / "budget", 4);
  budget.target_bits = 4.5;
  const quant::ConvertReport report = quant::convert_checkpoint(budget);
  double n = 0, bits = 0;
  for (const quant::MatrixReport& m : report.matrices) {
    n += static_cast<double>(m.rows * m.cols);
    bits += static_cast<double>(m.rows * m.cols) * m.bits_per_weight;
  }
  EXPECT_LE(bits / n, 4.5);
  EXPECT_GT(bits / n, 4.2);
  quant::ConvertOptions colwise = testing::convert_options(kGolden, tmp.path() / "colwise", 4);
  colwise.group.mode = quant::GroupMode::Fixed;
  colwise.group.group = -1;
  quant::convert_checkpoint(colwise);

  auto backend = make_cpu_backend();
  auto reference = load_model(kGolden, *backend);
  auto same = load_model(kGolden, *backend);
  auto quantized = load_model(budget.out, *backend);
  auto coarse = load_model(colwise.out, *backend);
  const int64_t vocab = reference->info().vocab_size;
  PerplexityOptions o;
  o.ctx = 64;
  o.stride = 64;

  const PerplexityResult self = perplexity_vs_reference(*same, *reference, ids, o);
  EXPECT_NEAR(self.mean_kl(), 0.0, 1e-9);
  EXPECT_EQ(self.same_top, self.tokens);
  EXPECT_NEAR(self.ref_nll_sum, self.nll_sum, 1e-9 * self.nll_sum);

  const PerplexityResult r = perplexity_vs_reference(*quantized, *reference, ids, o);
  const std::vector<float> lq = testing::prefill_logits(*quantized, ids), lr = testing::prefill_logits(*reference, ids);
  double want = 0;
  for (size_t t = 0; t + 1 < ids.size(); ++t) {
    const float* q = lq.data() + t * vocab;
    const float* p = lr.data() + t * vocab;
    double mq = q[0], mp = p[0], sq = 0, sp = 0;
    for (int64_t k = 0; k < vocab; ++k) mq = std::max(mq, double{q[k]}), mp = std::max(mp, double{p[k]});
    for (int64_t k = 0; k < vocab; ++k) sq += std::exp(q[k] - mq), sp += std::exp(p[k] - mp);
    for (int64_t k = 0; k < vocab; ++k) {
      const double lp = p[k] - mp - std::log(sp), lqk = q[k] - mq - std::log(sq);
      want += std::exp(lp) * (lp - lqk);
    }
  }
  EXPECT_GT(r.mean_kl(), 0.0);
  EXPECT_NEAR(r.kl_sum, want, 1e-3 * want + 1e-9);
  EXPECT_NEAR(r.ref_ppl(), self.ppl(), 1e-9 * self.ppl());
  EXPECT_LT(r.mean_kl(), perplexity_vs_reference(*coarse, *reference, ids, o).mean_kl());
}

TEST(Perplexity, BadOptionsAreErrors) {
  auto backend = make_cpu_backend();
  auto model = load_model(kGolden, *backend);
  const std::vector<int32_t> ids = {1, 5, 9, 12};
  PerplexityOptions o;
  o.ctx = 4;
  o.stride = 2;
  EXPECT_THROW(perplexity(*model, {1}, o), Error);
  o.stride = 5;
  EXPECT_THROW(perplexity(*model, ids, o), Error);
  o.stride = 2;
  o.ctx = 1000;  // past max_position_embeddings = 128
  EXPECT_THROW(perplexity(*model, ids, o), Error);
  o.ctx = 4;
  EXPECT_THROW(perplexity(*model, {1, 100000}, o), Error);
  EXPECT_NO_THROW(perplexity(*model, ids, o));
}

}  // namespace
}  // namespace fineserve
