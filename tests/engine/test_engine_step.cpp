// Engine::step driven directly, one step at a time, on a tiny random Llama: the scheduler rule of
// DESIGN (chunked prefill under the token budget, admission by free KV blocks, preemption of the
// youngest sequence and its recompute) checked through what each step scheduled, and the greedy
// tokens checked against runs where the rule never bites (one big step budget, a big cache).
//
// The model runs on the CPU reference backend: its ops sum each output row on its own in double,
// so a row's result does not depend on which other rows share the step, and a sequence's greedy
// tokens must be identical however the engine batches, chunks or recomputes it.
#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <vector>

#include <gtest/gtest.h>

#include "engine/engine.h"
#include "kernels/cpu/cpu_backend.h"
#include "models/synthetic.h"

namespace fineserve {
namespace {

const std::filesystem::path kGolden = std::filesystem::path(FINESERVE_TEST_DATA) / "golden";

// A fresh tiny random Llama (hidden 64, 2 layers, GQA 4/2 heads, vocab 512, context 128) on the
// reference backend. Weights of stddev 0.5 make the logits of neighbouring tokens differ clearly.
struct TinyModel {
  std::unique_ptr<Backend> backend = make_cpu_backend(CpuOptions{.reference = true});
  std::unique_ptr<Model> model;
  TinyModel() {
    SyntheticWeights w;
    w.dtype = DType::F32;
    w.stddev = 0.5;
    w.seed = 7;
    model = load_synthetic_model(
        make_synthetic_checkpoint(synthetic_config(kGolden / "llama-gqa" / "config.json", DType::F32), w), *backend);
  }
};

std::vector<int32_t> prompt_of(int n, int32_t first) {
  std::vector<int32_t> p;
  for (int i = 0; i < n; ++i) p.push_back(static_cast<int32_t>((first + 37 * i) % 500 + 3));
  return p;
}

GenerationRequest greedy_request(std::vector<int32_t> prompt, int max_new_tokens) {
  GenerationRequest r;
  r.prompt = std::move(prompt);
  r.sampling.temperature = 0;
  r.stop.max_new_tokens = max_new_tokens;
  r.ignore_eos = true;  // every request generates exactly max_new_tokens
  return r;
}

// Blocks of 4 tokens, so that a few dozen tokens span several blocks.
EngineConfig config_of(int num_blocks, int max_batch_tokens) {
  EngineConfig ec;
  ec.block_size = 4;
  ec.num_blocks = num_blocks;
  ec.max_batch_tokens = max_batch_tokens;
  return ec;
}

// Greedy tokens of each request run alone, with a budget and a cache the scheduler never hits.
std::vector<int32_t> solo(Model& model, const GenerationRequest& r) {
  Engine engine(model, nullptr, config_of(64, 512));
  return engine.generate({r}).front().tokens;
}

using Tokens = std::map<uint64_t, std::vector<int32_t>>;  // request id -> generated tokens

void collect(Tokens& tokens, const std::vector<TokenEvent>& events) {
  for (const TokenEvent& e : events) tokens[e.request_id].push_back(e.token);
}

// Steps the engine until idle, collecting each request's tokens; `on_step` sees the engine after
// every step.
template <typename F>
void run(Engine& engine, Tokens& tokens, F on_step) {
  for (int guard = 0; !engine.idle(); ++guard) {
    ASSERT_LT(guard, 1000) << "the engine does not finish";
    collect(tokens, engine.step());
    on_step(engine);
  }
}

TEST(EngineStep, ChunkedPrefillStaysUnderTheTokenBudget) {
  TinyModel tm;
  const GenerationRequest a = greedy_request(prompt_of(21, 1), 3), b = greedy_request(prompt_of(6, 2), 3);
  const EngineConfig ec = config_of(64, 8);
  Engine engine(*tm.model, nullptr, ec);
  const uint64_t ida = engine.add(a), idb = engine.add(b);

  // A's 21-token prompt goes in chunks of the whole budget (8, 8), then its last 5 tokens share
  // the third step with the first 3 of B's prompt (FCFS fills the budget left), and A samples.
  Tokens tokens;
  std::vector<TokenEvent> events = engine.step();
  EXPECT_EQ(engine.last_step().tokens, 8);
  EXPECT_EQ(engine.last_step().ids, std::vector<uint64_t>{ida});
  EXPECT_TRUE(events.empty()) << "no token before the prompt is in the cache";
  events = engine.step();
  EXPECT_EQ(engine.last_step().tokens, 8);
  EXPECT_TRUE(events.empty());
  events = engine.step();
  EXPECT_EQ(engine.last_step().tokens, 8);
  EXPECT_EQ(engine.last_step().ids, (std::vector<uint64_t>{ida, idb}));
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].request_id, ida);
  collect(tokens, events);
  // Next: A decodes 1 token, B's remaining 3 prompt tokens complete: both sample.
  events = engine.step();
  EXPECT_EQ(engine.last_step().tokens, 4);
  EXPECT_EQ(events.size(), 2u);
  collect(tokens, events);

  run(engine, tokens, [&](const Engine& e) { EXPECT_LE(e.last_step().tokens, ec.max_batch_tokens); });
  // Chunked, the prompts give the tokens of unchunked runs.
  EXPECT_EQ(tokens[ida], solo(*tm.model, a));
  EXPECT_EQ(tokens[idb], solo(*tm.model, b));
}

