// A GGUF file made by llama.cpp's gguf-py from the llama-gqa golden model
// (tests/checkpoint/make_gguf_fixtures.py), imported, loaded and run: the tokenizer and the logits
// must be those of transformers.
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "kernels/backend.h"
#include "models/checkpoint/gguf_import.h"
#include "models/checkpoint/safetensors.h"
#include "models/model.h"
#include "models/tokenizer/tokenizer.h"
#include "tests/scratch_dir.h"

namespace fineserve {
namespace {
namespace fs = std::filesystem;

const fs::path kData = fs::path(FINESERVE_TEST_DATA);

TEST(LlamaGguf, ImportedModelMatchesTransformers) {
  const testing::ScratchDir scratch;
  const fs::path out = scratch / "imported";
  ckpt::GgufImportOptions o;
  o.gguf = kData / "gguf" / "tiny-llama.gguf";
  o.out = out;
  ckpt::import_gguf(o);

  const fs::path golden = kData / "golden" / "llama-gqa";
  const auto meta = nlohmann::json::parse(std::ifstream(golden / "golden.json"));
  const ckpt::Checkpoint logits = ckpt::Checkpoint::open(golden / "golden.safetensors");
  auto tok = load_tokenizer(out);
  auto backend = make_cpu_backend();
  auto model = load_model(out, *backend);
  EXPECT_EQ(model->info().architecture, "llama");
  EXPECT_EQ(model->info().bos_token_id, 1);
  EXPECT_EQ(model->info().eos_token_id, 2);
  EXPECT_EQ(tok->bos_id(), 1);
  for (size_t i = 0; i < meta["prompts"].size(); ++i) {
    const auto ids = meta["prompts"][i]["ids"].get<std::vector<int32_t>>();
    EXPECT_EQ(tok->encode(meta["prompts"][i]["text"].get<std::string>()), ids);

    model->allocate_kv_cache(16, 16);
    StepInput s;
    s.token_ids = ids;
    for (size_t t = 0; t < ids.size(); ++t) {
      s.positions.push_back(static_cast<int32_t>(t));
      s.logit_rows.push_back(static_cast<int32_t>(t));
    }
    s.query_start = {0, static_cast<int32_t>(ids.size())};
    s.context_len = {static_cast<int32_t>(ids.size())};
    s.max_blocks = static_cast<int>((ids.size() + 15) / 16);
    for (int b = 0; b < s.max_blocks; ++b) s.block_table.push_back(b);
    std::vector<float> got(ids.size() * static_cast<size_t>(model->info().vocab_size));
    model->forward(s, got.data());

    const ckpt::TensorView t = logits.get("logits." + std::to_string(i));
    std::vector<float> want(static_cast<size_t>(t.numel()));
    std::memcpy(want.data(), t.data, t.nbytes());
    ASSERT_EQ(got.size(), want.size());
    double num = 0, den = 0;
    for (size_t k = 0; k < got.size(); ++k) {
      num = std::max(num, std::abs(static_cast<double>(got[k]) - want[k]));
      den = std::max(den, std::abs(static_cast<double>(want[k])));
    }
    EXPECT_LE(num / den, 1e-3) << "prompt " << i;
  }
}

}  // namespace
}  // namespace fineserve
