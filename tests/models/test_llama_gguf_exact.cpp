// A quantized GGUF (tiny-llama-q.gguf: Q4_1, Q4_0, Q8_0 and one Q5_0 matrix, made by gguf-py,
// tests/checkpoint/make_gguf_fixtures.py) converted exactly (quant/gguf_convert.h) and run: the
// logits must be those of the dense fp32 import of the same file (the same weights, summed in another
// order), on the fast and the reference CPU backend, with the same greedy tokens; and under tensor
// parallelism (asymmetric matrices split by rows and by K, an asymmetric gate stacked beside a
// symmetric or re-quantized up projection) the same as on one rank.
#include <chrono>
#include <filesystem>

#include <gtest/gtest.h>

#include "engine/tp.h"
#include "kernels/cpu/cpu_backend.h"
#include "models/checkpoint/gguf_import.h"
#include "models/model.h"
#include "quant/gguf_convert.h"
#include "tests/models/golden_util.h"

namespace fineserve {
namespace {
namespace fs = std::filesystem;
using namespace std::chrono_literals;

const fs::path kGguf = fs::path(FINESERVE_TEST_DATA) / "gguf" / "tiny-llama-q.gguf";

TEST(LlamaGgufExact, ConvertedModelMatchesTheDenseImport) {
  const testing::ScratchDir scratch;
  quant::GgufConvertOptions o;
  o.gguf = kGguf;
  o.out = scratch / "native";
  quant::convert_gguf(o);
  ckpt::GgufImportOptions d;
  d.gguf = kGguf;
  d.out = scratch / "dense";
  d.dtype = DType::F32;
  ckpt::import_gguf(d);

  const auto prompts = testing::golden_prompt_ids(testing::kGoldenDir / "llama-gqa");
  auto dense_backend = make_cpu_backend();
  auto dense = load_model(d.out, *dense_backend);
  EXPECT_EQ(dense->info().source_format, "none");
  for (bool reference : {false, true}) {
    SCOPED_TRACE(reference ? "reference backend" : "fast backend");
    auto backend = make_cpu_backend(CpuOptions{.reference = reference});
    auto native = load_model(o.out, *backend);
    EXPECT_EQ(native->info().quantization, "finequant-int4");
    EXPECT_EQ(native->info().source_format.rfind("gguf:Q4_1,", 0), 0u) << native->info().source_format;
    EXPECT_NE(native->info().source_format.find("gguf:Q5_0/requantized"), std::string::npos);
    for (size_t i = 0; i < prompts.size(); ++i) {
      const std::vector<float> want = testing::prefill_logits(*dense, prompts[i]);
      const double err = testing::rel_max_error(testing::prefill_logits(*native, prompts[i]), want);
      // One matrix (the Q5_0 one) is re-quantized to int8: ~0.4 % of its weights' scale of error.
      EXPECT_LE(err, 2e-2) << "prompt " << i;
    }
    EXPECT_EQ(testing::greedy(*native, prompts, 8, 3), testing::greedy(*dense, prompts, 8, 3));
  }
}

TEST(LlamaGgufExact, TensorParallelMatchesOneRank) {
  const testing::ScratchDir scratch;
  quant::GgufConvertOptions o;
  o.gguf = kGguf;
  o.out = scratch / "native";
  quant::convert_gguf(o);
  const auto prompts = testing::golden_prompt_ids(testing::kGoldenDir / "llama-gqa");
  auto backend = make_cpu_backend(CpuOptions{.threads = 1});
  auto single = load_model(o.out, *backend);
  InprocTpOptions t;
  t.world = 2;
  t.timeout = 30s;
  t.make_backend = [](int) { return make_cpu_backend(CpuOptions{.threads = 1}); };
  auto tp = load_model_tp_inproc(o.out, t);
  for (size_t i = 0; i < prompts.size(); ++i)
    EXPECT_LE(testing::rel_max_error(testing::prefill_logits(*tp, prompts[i]), testing::prefill_logits(*single, prompts[i])),
              1e-5)
        << "prompt " << i;
  EXPECT_EQ(testing::greedy(*tp, prompts, 8, 3), testing::greedy(*single, prompts, 8, 3));
}

}  // namespace
}  // namespace fineserve