TEST(EngineStep, AdmitsOnlyWhenKvBlocksAreFree) {
  TinyModel tm;
  // 6 blocks of 4 tokens. A: 16-token prompt (4 blocks), growing to 19 tokens (5 blocks).
  // B: 12-token prompt (3 blocks): it fits the cache alone, but not beside A.
  const GenerationRequest a = greedy_request(prompt_of(16, 3), 4), b = greedy_request(prompt_of(12, 4), 4);
  const EngineConfig ec = config_of(6, 64);
  Engine engine(*tm.model, nullptr, ec);
  const uint64_t ida = engine.add(a), idb = engine.add(b);

  Tokens tokens;
  collect(tokens, engine.step());
  EXPECT_EQ(engine.last_step().ids, std::vector<uint64_t>{ida});
  EXPECT_EQ(engine.stats().waiting, 1);
  EXPECT_EQ(engine.stats().free_blocks, 2);

  bool a_done = false, b_started = false;
  run(engine, tokens, [&](const Engine& e) {
    const std::vector<uint64_t>& ids = e.last_step().ids;
    const bool has_b = std::find(ids.begin(), ids.end(), idb) != ids.end();
    if (has_b && !b_started) {
      b_started = true;
      EXPECT_TRUE(a_done) << "B was admitted while A held the blocks it needs";
    }
    if (e.stats().running == 0 || (e.stats().running == 1 && has_b)) a_done = true;
    EXPECT_GE(e.stats().free_blocks, 0);
  });
  EXPECT_TRUE(b_started);
  EXPECT_EQ(engine.stats().preemptions, 0u) << "waiting for blocks is not preemption";
  EXPECT_EQ(engine.stats().free_blocks, 6);
  EXPECT_EQ(tokens[ida], solo(*tm.model, a));
  EXPECT_EQ(tokens[idb], solo(*tm.model, b));
}

TEST(EngineStep, PreemptsTheYoungestAndItsRecomputeGivesTheSameTokens) {
  TinyModel tm;
  // 6 blocks of 4 tokens; A and B each have an 8-token prompt (2 blocks) and grow to 16 tokens
  // (4 blocks): both fit at first, but not both at full length.
  const GenerationRequest a = greedy_request(prompt_of(8, 5), 8), b = greedy_request(prompt_of(8, 6), 8);
  const EngineConfig ec = config_of(6, 64);
  Engine engine(*tm.model, nullptr, ec);
  const uint64_t ida = engine.add(a), idb = engine.add(b);

  Tokens tokens;
  uint64_t preempted_while_running = 0;
  bool a_ran_through = true;
  for (int guard = 0; !engine.idle() && guard < 1000; ++guard) {
    const uint64_t before = engine.stats().preemptions;
    collect(tokens, engine.step());
    const std::vector<uint64_t>& ids = engine.last_step().ids;
    const bool has_a = std::find(ids.begin(), ids.end(), ida) != ids.end();
    const bool has_b = std::find(ids.begin(), ids.end(), idb) != ids.end();
    if (engine.stats().preemptions > before) {
      ++preempted_while_running;
      // The victim is the youngest, B: A keeps its place in this very step, B is not scheduled.
      EXPECT_TRUE(has_a);
      EXPECT_FALSE(has_b);
    }
    if (tokens[ida].size() < 8 && !has_a) a_ran_through = false;
  }
  EXPECT_TRUE(engine.idle());
  EXPECT_GE(engine.stats().preemptions, 1u);
  EXPECT_EQ(preempted_while_running, engine.stats().preemptions);
  EXPECT_TRUE(a_ran_through) << "the oldest sequence was held back";
  // B recomputed its prompt and generated tokens from scratch: the same greedy tokens as alone.
  EXPECT_EQ(tokens[ida], solo(*tm.model, a));
  EXPECT_EQ(tokens[idb], solo(*tm.model, b));
  EXPECT_EQ(engine.stats().free_blocks, 6);
}

// The n choices of one request prefill the prompt once: choice 0 computes it, the others start
// after its full blocks from the prefix cache. Greedy, every choice gives the tokens of n = 1.
TEST(EngineStep, NChoicesShareOnePrefill) {
  TinyModel tm;
  const GenerationRequest one = greedy_request(prompt_of(23, 8), 5);  // 5 full blocks + 3 tokens
  GenerationRequest four = one;
  four.n = 4;
  const std::vector<int32_t> expected = solo(*tm.model, one);

  for (const bool caching : {true, false}) {
    SCOPED_TRACE(caching ? "prefix caching" : "no prefix caching");
    EngineConfig ec = config_of(64, 512);
    ec.prefix_caching = caching;
    Engine engine(*tm.model, nullptr, ec);
    engine.add(four);
    std::map<int, std::vector<int32_t>> by_choice;
    int64_t computed = 0;
    for (int guard = 0; !engine.idle(); ++guard) {
      ASSERT_LT(guard, 100);
      for (const TokenEvent& e : engine.step()) by_choice[e.choice].push_back(e.token);
      computed += engine.last_step().tokens;
      if (guard == 0) {
        EXPECT_EQ(engine.last_step().seqs, caching ? 1 : 4) << "who prefills in the first step";
      }
    }
    ASSERT_EQ(by_choice.size(), 4u);
    for (const auto& [choice, tokens] : by_choice) EXPECT_EQ(tokens, expected) << "choice " << choice;
    // Each choice feeds back its first 4 generated tokens (the 5th is never computed).
    const int64_t decodes = 4 * 4;
    const PrefixCacheStats pc = engine.stats().prefix_cache;
    if (caching) {
      // Choices 1..3 find the 5 full blocks (20 tokens) and compute the 3 tokens after them.
      EXPECT_EQ(pc.hits, 3u * 20u);
      EXPECT_EQ(computed, 23 + 3 * 3 + decodes);
    } else {
      EXPECT_EQ(pc.hits, 0u);
      EXPECT_EQ(computed, 4 * 23 + decodes);
    }
    EXPECT_EQ(engine.stats().free_blocks, 64);
  }
}

}  // namespace
}  // namespace fineserve
