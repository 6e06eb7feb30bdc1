// Tensor-parallel OPT with the in-process communicator: TP = 2 and 4 give TP = 1's logits and
// greedy tokens (dense fp16 fixtures computed in fp32; FineQuant int8/int4 with group sizes that
// split and column-wise ones), and splits that cannot work are refused with a clear error.
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "engine/engine.h"
#include "engine/tp.h"
#include "kernels/backend.h"
#include "kernels/cpu/cpu_backend.h"
#include "models/model.h"
#include "quant/convert.h"
#include "golden_util.h"

namespace fineserve {
namespace {
namespace fs = std::filesystem;
using namespace std::chrono_literals;
using testing::prefill_logits;
using testing::rel_max_error;

const fs::path& kGolden = testing::kGoldenDir;
using testing::Scratch;

std::unique_ptr<TpModel> load_tp(const fs::path& dir, int world) {
  InprocTpOptions o;
  o.world = world;
  o.timeout = 30s;
  o.make_backend = [](int) { return make_cpu_backend(CpuOptions{.reference = false, .threads = 1}); };
  return load_model_tp_inproc(dir, o);
}

// The model checked against TP = 1 on the same checkpoint.
void expect_tp_matches(const fs::path& dir, int world, double tol, const std::string& what) {
  auto backend = make_cpu_backend(CpuOptions{.reference = false, .threads = 1});
  auto single = load_model(dir, *backend);
  auto tp = load_tp(dir, world);
  EXPECT_EQ(tp->world(), world);
  EXPECT_EQ(tp->info().vocab_size, single->info().vocab_size);
  EXPECT_EQ(tp->kv_block_bytes(16) * static_cast<uint64_t>(world), single->kv_block_bytes(16))
      << "each rank caches its own heads only";
  const auto ps = testing::golden_prompt_ids(dir);
  for (size_t i = 0; i < ps.size(); ++i) {
    const double err = rel_max_error(prefill_logits(*tp, ps[i]), prefill_logits(*single, ps[i]));
    EXPECT_LE(err, tol) << what << " tp " << world << " prompt " << i;
    std::printf("%s tp %d prompt %zu: max |logit - tp1 logit| / max |tp1 logit| = %.2e\n", what.c_str(), world, i, err);
  }
  // Greedy continuations as one batch with 3-token prefill chunks: many steps, mixed prefill and
  // decode, the KV cache allocated through the TP model.
  EXPECT_EQ(testing::greedy(*tp, ps, 8, 3), testing::greedy(*single, ps, 8, 3)) << what << " tp " << world;
}

class OptTp : public ::testing::TestWithParam<std::string> {};

TEST_P(OptTp, DenseTp2And4MatchTp1) {
  for (int world : {2, 4}) expect_tp_matches(kGolden / GetParam(), world, 1e-5, GetParam());
}

// Every matrix is split, the LM head too (vocab-parallel: 512 rows divide by 2 and 4), so a rank
// reads exactly 1/world of the weight bytes a step reads at TP = 1. (Not opt-postln-proj: its
// project_in/out matrices are replicated.)
TEST(OptTp, EveryRankHoldsItsShareOfTheWeightsAndTheHead) {
  for (const char* name : {"opt-preln", "opt-outliers"}) {
    auto backend = make_cpu_backend(CpuOptions{.reference = false, .threads = 1});
    const uint64_t single = load_model(kGolden / name, *backend)->info().weight_bytes;
    for (int world : {2, 4})
      EXPECT_EQ(load_tp(kGolden / name, world)->info().weight_bytes * world, single) << name << " tp " << world;
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, OptTp, ::testing::Values("opt-preln", "opt-postln-proj", "opt-outliers"));

TEST(OptTpQuantized, Int8AndInt4MatchTp1) {
  // Fixed groups that split (32 divides out_proj's K / 4 = 32 and fc2's 512 / 4 = 128) and
  // column-wise matrices (group = K), which split exactly by keeping each row's scale.
  struct Case {
    int bits;
    int64_t group;
  };
  for (const Case c : {Case{8, 32}, Case{4, 32}, Case{4, -1}, Case{8, -1}}) {
    Scratch tmp;
    quant::ConvertOptions o;
    o.model = kGolden / "opt-preln";
    o.out = tmp.path() / "q";
    o.group.bits = c.bits;
    o.group.mode = quant::GroupMode::Fixed;
    o.group.group = c.group;
    o.keep = quant::default_keep_patterns();
    quant::convert_checkpoint(o);
    const std::string what = "int" + std::to_string(c.bits) + " group " + std::to_string(c.group);
    for (int world : {2, 4}) expect_tp_matches(o.out, world, 1e-4, what);
  }
}

// The tied LM head on FineQuant codes (quantize --quantize-embeddings), split by vocabulary.
TEST(OptTpQuantized, QuantizedTiedHeadIsVocabParallel) {
  for (int bits : {8, 4}) {
    Scratch tmp;
    quant::ConvertOptions o;
    o.model = kGolden / "opt-preln";
    o.out = tmp.path() / "q";
    o.group.bits = bits;
    o.group.mode = quant::GroupMode::Fixed;
    o.group.group = 32;
    o.keep = quant::keep_patterns_quantizing_embeddings();
    quant::convert_checkpoint(o);
    for (int world : {2, 4}) expect_tp_matches(o.out, world, 1e-4, "int" + std::to_string(bits) + " +embeddings");
  }
}

TEST(OptTpQuantized, AdaptiveCheckpointMatchesTp1) {
  Scratch tmp;
  quant::ConvertOptions o;
  o.model = kGolden / "opt-outliers";
  o.out = tmp.path() / "q";
  o.group.bits = 4;
  o.keep = quant::default_keep_patterns();
  quant::convert_checkpoint(o);
  expect_tp_matches(o.out, 2, 1e-4, "adaptive int4");
}

std::string load_error(const fs::path& dir, int world) {
  try {
    load_tp(dir, world);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(OptTpErrors, HeadsNotDivisibleByTheWorldSize) {
  const std::string e = load_error(kGolden / "opt-preln", 3);
  EXPECT_NE(e.find("4 attention heads"), std::string::npos) << e;
  EXPECT_NE(e.find("3 ranks"), std::string::npos) << e;
}

TEST(OptTpErrors, QuantizedGroupsThatASplitWouldCut) {
  // Group 64 on K = 128 (out_proj): with 4 ranks each holds K = 32 columns, half a group.
  Scratch tmp;
  quant::ConvertOptions o;
  o.model = kGolden / "opt-preln";
  o.out = tmp.path() / "q";
  o.group.bits = 8;
  o.group.mode = quant::GroupMode::Fixed;
  o.group.group = 64;
  o.keep = quant::default_keep_patterns();
  quant::convert_checkpoint(o);
  const std::string e = load_error(o.out, 4);
  EXPECT_NE(e.find("out_proj"), std::string::npos) << e;
  EXPECT_NE(e.find("group size 64"), std::string::npos) << e;
  EXPECT_NE(e.find("4 ranks"), std::string::npos) << e;
  EXPECT_NE(e.find("per-rank K = 128 / 4 = 32"), std::string::npos) << e;
}

TEST(OptTp, WorldOfOneIsThePlainModel) {
  const fs::path dir = kGolden / "opt-preln";
  auto backend = make_cpu_backend(CpuOptions{.reference = false, .threads = 1});
  auto single = load_model(dir, *backend);
  auto tp = load_tp(dir, 1);
  const auto ps = testing::golden_prompt_ids(dir);
  EXPECT_EQ(prefill_logits(*tp, ps[0]), prefill_logits(*single, ps[0]));
}

TEST(OptTp, ABadStepIsReportedAndTheGroupCarriesOn) {
  // Every rank rejects the same step before any collective; the next step still runs.
  const fs::path dir = kGolden / "opt-preln";
  auto tp = load_tp(dir, 2);
  tp->allocate_kv_cache(16, 16);
  StepInput s;
  s.token_ids = {5};
  s.positions = {100000};
  s.query_start = {0, 1};
  s.context_len = {1};
  s.block_table = {0};
  s.max_blocks = 1;
  s.logit_rows = {0};
  std::vector<float> logits(static_cast<size_t>(tp->info().vocab_size));
  EXPECT_THROW(tp->forward(s, logits.data()), Error);
  const auto ps = testing::golden_prompt_ids(dir);
  auto backend = make_cpu_backend(CpuOptions{.reference = false, .threads = 1});
  auto single = load_model(dir, *backend);
  EXPECT_LE(rel_max_error(prefill_logits(*tp, ps[0]), prefill_logits(*single, ps[0])), 1e-5);
}

}  // namespace
}  // namespace fineserve
