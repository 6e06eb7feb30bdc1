// `fineserve synth`, `quantize` and `inspect` end to end, including bad input: every failure is a
// clear message, a non-zero exit, and no partial output.
#include <filesystem>
#include <fstream>
#include <set>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "cli_util.h"
#include "models/checkpoint/safetensors.h"

namespace fineserve {
namespace {
namespace fs = std::filesystem;
using testing::run_fineserve;
using testing::ScratchDir;

// Nothing but the named entries is left in dir (no temporary directories).
void expect_only(const fs::path& dir, const std::set<std::string>& names) {
  for (const auto& e : fs::directory_iterator(dir))
    EXPECT_TRUE(names.count(e.path().filename().string())) << "unexpected leftover " << e.path();
}

class QuantizeCli : public ::testing::Test {
 protected:
  void SetUp() override {
    const fs::path cfg = testing::write_tiny_opt_config(tmp / "cfg");
    auto r = run_fineserve("synth --config " + cfg.string() + " --out " + src.string() +
                           " --outlier-channels 2 --outlier-scale 30 --outlier-pattern 'layers\\.1\\.fc1' --seed 7");
    ASSERT_EQ(r.status, 0) << r.output;
  }
  ScratchDir tmp;
  fs::path src = tmp / "src";
};

TEST_F(QuantizeCli, Int4AdaptiveWritesCheckpointReportAndRefinesOutliers) {
  const fs::path out = tmp / "int4";
  auto r = run_fineserve("quantize --model " + src.string() + " --out " + out.string() + " --bits 4 --error-cap 0.99");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("compression"), std::string::npos) << r.output;
  for (const char* f : {"model.safetensors", "config.json", "quant_report.json"}) EXPECT_TRUE(fs::exists(out / f)) << f;

  const auto report = nlohmann::json::parse(std::ifstream(out / "quant_report.json"));
  int64_t outlier_group = 0, plain_group = 0;
  double outlier_err = 0;
  for (const auto& m : report["matrices"]) {
    if (m["name"] == "model.decoder.layers.1.fc1.weight") {
      outlier_group = m["group"];
      outlier_err = m["rel_error"];
    }
    if (m["name"] == "model.decoder.layers.0.fc1.weight") plain_group = m["group"];
  }
  EXPECT_EQ(plain_group, 128) << "i.i.d. Gaussian weights stay column-wise without the int4 error cap";
  EXPECT_LT(outlier_group, 128) << "planted outliers refine the group";
  EXPECT_LT(outlier_err, 0.2);

  const auto config = nlohmann::json::parse(std::ifstream(out / "config.json"));
  EXPECT_EQ(config["quantization_config"]["bits"], 4);
  EXPECT_EQ(config["quantization_config"]["groups"]["model.decoder.layers.1.fc1"], outlier_group);

  const ckpt::Checkpoint q = ckpt::Checkpoint::open(out);
  const ckpt::TensorView codes = q.get("model.decoder.layers.1.fc1.qweight");
  EXPECT_EQ(codes.dtype(), DType::U8);
  EXPECT_EQ(codes.shape(), (std::vector<int64_t>{256, 64}));
  EXPECT_EQ(q.get("model.decoder.layers.1.fc1.scales").shape(), (std::vector<int64_t>{256, 128 / outlier_group}));
  EXPECT_EQ(q.get("model.decoder.embed_tokens.weight").dtype(), DType::F16) << "embeddings stay fp16";
  EXPECT_EQ(q.metadata().at("bits"), "4");
  EXPECT_EQ(q.metadata().at("format"), "fineserve-finequant");
  EXPECT_FALSE(q.metadata().at("source_fingerprint").empty());

  auto ins = run_fineserve("inspect " + out.string());
  ASSERT_EQ(ins.status, 0) << ins.output;
  EXPECT_NE(ins.output.find("int4 g=" + std::to_string(outlier_group)), std::string::npos) << ins.output;
  expect_only(tmp.path(), {"cfg", "src", "int4"});
}

TEST_F(QuantizeCli, Int8FixedGroupAndDeterministic) {
  const fs::path a = tmp / "a", b = tmp / "b";
  ASSERT_EQ(run_fineserve("quantize -q --model " + src.string() + " --out " + a.string() + " --bits 8 --group 64").status, 0);
  ASSERT_EQ(run_fineserve("quantize -q --model " + src.string() + " --out " + b.string() + " --bits 8 --group 64").status, 0);
  const ckpt::Checkpoint q = ckpt::Checkpoint::open(a);
  EXPECT_EQ(q.get("model.decoder.layers.0.fc2.qweight").dtype(), DType::I8);
  const auto report = nlohmann::json::parse(std::ifstream(a / "quant_report.json"));
  for (const auto& m : report["matrices"]) {
    EXPECT_EQ(m["group"], 64) << m["name"];
    EXPECT_FALSE(m["levels"].empty()) << "range statistics are reported for a fixed group too";
    EXPECT_GT(m["absmax"].get<double>(), 0.0) << m["name"];
  }
  EXPECT_EQ(q.get("model.decoder.layers.0.fc2.scales").shape(), (std::vector<int64_t>{128, 4}));
  auto slurp = [](const fs::path& p) {
    std::ifstream in(p, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), {});
  };
  EXPECT_EQ(slurp(a / "model.safetensors"), slurp(b / "model.safetensors")) << "quantizing is deterministic";
}

