// OPT against golden logits and greedy continuations from Hugging Face transformers
// (tests/models/make_golden.py), dense and FineQuant int8 / int4.
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "engine/engine.h"
#include "kernels/backend.h"
#include "kernels/base.h"
#include "models/checkpoint/config.h"
#include "models/checkpoint/safetensors.h"
#include "models/model.h"
#include "models/tokenizer/tokenizer.h"
#include "quant/convert.h"
#include "quant/quantizer.h"
#include "tests/models/golden_util.h"

namespace fineserve {
namespace {
namespace fs = std::filesystem;
using testing::Golden;
using testing::greedy;
using testing::prefill_logits;
using testing::read_golden;
using testing::rel_max_error;

const fs::path& kGolden = testing::kGoldenDir;

class OptGolden : public ::testing::TestWithParam<std::string> {};

TEST_P(OptGolden, DenseLogitsAndGreedyMatchTransformers) {
  const fs::path dir = kGolden / GetParam();
  const Golden g = read_golden(dir);
  auto tok = load_tokenizer(dir);
  auto backend = make_cpu_backend();
  auto model = load_model(dir, *backend);
  ASSERT_EQ(model->info().vocab_size, g.vocab);
  for (const auto& p : g.prompts) {
    EXPECT_EQ(tok->encode(p.text), p.ids) << p.text;
    const double err = rel_max_error(prefill_logits(*model, p.ids), p.logits);
    EXPECT_LE(err, 1e-3) << GetParam() << ": " << p.text;
  }
  // Greedy continuations: the whole batch at once, and again with 3-token prefill chunks.
  for (int chunk : {512, 3}) {
    const auto out = greedy(*model, tok.get(), g, chunk);
    for (size_t i = 0; i < g.prompts.size(); ++i) EXPECT_EQ(out[i], g.prompts[i].greedy) << "chunk " << chunk;
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, OptGolden, ::testing::Values("opt-preln", "opt-postln-proj", "opt-outliers"));

}  // namespace
}  // namespace fineserve
