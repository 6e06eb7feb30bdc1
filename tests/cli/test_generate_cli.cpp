// `fineserve generate` end to end on the golden OPT fixture, and its bad-input behaviour.
#include <filesystem>
#include <fstream>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "cli_util.h"
#include "models/tokenizer/tokenizer.h"

namespace fineserve {
namespace {
namespace fs = std::filesystem;
using testing::run_fineserve;
using testing::ScratchDir;

const fs::path kModel = fs::path(FINESERVE_TEST_DATA) / "golden" / "opt-preln";

// A copy of the fixture that a test may break.
fs::path copy_model(const ScratchDir& tmp) {
  const fs::path dst = tmp / "model";
  fs::copy(kModel, dst, fs::copy_options::recursive);
  return dst;
}

TEST(GenerateCli, GreedyMatchesTransformersAndReportsSpeed) {
  const auto golden = nlohmann::json::parse(std::ifstream(kModel / "golden.json"));
  const auto& p = golden["prompts"][0];
  auto r = run_fineserve("generate --model " + kModel.string() + " --prompt '" + p["text"].get<std::string>() +
                         "' --max-new-tokens 16 --ignore-eos");
  ASSERT_EQ(r.status, 0) << r.output;
  auto tok = load_tokenizer(kModel);
  const std::string expected = tok->decode(p["greedy"].get<std::vector<int32_t>>());
  EXPECT_NE(r.output.find(expected), std::string::npos) << "expected: " << expected << "\n" << r.output;
  EXPECT_NE(r.output.find("decode: 15 tokens"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("tokens/s"), std::string::npos);
}

TEST(GenerateCli, PromptFromStdin) {
  const std::string cmd = "generate --model " + kModel.string() + " --max-new-tokens 4 < /dev/null";
  auto r = run_fineserve(cmd);
  EXPECT_NE(r.status, 0) << "an empty stdin is an empty prompt";
  EXPECT_NE(r.output.find("prompt is empty"), std::string::npos) << r.output;
  ScratchDir tmp;
  std::ofstream(tmp / "prompt.txt") << "And God said";
  r = run_fineserve("generate --model " + kModel.string() + " --max-new-tokens 4 --ignore-eos < " +
                    (tmp / "prompt.txt").string());
  EXPECT_EQ(r.status, 0) << r.output;
}

TEST(GenerateCli, EmptyPromptIsAnError) {
  auto r = run_fineserve("generate --model " + kModel.string() + " --prompt ''");
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("prompt is empty"), std::string::npos) << r.output;
}

TEST(GenerateCli, PromptLongerThanContextIsAnError) {
  std::string longp;
  for (int i = 0; i < 100; ++i) longp += "and the LORD said ";
  auto r = run_fineserve("generate --model " + kModel.string() + " --prompt '" + longp + "'");
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("context"), std::string::npos) << r.output;
}

TEST(GenerateCli, MissingTokenizerIsAnError) {
  ScratchDir tmp;
  const fs::path m = copy_model(tmp);
  fs::remove(m / "vocab.json");
  auto r = run_fineserve("generate --model " + m.string() + " --prompt hi");
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("tokenizer"), std::string::npos) << r.output;
}

TEST(GenerateCli, ConfigDisagreeingWithTensorsIsAnError) {
  ScratchDir tmp;
  const fs::path m = copy_model(tmp);
  auto cfg = nlohmann::json::parse(std::ifstream(m / "config.json"));
  cfg["ffn_dim"] = 640;
  std::ofstream(m / "config.json") << cfg.dump();
  auto r = run_fineserve("generate --model " + m.string() + " --prompt hi");
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("fc1.weight has shape [512, 128] but config.json implies [640, 128]"), std::string::npos)
      << r.output;
}

TEST(GenerateCli, UnknownDeviceIsAnError) {
  auto r = run_fineserve("generate --model " + kModel.string() + " --prompt hi --device tpu");
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("device 'tpu'"), std::string::npos) << r.output;
}

}  // namespace
}  // namespace fineserve
