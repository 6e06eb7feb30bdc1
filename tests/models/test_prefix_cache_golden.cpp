// Automatic prefix caching through the engine on the golden models: greedy outputs are identical
// with the cache on and off (warm cache, concurrent sharing, and preemption under a small cache),
// shared blocks are counted once, and the hits / queries counters mean what vLLM's do.
#include <gtest/gtest.h>

#include <filesystem>
#include <vector>

#include "engine/engine.h"
#include "kernels/backend.h"
#include "models/model.h"
#include "tests/models/golden_util.h"

namespace fineserve {
namespace {
namespace fs = std::filesystem;
using Prompts = std::vector<std::vector<int32_t>>;

std::vector<int32_t> concat(std::vector<int32_t> a, const std::vector<int32_t>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

// The fixture's prompts plus variants that share prefixes of various lengths with them (a block
// boundary or not), and exact repeats.
Prompts sharing_prompts(const fs::path& dir) {
  const Prompts g = testing::golden_prompt_ids(dir);
  const std::vector<int32_t>& longest = g[2];
  Prompts p = g;
  p.push_back(longest);                                       // a repeat: all but one block cached
  p.push_back(concat(longest, g[1]));                         // the repeat, extended
  p.push_back(concat({longest.begin(), longest.begin() + 21}, g[0]));  // diverges mid-block
  p.push_back(concat({longest.begin(), longest.begin() + 8}, g[1]));   // diverges at a block edge
  return p;
}

struct RunResult {
  Prompts outputs;
  EngineStats stats;
};

GenerationRequest request(const std::vector<int32_t>& prompt, int new_tokens) {
  GenerationRequest r;
  r.prompt = prompt;
  r.stop.max_new_tokens = new_tokens;
  r.ignore_eos = true;
  return r;
}

// One request at a time (so later ones find the earlier ones' blocks), then all at once.
RunResult run(Model& model, const Prompts& prompts, EngineConfig ec, int new_tokens) {
  Engine engine(model, nullptr, ec);
  RunResult out;
  for (const auto& p : prompts) out.outputs.push_back(engine.generate({request(p, new_tokens)}).front().tokens);
  std::vector<GenerationRequest> all;
  for (const auto& p : prompts) all.push_back(request(p, new_tokens));
  for (auto& r : engine.generate(all)) out.outputs.push_back(r.tokens);
  out.stats = engine.stats();
  EXPECT_EQ(engine.blocks().num_used_blocks(), 0) << "references left after every request ended";
  return out;
}

class PrefixCacheGolden : public ::testing::TestWithParam<std::string> {};

TEST_P(PrefixCacheGolden, GreedyOutputsIdenticalWithAndWithoutCaching) {
  const fs::path dir = testing::kGoldenDir / GetParam();
  auto backend = make_cpu_backend();
  auto model = load_model(dir, *backend);
  const Prompts prompts = sharing_prompts(dir);
  int64_t prompt_tokens = 0;
  for (const auto& p : prompts) prompt_tokens += static_cast<int64_t>(p.size());

  EngineConfig ec;
  ec.block_size = 4;
  ec.num_blocks = 256;
  ec.max_batch_tokens = 64;  // several prefill chunks for the longer prompts when batched
  ec.prefix_caching = false;
  const RunResult off = run(*model, prompts, ec, 12);
  ec.prefix_caching = true;
  const RunResult on = run(*model, prompts, ec, 12);
  EXPECT_EQ(on.outputs, off.outputs);
  EXPECT_EQ(off.stats.prefix_cache.queries, 0u);
  EXPECT_EQ(off.stats.prefix_cache.hits, 0u);
  EXPECT_EQ(on.stats.prefix_cache.queries, static_cast<uint64_t>(2 * prompt_tokens));
  EXPECT_GT(on.stats.prefix_cache.hits, 0u);
  EXPECT_LT(on.stats.prefix_cache.hits, on.stats.prefix_cache.queries);

  // The fixture's own greedy continuation, with the prompt served from the cache.
  const testing::Golden g = testing::read_golden(dir);
  const size_t n = g.prompts[2].greedy.size();
  Engine engine(*model, nullptr, ec);
  EXPECT_EQ(engine.generate({request(g.prompts[2].ids, static_cast<int>(n))}).front().tokens, g.prompts[2].greedy);
  std::vector<TokenEvent> events;
  const auto again = engine.generate({request(g.prompts[2].ids, static_cast<int>(n))},
                                     [&](const TokenEvent& e) { events.push_back(e); });
  EXPECT_EQ(again.front().tokens, g.prompts[2].greedy);
  const int cached = static_cast<int>((g.prompts[2].ids.size() - 1) / 4 * 4);
  ASSERT_FALSE(events.empty());
  EXPECT_EQ(events.front().cached_tokens, cached);
  EXPECT_EQ(engine.stats().prefix_cache.hits, static_cast<uint64_t>(cached));
}

TEST_P(PrefixCacheGolden, PreemptionUnderASmallCacheKeepsOutputsAndCounts) {
  const fs::path dir = testing::kGoldenDir / GetParam();
  auto backend = make_cpu_backend();
  auto model = load_model(dir, *backend);
  const Prompts prompts = sharing_prompts(dir);
  EngineConfig ec;
  ec.block_size = 4;
  ec.num_blocks = 24;  // the longest request alone needs 16 blocks: the batch must preempt
  ec.max_batch_tokens = 32;
  ec.prefix_caching = false;
  const RunResult off = run(*model, prompts, ec, 16);
  ec.prefix_caching = true;
  const RunResult on = run(*model, prompts, ec, 16);
  EXPECT_GT(off.stats.preemptions, 0u);
  EXPECT_GT(on.stats.preemptions, 0u);
  EXPECT_EQ(on.outputs, off.outputs);
}

TEST_P(PrefixCacheGolden, SharedBlocksAreCountedOnce) {
  const fs::path dir = testing::kGoldenDir / GetParam();
  auto backend = make_cpu_backend();
  auto model = load_model(dir, *backend);
  const std::vector<int32_t> prompt = testing::golden_prompt_ids(dir)[2];
  EngineConfig ec;
  ec.block_size = 4;
  ec.num_blocks = 64;
  Engine engine(*model, nullptr, ec);
  const uint64_t a = engine.add(request(prompt, 8));
  engine.step();  // prefills a and registers its full blocks
  const int after_a = engine.blocks().num_used_blocks();
  const uint64_t b = engine.add(request(prompt, 8));
  engine.step();  // a decodes; b takes a's full blocks but the last
  const auto ta = engine.blocks().block_table(static_cast<SeqId>(a));
  const auto tb = engine.blocks().block_table(static_cast<SeqId>(b));
  const size_t shared = (prompt.size() - 1) / 4;
  ASSERT_GE(tb.size(), shared + 1);
  for (size_t i = 0; i < shared; ++i) {
    EXPECT_EQ(ta[i], tb[i]);
    EXPECT_EQ(engine.blocks().ref_count(ta[i]), 2);
  }
  EXPECT_NE(ta[shared], tb[shared]);
  const int a_grew = static_cast<int>(engine.blocks().blocks_for_tokens(static_cast<int64_t>(prompt.size()) + 1)) -
                     after_a;
  EXPECT_EQ(engine.blocks().num_used_blocks(), after_a + a_grew + static_cast<int>(tb.size() - shared));
  engine.cancel(a);
  EXPECT_EQ(engine.blocks().ref_count(tb[0]), 1);
  engine.cancel(b);
  EXPECT_EQ(engine.blocks().num_used_blocks(), 0);
  EXPECT_EQ(engine.stats().prefix_cache.hits, static_cast<uint64_t>(shared * 4));
  EXPECT_EQ(engine.stats().prefix_cache.queries, static_cast<uint64_t>(2 * prompt.size()));
}

INSTANTIATE_TEST_SUITE_P(Fixtures, PrefixCacheGolden, ::testing::Values("llama-gqa", "mistral-swa", "opt-preln"),
                         [](const ::testing::TestParamInfo<std::string>& param) {
                           std::string n = param.param;
                           for (char& c : n)
                             if (c == '-') c = '_';
                           return n;
                         });

}  // namespace
}  // namespace fineserve