TEST_F(QuantizeCli, MaxRelErrorMeetsTarget) {
  const fs::path out = tmp / "e";
  auto r = run_fineserve("quantize -q --model " + src.string() + " --out " + out.string() + " --bits 4 --max-rel-error 0.1");
  ASSERT_EQ(r.status, 0) << r.output;
  const auto report = nlohmann::json::parse(std::ifstream(out / "quant_report.json"));
  for (const auto& m : report["matrices"]) {
    if (m["target_met"]) {
      EXPECT_LE(m["rel_error"].get<double>(), 0.1 + 1e-9) << m["name"];
    }
  }
}

TEST_F(QuantizeCli, BadGroupFailsCleanlyWithoutOutput) {
  const fs::path out = tmp / "bad";
  auto r = run_fineserve("quantize --model " + src.string() + " --out " + out.string() + " --bits 4 --group 48");
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("--group 48 is not allowed"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(out));
  expect_only(tmp.path(), {"cfg", "src"});
}

TEST_F(QuantizeCli, ExistingOutputNeedsForce) {
  const fs::path out = tmp / "exists";
  fs::create_directories(out);
  auto r = run_fineserve("quantize --model " + src.string() + " --out " + out.string());
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("already exists"), std::string::npos) << r.output;
  r = run_fineserve("quantize -q --force --model " + src.string() + " --out " + out.string());
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_TRUE(fs::exists(out / "model.safetensors"));
}

TEST_F(QuantizeCli, UnwritableOutputIsAClearError) {
  auto r = run_fineserve("quantize --model " + src.string() + " --out /proc/fineserve-no/out");
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("error:"), std::string::npos) << r.output;
}

TEST_F(QuantizeCli, TruncatedSourceFailsWithoutOutput) {
  const fs::path st = src / "model.safetensors";
  fs::resize_file(st, fs::file_size(st) / 2);
  const fs::path out = tmp / "t";
  auto r = run_fineserve("quantize --model " + src.string() + " --out " + out.string());
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("model.safetensors"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(out));
  expect_only(tmp.path(), {"cfg", "src"});
}

TEST_F(QuantizeCli, MissingSourceAndBadFlags) {
  EXPECT_NE(run_fineserve("quantize --model " + (tmp / "nope").string() + " --out " + (tmp / "o").string()).status, 0);
  EXPECT_NE(run_fineserve("quantize --model " + src.string() + " --out " + (tmp / "o").string() + " --bits 5").status, 0);
  EXPECT_NE(run_fineserve("quantize --model " + src.string() + " --out " + (tmp / "o").string() +
                          " --alpha 1.2 --group 32").status, 0);
  EXPECT_NE(run_fineserve("quantize --model " + src.string() + " --out " + (tmp / "o").string() + " --alpha 0.5").status, 0);
  EXPECT_FALSE(fs::exists(tmp / "o"));
}

TEST(SynthCli, ShardedCheckpointQuantizes) {
  ScratchDir tmp;
  const fs::path cfg = testing::write_tiny_opt_config(tmp / "cfg");
  auto r = run_fineserve("synth --config " + cfg.string() + " --out " + (tmp / "s").string() + " --shard-gb 0.0002");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_TRUE(fs::exists(tmp / "s" / "model.safetensors.index.json"));
  r = run_fineserve("quantize -q --model " + (tmp / "s").string() + " --out " + (tmp / "q").string() + " --shard-gb 0.0001");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_TRUE(fs::exists(tmp / "q" / "model.safetensors.index.json"));
  const ckpt::Checkpoint q = ckpt::Checkpoint::open(tmp / "q");
  EXPECT_TRUE(q.has("model.decoder.layers.1.fc2.qweight"));
  EXPECT_GT(q.files().size(), 1u);
  for (const auto& f : q.files()) EXPECT_EQ(f->metadata().at("bits"), "4") << "every shard carries the metadata";
}

// --calibration: the source model runs on the text, and every matrix is quantized with the
// importance-weighted search (quant/calibration/); --calibration-tokens needs --calibration.
TEST(QuantizeCalibrationCli, TargetBitsWithCalibrationTextMarksEveryMatrix) {
  ScratchDir tmp;
  const fs::path model = fs::path(FINESERVE_TEST_DATA) / "golden" / "llama-gqa";
  const fs::path text = tmp / "calibration.txt";
  std::ofstream(text) << "In the beginning was the word, and the word was with the model. "
                         "Four score and seven years ago our fathers brought forth a new nation.\n";
  const fs::path out = tmp / "q";
  auto r = run_fineserve("quantize --model " + model.string() + " --out " + out.string() +
                         " --bits 4 --target-bits 4.5 --calibration " + text.string() + " --calibration-tokens 40");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("calibrated search ("), std::string::npos) << r.output;
  const auto report = nlohmann::json::parse(std::ifstream(out / "quant_report.json"));
  EXPECT_NE(report["options"]["calibration"].get<std::string>().find("tokens"), std::string::npos);
  ASSERT_FALSE(report["matrices"].empty());
  for (const auto& m : report["matrices"]) EXPECT_TRUE(m["calibrated"].get<bool>()) << m["name"];

  r = run_fineserve("quantize --model " + model.string() + " --out " + (tmp / "q2").string() +
                    " --bits 4 --calibration-tokens 40");
  EXPECT_NE(r.status, 0);
  EXPECT_FALSE(fs::exists(tmp / "q2"));
}

}  // namespace
}  // namespace fineserve
