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
#include "golden_util.h"

namespace fineserve {
namespace {
namespace fs = std::filesystem;
using testing::prefill_logits;
using testing::rel_max_error;

const fs::path kGolden = fs::path(FINESERVE_TEST_DATA) / "golden";

struct Golden {
  struct Prompt {
    std::string text;
    std::vector<int32_t> ids;
    std::vector<int32_t> greedy;
    std::vector<float> logits;  // [ids.size(), vocab]
  };
  std::vector<Prompt> prompts;
  int64_t vocab = 0;
};

Golden read_golden(const fs::path& dir) {
  Golden g;
  std::ifstream in(dir / "golden.json");
  const nlohmann::json j = nlohmann::json::parse(in);
  const ckpt::Checkpoint logits = ckpt::Checkpoint::open(dir / "golden.safetensors");
  for (size_t i = 0; i < j["prompts"].size(); ++i) {
    Golden::Prompt p;
    p.text = j["prompts"][i]["text"];
    p.ids = j["prompts"][i]["ids"].get<std::vector<int32_t>>();
    p.greedy = j["prompts"][i]["greedy"].get<std::vector<int32_t>>();
    const ckpt::TensorView t = logits.get("logits." + std::to_string(i));
    g.vocab = t.shape()[1];
    p.logits.resize(static_cast<size_t>(t.numel()));
    std::memcpy(p.logits.data(), t.data, t.nbytes());
    g.prompts.push_back(std::move(p));
  }
  return g;
}

std::vector<std::vector<int32_t>> greedy(Model& model, const Tokenizer& tok, const Golden& g, int max_batch_tokens) {
  EngineConfig ec;
  ec.num_blocks = 64;
  ec.max_batch_tokens = max_batch_tokens;
  Engine engine(model, &tok, ec);
  std::vector<GenerationRequest> reqs;
  for (const auto& p : g.prompts) {
    GenerationRequest r;
    r.prompt = p.ids;
    r.stop.max_new_tokens = static_cast<int>(p.greedy.size());
    r.ignore_eos = true;
    reqs.push_back(r);
  }
  std::vector<std::vector<int32_t>> out;
  for (auto& r : engine.generate(reqs)) out.push_back(r.tokens);
  return out;
}

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
    const auto out = greedy(*model, *tok, g, chunk);
    for (size_t i = 0; i < g.prompts.size(); ++i) EXPECT_EQ(out[i], g.prompts[i].greedy) << "chunk " << chunk;
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, OptGolden, ::testing::Values("opt-preln", "opt-postln-proj", "opt-outliers"));

}  // namespace
}  // namespace fineserve
