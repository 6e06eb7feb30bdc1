// The golden fixtures (OPT, Llama/Mistral, Mixtral) through load_model on the CUDA backend (skipped
// without a GPU): dense logits against transformers' within the activation dtype's tolerance,
// greedy continuations identical wherever the logit margin allows, and FineQuant int8 / int4
// checkpoints against the CPU backend on the same checkpoint.
//
// Tolerances (max |error| / max |logit|, as golden_util.h's rel_max_error). The CPU backend, all
// fp32, is within 1e-3 of transformers. On the GPU every activation is stored in the activation
// dtype between ops, each store a relative rounding of up to half an ulp (2^-11 ≈ 4.9e-4 in fp16,
// 2^-8 ≈ 3.9e-3 in bf16); through the fixtures' two layers of about a dozen ops each, and the LM
// head's sum over the hidden size, these add up to a few 1e-3 of the logit scale in fp16. The
// bounds (1e-2 fp16, 6e-2 bf16) leave about 3x headroom over that estimate.
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "engine/engine.h"
#include "kernels/backend.h"
#include "kernels/base.h"
#include "kernels/cuda/cuda_backend.h"
#include "models/checkpoint/safetensors.h"
#include "models/model.h"
#include "quant/convert.h"
#include "tests/models/golden_util.h"

#ifdef FINESERVE_HAVE_CUDA
#include "kernels/cuda/dequant.h"  // device_available
#endif

namespace fineserve {
namespace {
namespace fs = std::filesystem;
using testing::Golden;
using testing::Scratch;
using testing::greedy;
using testing::prefill_logits;
using testing::read_golden;
using testing::rel_max_error;

const fs::path& kGolden = testing::kGoldenDir;

double logit_tolerance(DType act) { return act == DType::F16 ? 1e-2 : 6e-2; }

// `got` must equal transformers' `want` up to the first step at which the two tokens' logits on
// this backend are within `margin` (relative to the step's largest |logit|) of each other: a
// near-tie that the activation dtype's rounding may resolve either way. After it the sequences may
// differ (they continue from different tokens).
void expect_greedy(Model& model, const std::vector<int32_t>& prompt, const std::vector<int32_t>& want,
                   const std::vector<int32_t>& got, double margin, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  size_t i = 0;
  while (i < got.size() && got[i] == want[i]) ++i;
  if (i == got.size()) return;
  std::vector<int32_t> seq = prompt;
  seq.insert(seq.end(), want.begin(), want.begin() + static_cast<std::ptrdiff_t>(i));
  const std::vector<float> logits = prefill_logits(model, seq);
  const size_t vocab = static_cast<size_t>(model.info().vocab_size);
  const float* last = logits.data() + (seq.size() - 1) * vocab;
  double scale = 0;
  for (size_t v = 0; v < vocab; ++v) scale = std::max(scale, static_cast<double>(std::fabs(last[v])));
  const double gap = std::fabs(static_cast<double>(last[want[i]]) - last[got[i]]);
  EXPECT_LE(gap, margin * scale) << what << ": step " << i << " chose token " << got[i] << " where transformers chose "
                                 << want[i] << ", and the logits separate them by " << gap << " (scale " << scale << ")";
  if (gap <= margin * scale)
    std::printf("%s: step %zu is a near-tie (gap %.3g of scale %.3g); continuations diverge from there\n",
                what.c_str(), i, gap, scale);
}

class CudaGolden : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
#ifdef FINESERVE_HAVE_CUDA
    if (!cuda::device_available()) GTEST_SKIP() << "no CUDA device";
#else
    GTEST_SKIP() << "built without CUDA";
#endif
  }
};

TEST_P(CudaGolden, DenseLogitsAndGreedyMatchTransformers) {
  const fs::path dir = kGolden / GetParam();
  const Golden g = read_golden(dir);
  for (DType act : {DType::F16, DType::BF16}) {
    const std::string what = GetParam() + (act == DType::F16 ? " fp16" : " bf16");
    auto backend = make_cuda_backend(0, act);
    auto model = load_model(dir, *backend);
    ASSERT_EQ(model->info().vocab_size, g.vocab);
    for (size_t i = 0; i < g.prompts.size(); ++i) {
      const double err = rel_max_error(prefill_logits(*model, g.prompts[i].ids), g.prompts[i].logits);
      EXPECT_LE(err, logit_tolerance(act)) << what << " prompt " << i;
      std::printf("%s prompt %zu: logits vs transformers: rel max error %.2e\n", what.c_str(), i, err);
    }
    // The whole batch at once, and again with 3-token prefill chunks mixed with decodes.
    for (int chunk : {512, 3}) {
      const auto out = greedy(*model, nullptr, g, chunk);
      ASSERT_EQ(out.size(), g.prompts.size());
      for (size_t i = 0; i < g.prompts.size(); ++i)
        expect_greedy(*model, g.prompts[i].ids, g.prompts[i].greedy, out[i], 2 * logit_tolerance(act),
                      what + " chunk " + std::to_string(chunk) + " prompt " + std::to_string(i));
    }
  }
}

// FineQuant checkpoints: the CUDA backend (fp16) against the CPU backend on the same codes.
TEST_P(CudaGolden, QuantizedMatchesTheCpuBackend) {
  const fs::path dir = kGolden / GetParam();
  const Golden g = read_golden(dir);
  for (int bits : {8, 4}) {
    Scratch tmp;
    const quant::ConvertOptions o = testing::convert_options(dir, tmp.path() / "q", bits);
    quant::convert_checkpoint(o);
    auto cpu = make_cpu_backend();
    auto gpu = make_cuda_backend(0, DType::F16);
    auto on_cpu = load_model(o.out, *cpu);
    auto on_gpu = load_model(o.out, *gpu);
    EXPECT_EQ(on_gpu->info().quantization, on_cpu->info().quantization);
    for (size_t i = 0; i < g.prompts.size(); ++i) {
      const double err = rel_max_error(prefill_logits(*on_gpu, g.prompts[i].ids), prefill_logits(*on_cpu, g.prompts[i].ids));
      EXPECT_LE(err, logit_tolerance(DType::F16)) << GetParam() << " int" << bits << " prompt " << i;
      std::printf("%s int%d prompt %zu: CUDA vs CPU rel max error %.2e\n", GetParam().c_str(), bits, i, err);
    }
    const auto out = greedy(*on_gpu, nullptr, g, 3);
    const auto want = greedy(*on_cpu, nullptr, g, 3);
    for (size_t i = 0; i < g.prompts.size(); ++i)
      expect_greedy(*on_gpu, g.prompts[i].ids, want[i], out[i], 2 * logit_tolerance(DType::F16),
                    GetParam() + " int" + std::to_string(bits) + " prompt " + std::to_string(i));
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, CudaGolden,
                         ::testing::Values("opt-preln", "opt-postln-proj", "opt-outliers", "llama-gqa",
                                           "llama-rope3-bias", "mistral-swa", "mixtral-moe"),
                         [](const ::testing::TestParamInfo<std::string>& i) {
                           std::string n = i.param;
                           std::replace(n.begin(), n.end(), '-', '_');
                           return n;
                         });

}  // namespace
}  // namespace fineserve
