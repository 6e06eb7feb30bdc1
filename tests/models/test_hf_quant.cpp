// Hugging Face quantized checkpoints (GPTQ, AWQ, compressed-tensors) loaded as they are, and Qwen2,
// against logits and greedy tokens from transformers (scripts/make_hf_quant_fixtures.py: each
// fixture quantized and packed by its format's own package); and the errors for what is not
// supported.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <functional>
#include <filesystem>
#include <fstream>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "engine/tp.h"
#include "kernels/backend.h"
#include "kernels/cpu/cpu_backend.h"
#include "kernels/base.h"
#include "models/checkpoint/config.h"
#include "models/checkpoint/hf_quant.h"
#include "models/model.h"
#include "tests/models/golden_util.h"

namespace fineserve {
namespace {
namespace fs = std::filesystem;
using testing::Golden;
using testing::Scratch;

const fs::path kDir = fs::path(FINESERVE_TEST_DATA) / "hf_quant";

// The fixtures with the quantization FineServe must report for them.
struct Fixture {
  const char* name;
  const char* architecture;
  const char* quantization;
};
const Fixture kFixtures[] = {
    {"qwen2-tied", "qwen2", "none"},
    {"qwen2-untied", "qwen2", "none"},
    {"ct-w4a16-asym-g32-qwen2", "qwen2", "compressed-tensors-int4"},
    {"ct-w4a16-sym-g64-llama", "llama", "compressed-tensors-int4"},
    {"ct-w8a16-sym-channel-llama", "llama", "compressed-tensors-int8"},
    {"ct-w8a16-asym-g32-qwen2", "qwen2", "compressed-tensors-int8"},
    {"gptq-4bit-g32-asym-llama", "llama", "gptq-int4"},
    {"gptq-4bit-g32-sym-actorder-qwen2", "qwen2", "gptq-int4"},
    {"gptq-8bit-gK-sym-llama", "llama", "gptq-int8"},
    {"awq-g32-qwen2", "qwen2", "awq-int4"},
    {"awq-g64-llama", "llama", "awq-int4"},
};

class HfQuantGolden : public ::testing::TestWithParam<Fixture> {};

TEST_P(HfQuantGolden, LogitsAndGreedyMatchTransformers) {
  const Fixture f = GetParam();
  const fs::path dir = kDir / f.name;
  ASSERT_TRUE(fs::exists(dir / "golden.json")) << dir;
  const Golden g = testing::read_golden(dir);
  auto backend = make_cpu_backend();
  auto model = load_model(dir, *backend);
  ASSERT_EQ(model->info().vocab_size, g.vocab);
  EXPECT_EQ(model->info().architecture, f.architecture);
  EXPECT_EQ(model->info().quantization, f.quantization);
  for (const auto& p : g.prompts) {
    // The reference multiplies by the same weights, s · (q − z) computed in fp32 from the saved
    // codes, scales and zero points; FineServe computes s · c + o with o = s · (2^(b−1) − z), exact
    // in fp32, so the weights agree to an ulp and only the order of fp32 sums differs (the CPU
    // fast path accumulates per group, then adds the groups): the dense fixtures' bound
    // (test_llama_golden.cpp), which holds with a margin of ~10 (measured up to 1.2e-6). A misread
    // code, scale or zero point moves logits by 1e-2 and more.
    const double err = testing::rel_max_error(testing::prefill_logits(*model, p.ids), p.logits);
    EXPECT_LE(err, 1e-5) << f.name;
    std::printf("%s: logits vs transformers: rel max error %.2e\n", f.name, err);
  }
  for (int chunk : {512, 3}) {
    const auto out = testing::greedy(*model, nullptr, g, chunk);
    for (size_t i = 0; i < g.prompts.size(); ++i) EXPECT_EQ(out[i], g.prompts[i].greedy) << f.name << " chunk " << chunk;
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, HfQuantGolden, ::testing::ValuesIn(kFixtures),
                         [](const ::testing::TestParamInfo<Fixture>& param) {
                           std::string name = param.param.name;
                           std::replace(name.begin(), name.end(), '-', '_');
                           return name;
                         });

// A copy of fixture `name` in a scratch directory, with `edit` applied to its config.json.
fs::path edited_copy(const Scratch& scratch, const std::string& name, const std::function<void(nlohmann::json&)>& edit) {
  static int copies = 0;  // each edit gets a directory of its own
  const fs::path out = scratch.path() / (name + "." + std::to_string(copies++));
  fs::copy(kDir / name, out, fs::copy_options::recursive);
  nlohmann::json config = ckpt::read_json_file(out / "config.json");
  edit(config);
  std::ofstream(out / "config.json") << config.dump(1);
  return out;
}

// The message load_model throws for `dir` ("" when it loads).
std::string load_error(const fs::path& dir) {
  auto backend = make_cpu_backend();
  try {
    load_model(dir, *backend);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

void expect_error(const fs::path& dir, std::initializer_list<const char*> parts) {
  const std::string msg = load_error(dir);
  ASSERT_FALSE(msg.empty()) << dir << " loaded";
  for (const char* part : parts) EXPECT_NE(msg.find(part), std::string::npos) << "'" << part << "' not in: " << msg;
}

TEST(HfQuantErrors, UnsupportedQuantizationConfigValuesNameFieldAndValue) {
  const Scratch scratch;
  const char* gptq = "gptq-4bit-g32-asym-llama";
  const char* awq = "awq-g32-qwen2";
  const char* ct = "ct-w4a16-sym-g64-llama";
  for (const char* name : {gptq, awq, ct}) ASSERT_TRUE(fs::exists(kDir / name)) << name;
  expect_error(edited_copy(scratch, gptq, [](auto& c) { c["quantization_config"]["bits"] = 3; }),
               {"\"bits\"", "is 3", "4 or 8"});
  expect_error(edited_copy(scratch, gptq, [](auto& c) { c["quantization_config"]["quant_method"] = "bitsandbytes"; }),
               {"\"quant_method\"", "'bitsandbytes'"});
  expect_error(edited_copy(scratch, gptq, [](auto& c) { c["quantization_config"]["group_size"] = 0; }),
               {"\"group_size\"", "is 0"});
  expect_error(edited_copy(scratch, gptq, [](auto& c) { c["quantization_config"]["checkpoint_format"] = "marlin"; }),
               {"\"checkpoint_format\"", "'marlin'"});
  // A group the codes could be read at, but FineServe's kernels do not run (power of two >= 32).
  expect_error(edited_copy(scratch, gptq, [](auto& c) { c["quantization_config"]["group_size"] = 16; }),
               {"group_size 16", "not a group FineServe's kernels run"});
  expect_error(edited_copy(scratch, awq, [](auto& c) { c["quantization_config"]["version"] = "gemv"; }),
               {"\"version\"", "'gemv'"});
  expect_error(edited_copy(scratch, awq, [](auto& c) { c["quantization_config"]["zero_point"] = false; }),
               {"\"zero_point\"", "false"});
  expect_error(edited_copy(scratch, ct, [](auto& c) { c["quantization_config"]["format"] = "float-quantized"; }),
               {"\"format\"", "'float-quantized'", "pack-quantized"});
  expect_error(edited_copy(scratch, ct,
                           [](auto& c) {
                             c["quantization_config"]["config_groups"]["group_0"]["input_activations"] = {
                                 {"num_bits", 8}, {"type", "int"}};
                           }),
               {"input_activations", "weight-only"});
  expect_error(edited_copy(scratch, ct,
                           [](auto& c) {
                             c["quantization_config"]["config_groups"]["group_0"]["weights"]["strategy"] = "tensor";
                           }),
               {"\"strategy\"", "'tensor'"});
}

TEST(HfQuantErrors, WrongShapesNameTheTensor) {
  const Scratch scratch;
  for (const char* name : {"gptq-4bit-g32-asym-llama", "awq-g64-llama", "ct-w4a16-sym-g64-llama"}) {
    ASSERT_TRUE(fs::exists(kDir / name)) << name;
    // A config whose FFN width the stored tensors do not have.
    expect_error(edited_copy(scratch, name, [](auto& c) { c["intermediate_size"] = 192; }),
                 {"layers.0.mlp.", "shape"});
  }
}

TEST(HfQuantErrors, TruncatedFilesAreRefusedWithoutACrash) {
  const Scratch scratch;
  for (const char* name : {"gptq-4bit-g32-asym-llama", "awq-g64-llama", "ct-w8a16-sym-channel-llama"}) {
    ASSERT_TRUE(fs::exists(kDir / name)) << name;
    const fs::path dir = edited_copy(scratch, name, [](auto&) {});
    const fs::path file = dir / "model.safetensors";
    fs::resize_file(file, fs::file_size(file) - 1000);
    expect_error(dir, {"model.safetensors"});
  }
}

// Tensor parallelism cuts the re-laid matrices like FineQuant ones (offsets with their scales).
// A row-parallel matrix in activation order cannot be cut: refused by name.
TEST(HfQuantTp, ShardsMatchOneRankAndActOrderRowParallelIsRefused) {
  using namespace std::chrono_literals;
  InprocTpOptions o;
  o.world = 2;
  o.timeout = 30s;
  o.make_backend = [](int) { return make_cpu_backend(CpuOptions{.reference = false, .threads = 1}); };
  for (const char* name : {"ct-w4a16-asym-g32-qwen2", "awq-g32-qwen2", "gptq-4bit-g32-asym-llama"}) {
    const fs::path dir = kDir / name;
    auto backend = make_cpu_backend();
    auto single = load_model(dir, *backend);
    auto tp = load_model_tp_inproc(dir, o);
    for (const auto& ids : testing::golden_prompt_ids(dir))
      EXPECT_LE(testing::rel_max_error(testing::prefill_logits(*tp, ids), testing::prefill_logits(*single, ids)), 1e-5)
          << name;
  }
  try {
    load_model_tp_inproc(kDir / "gptq-4bit-g32-sym-actorder-qwen2", o);
    ADD_FAILURE() << "an activation-order row-parallel matrix was split";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("activation order"), std::string::npos) << e.what();
  }
}

TEST(HfQuantConfig, ParsesEachFormatsFields) {
  using nlohmann::json;
  auto parse = [](const json& q) { return ckpt::parse_hf_quant_config(json{{"quantization_config", q}}, "c"); };
  const auto gptq = parse({{"quant_method", "gptq"}, {"bits", 8}, {"group_size", -1}, {"sym", false},
                           {"desc_act", true}, {"checkpoint_format", "gptq_v2"}});
  ASSERT_TRUE(gptq);
  EXPECT_EQ(gptq->method, ckpt::HfQuantMethod::Gptq);
  EXPECT_EQ(gptq->bits, 8);
  EXPECT_EQ(gptq->group_size, -1);
  EXPECT_FALSE(gptq->symmetric);
  EXPECT_TRUE(gptq->desc_act);
  EXPECT_FALSE(gptq->zeros_minus_one);
  EXPECT_TRUE(parse({{"quant_method", "gptq"}})->zeros_minus_one);  // v1 is the default serialization
  EXPECT_FALSE(parse({{"quant_method", "finequant"}}));              // FineServe's own
  EXPECT_FALSE(ckpt::parse_hf_quant_config(json{{"model_type", "llama"}}, "c"));
  const auto ct = parse({{"quant_method", "compressed-tensors"},
                         {"format", "pack-quantized"},
                         {"config_groups",
                          {{"g", {{"targets", {"Linear"}},
                                  {"weights", {{"num_bits", 4}, {"symmetric", false}, {"strategy", "group"},
                                               {"group_size", 32}, {"actorder", "group"}}}}}}}});
  ASSERT_TRUE(ct);
  EXPECT_EQ(ct->bits, 4);
  EXPECT_EQ(ct->group_size, 32);
  EXPECT_FALSE(ct->symmetric);
  EXPECT_TRUE(ct->desc_act);
  EXPECT_THROW(parse({{"quant_method", "awq"}, {"bits", 8}}), Error);
  EXPECT_THROW(parse({{"quant_method", "gptq"}, {"bits", "4"}}), Error);
  EXPECT_THROW(parse(json::array()), Error);
}

TEST(Qwen2Config, DefaultsAndSlidingWindowRefusal) {
  nlohmann::json c = {{"model_type", "qwen2"}, {"hidden_size", 64}, {"num_attention_heads", 4},
                      {"num_key_value_heads", 2}, {"intermediate_size", 128}, {"num_hidden_layers", 2},
                      {"vocab_size", 512}, {"sliding_window", 4096}};
  const ckpt::LlamaConfig q = ckpt::parse_llama_config(c, "c");
  EXPECT_TRUE(q.qkv_bias);
  EXPECT_FALSE(q.attention_bias);
  EXPECT_EQ(q.sliding_window, 0);  // sliding_window without use_sliding_window: full attention
  EXPECT_EQ(ckpt::parse_llama_config(ckpt::to_json(q), "round trip"), q);
  c["use_sliding_window"] = true;
  try {
    ckpt::parse_llama_config(c, "c");
    ADD_FAILURE() << "use_sliding_window accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("use_sliding_window"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace fineserve
