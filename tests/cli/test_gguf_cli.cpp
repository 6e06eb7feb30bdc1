// `fineserve import-gguf` (exact by default, dense with --dtype), `inspect` showing each matrix's
// source format, and `generate --model FILE.gguf` (converted beside the file, then reused), on the
// quantized GGUF fixture made by gguf-py (tests/checkpoint/make_gguf_fixtures.py).
#include <filesystem>
#include <sstream>
#include <string>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "cli_util.h"

namespace fineserve {
namespace {
namespace fs = std::filesystem;
using testing::run_fineserve;
using testing::ScratchDir;

const fs::path kGguf = fs::path(FINESERVE_TEST_DATA) / "gguf" / "tiny-llama-q.gguf";

// The completion `generate` printed: its output without log lines ("[time] [level] ...") and the
// speed line (stderr, so it may land inside the completion's last line).
std::string completion(const std::string& output) {
  std::string out, line;
  std::istringstream in(output);
  while (std::getline(in, line)) {
    if (line.starts_with("[")) continue;
    if (const size_t at = line.find("prompt: "); at != std::string::npos && line.find(" tokens in ", at) != std::string::npos)
      line.erase(at);
    out += line + "\n";
  }
  return out;
}

TEST(GgufCli, ImportIsExactByDefaultAndInspectShowsSourceFormats) {
  ScratchDir tmp;
  auto r = run_fineserve("import-gguf " + kGguf.string() + " --out " + (tmp / "exact").string());
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("15 matrices exact, 1 re-quantized"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("blk.1.ffn_up.weight"), std::string::npos) << "the warning names the tensor: " << r.output;

  r = run_fineserve("inspect " + (tmp / "exact").string());
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("int4 g=32 asym (gguf:Q4_1)"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("int4 g=32 (gguf:Q4_0)"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("int8 g=32 (gguf:Q5_0/requantized)"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("source formats = gguf:"), std::string::npos) << r.output;

  r = run_fineserve("inspect --json " + (tmp / "exact").string());
  ASSERT_EQ(r.status, 0) << r.output;
  const auto j = nlohmann::json::parse(r.output);
  bool found = false;
  for (const auto& t : j["tensors"])
    if (t["name"] == "model.layers.0.self_attn.q_proj.qweight") {
      EXPECT_EQ(t["source_format"], "gguf:Q4_1");
      EXPECT_EQ(t["asymmetric"], true);
      found = true;
    }
  EXPECT_TRUE(found);

  // --dtype f16: the dense reference, as before.
  r = run_fineserve("import-gguf " + kGguf.string() + " --out " + (tmp / "dense").string() + " --dtype f16");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_TRUE(fs::exists(tmp / "dense" / "model.safetensors"));
  r = run_fineserve("inspect --json " + (tmp / "dense").string());
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(r.output.find("qweight"), std::string::npos) << "every tensor dense";
}

TEST(GgufCli, GenerateServesAGgufFileDirectly) {
  ScratchDir tmp;
  const fs::path gguf = tmp / "tiny.gguf";
  fs::copy_file(kGguf, gguf);
  ASSERT_EQ(run_fineserve("import-gguf " + kGguf.string() + " --out " + (tmp / "exact").string()).status, 0);
  const std::string args = " --prompt 'And God said' --max-new-tokens 6 --ignore-eos";
  const auto via_dir = run_fineserve("generate --model " + (tmp / "exact").string() + args);
  ASSERT_EQ(via_dir.status, 0) << via_dir.output;
  const auto via_file = run_fineserve("generate --model " + gguf.string() + args);
  ASSERT_EQ(via_file.status, 0) << via_file.output;
  EXPECT_TRUE(fs::exists(tmp / "tiny.fineserve" / "config.json"));
  EXPECT_EQ(completion(via_file.output), completion(via_dir.output)) << via_file.output << "\n" << via_dir.output;
  EXPECT_FALSE(completion(via_dir.output).empty());
  const auto again = run_fineserve("generate --model " + gguf.string() + args);
  ASSERT_EQ(again.status, 0) << again.output;
  EXPECT_NE(again.output.find("serving its conversion"), std::string::npos) << again.output;

  // A truncated GGUF is a clear error naming the file, not a crash.
  const fs::path cut = tmp / "cut.gguf";
  fs::copy_file(kGguf, cut);
  fs::resize_file(cut, fs::file_size(cut) / 2);
  const auto bad = run_fineserve("generate --model " + cut.string() + args);
  EXPECT_NE(bad.status, 0);
  EXPECT_NE(bad.output.find(cut.string()), std::string::npos) << bad.output;
}

// A GGUF with a SentencePiece vocabulary (Llama 2 style) served directly: its conversion carries the
// vocabulary as tokenizer.model, and generates what the dense import does.
TEST(GgufCli, GenerateServesASentencePieceGguf) {
  ScratchDir tmp;
  const fs::path spm = fs::path(FINESERVE_TEST_DATA) / "gguf" / "tiny-llama-spm.gguf";
  const fs::path gguf = tmp / "spm.gguf";
  fs::copy_file(spm, gguf);
  ASSERT_EQ(run_fineserve("import-gguf " + spm.string() + " --dtype f16 --out " + (tmp / "dense").string()).status, 0);
  const std::string args = " --prompt 'In the beginning' --max-new-tokens 6 --ignore-eos";
  const auto via_file = run_fineserve("generate --model " + gguf.string() + args);
  ASSERT_EQ(via_file.status, 0) << via_file.output;
  EXPECT_TRUE(fs::exists(tmp / "spm.fineserve" / "tokenizer.model"));
  EXPECT_FALSE(fs::exists(tmp / "spm.fineserve" / "tokenizer.json"));
  const auto via_dir = run_fineserve("generate --model " + (tmp / "dense").string() + args);
  ASSERT_EQ(via_dir.status, 0) << via_dir.output;
  EXPECT_FALSE(completion(via_file.output).empty());
  EXPECT_EQ(completion(via_file.output), completion(via_dir.output)) << via_file.output << "\n" << via_dir.output;
}

}  // namespace
}  // namespace fineserve
