// `fineserve bench model` end to end on the golden OPT fixture and its int4 conversion: the table,
// the JSON result, and clear errors for bad flags. Speed figures are not asserted (CI machines are
// noisy); what is checked is that every figure is there and positive.
#include <filesystem>
#include <fstream>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "cli_util.h"

namespace fineserve {
namespace {
namespace fs = std::filesystem;
using testing::run_fineserve;
using testing::ScratchDir;

const fs::path kModel = fs::path(FINESERVE_TEST_DATA) / "golden" / "opt-preln";

TEST(BenchModelCli, MeasuresEveryModelAndWritesJson) {
  ScratchDir tmp;
  const fs::path int4 = tmp / "int4";
  auto q = run_fineserve("quantize --model " + kModel.string() + " --out " + int4.string() +
                         " --bits 4 --quantize-embeddings --quiet");
  ASSERT_EQ(q.status, 0) << q.output;
  const fs::path out = tmp / "result.json";
  auto r = run_fineserve("bench model --model " + kModel.string() + " --model " + int4.string() +
                         " --label dense --label int4 --prompt-tokens 8 --new-tokens 4 --reps 1 --rounds 2 --out " +
                         out.string());
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("decode vs dense"), std::string::npos) << r.output;

  const auto j = nlohmann::json::parse(std::ifstream(out));
  EXPECT_EQ(j["benchmark"], "model_cpu");
  const auto& res = j["results"];
  EXPECT_EQ(res["baseline"], "dense");
  ASSERT_EQ(res["runs"].size(), 2u);
  for (const auto& run : res["runs"]) {
    EXPECT_GT(run["prefill_tokens_per_s"].get<double>(), 0) << run.dump();
    EXPECT_GT(run["decode_tokens_per_s"].get<double>(), 0) << run.dump();
    EXPECT_EQ(run["decode_tokens_per_s_rounds"].size(), 2u);
  }
  EXPECT_EQ(res["runs"][0]["quantization"], "none");
  EXPECT_EQ(res["runs"][1]["quantization"], "finequant-int4");
  // The int4 model (embedding and tied LM head quantized too) reads fewer bytes per token.
  EXPECT_LT(res["runs"][1]["weight_bytes_per_token"].get<double>(),
            res["runs"][0]["weight_bytes_per_token"].get<double>() / 3);
  EXPECT_DOUBLE_EQ(res["runs"][0]["decode_vs_baseline"].get<double>(), 1.0);
  EXPECT_FALSE(res.contains("peer"));
}

// --cpu-path PATH@ISA: the same model through the reference and the best fast kernels, side by side.
TEST(BenchModelCli, CpuPathForcesTheKernelIsaPerModel) {
  ScratchDir tmp;
  const fs::path out = tmp / "paths.json";
  auto r = run_fineserve("bench model --model " + kModel.string() + " --model " + kModel.string() +
                         " --cpu-path exact@reference --cpu-path int8-act --label ref --label int8"
                         " --prompt-tokens 4 --new-tokens 3 --reps 1 --rounds 1 --out " + out.string());
  ASSERT_EQ(r.status, 0) << r.output;
  const auto j = nlohmann::json::parse(std::ifstream(out));
  ASSERT_EQ(j["results"]["runs"].size(), 2u);
  EXPECT_EQ(j["results"]["runs"][0]["cpu_path"], "exact@reference");
  EXPECT_EQ(j["results"]["runs"][1]["cpu_path"], "int8-act");
}

TEST(BenchModelCli, BadFlagsAreClearErrors) {
  ScratchDir tmp;
  auto r = run_fineserve("bench model");
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("--model"), std::string::npos) << r.output;

  r = run_fineserve("bench model --model " + (tmp / "missing").string());
  EXPECT_NE(r.status, 0);

  r = run_fineserve("bench model --model " + kModel.string() + " --llama-bench /bin/true --out " +
                    (tmp / "x.json").string());
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("--llama-bench and --gguf go together"), std::string::npos) << r.output;

  r = run_fineserve("bench model --model " + kModel.string() + " --label a --label b --out " +
                    (tmp / "x.json").string());
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("--label"), std::string::npos) << r.output;

  r = run_fineserve("bench model --model " + kModel.string() + " --new-tokens 2 --out " + (tmp / "x.json").string());
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("--new-tokens"), std::string::npos) << r.output;

  r = run_fineserve("bench model --model " + kModel.string() + " --cpu-path exact@avx9 --out " +
                    (tmp / "x.json").string());
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("unknown CPU kernel path 'avx9'"), std::string::npos) << r.output;
  r = run_fineserve("bench model --model " + kModel.string() + " --cpu-path fast --out " + (tmp / "x.json").string());
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("unknown CPU path 'fast'"), std::string::npos) << r.output;

  // A directory that is not a checkpoint.
  r = run_fineserve("bench model --model " + tmp.path().string() + " --out " + (tmp / "x.json").string());
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("error"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(tmp / "x.json"));
}

}  // namespace
}  // namespace fineserve
