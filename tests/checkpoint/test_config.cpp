// config.json reading, the OPT config and the presets in configs/models/.
#include "models/checkpoint/config.h"

#include <map>
#include <random>
#include <tuple>

#include <gtest/gtest.h>

#include "tests/checkpoint/test_util.h"

namespace fineserve::ckpt {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using testing::expect_error;
using testing::TempDir;
using testing::write_bytes;

fs::path presets_dir() { return fs::path(FINESERVE_TEST_DATA).parent_path().parent_path() / "configs" / "models"; }

TEST(Config, PresetsParseWithTheRealShapes) {
  // hidden, layers, heads, ffn as published for each OPT size.
  const std::map<std::string, std::tuple<int64_t, int64_t, int64_t, int64_t>> expected = {
      {"opt-125m", {768, 12, 12, 3072}},     {"opt-350m", {1024, 24, 16, 4096}},   {"opt-1.3b", {2048, 24, 32, 8192}},
      {"opt-2.7b", {2560, 32, 32, 10240}},   {"opt-6.7b", {4096, 32, 32, 16384}},  {"opt-13b", {5120, 40, 40, 20480}},
      {"opt-30b", {7168, 48, 56, 28672}},    {"opt-66b", {9216, 64, 72, 36864}},   {"opt-175b", {12288, 96, 96, 49152}},
  };
  std::map<std::string, OptConfig> seen;
  for (const auto& entry : fs::directory_iterator(presets_dir())) {
    if (entry.path().extension() != ".json") continue;
    if (!entry.path().stem().string().starts_with("opt-")) continue;  // other architectures: their own tests
    const std::string source = entry.path().string();
    const json j = read_json_file(entry.path());
    EXPECT_EQ(model_type(j, source), "opt") << source;
    EXPECT_EQ(j.at("architectures"), json::array({"OPTForCausalLM"})) << source;
    const OptConfig c = parse_opt_config(j, source);
    EXPECT_EQ(c.hidden_size % c.num_attention_heads, 0) << source;
    EXPECT_EQ(c.head_dim() * c.num_attention_heads, c.hidden_size) << source;
    EXPECT_EQ(parse_opt_config(to_json(c), "round trip"), c) << source;
    seen[entry.path().stem().string()] = c;
  }
  ASSERT_EQ(seen.size(), expected.size());
  for (const auto& [name, shape] : expected) {
    ASSERT_TRUE(seen.count(name)) << name;
    const OptConfig& c = seen[name];
    EXPECT_EQ(std::make_tuple(c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.ffn_dim), shape) << name;
    EXPECT_EQ(c.vocab_size, 50272) << name;
    EXPECT_EQ(c.max_position_embeddings, 2048) << name;
    EXPECT_EQ(c.activation_function, "relu") << name;
    EXPECT_EQ(c.torch_dtype, DType::F16) << name;
    EXPECT_EQ(std::make_tuple(c.bos_token_id, c.eos_token_id, c.pad_token_id), std::make_tuple(2, 2, 1)) << name;
    EXPECT_TRUE(c.enable_bias && c.layer_norm_elementwise_affine) << name;
    const bool is_350m = name == "opt-350m";
    EXPECT_EQ(c.word_embed_proj_dim, is_350m ? 512 : c.hidden_size) << name;
    EXPECT_EQ(c.do_layer_norm_before, !is_350m) << name;
    EXPECT_EQ(c.has_final_layer_norm(), !is_350m) << name;
  }
}

TEST(Config, HfDefaultsWhenAbsent) {
  const OptConfig c = parse_opt_config(json::object(), "empty");
  EXPECT_EQ(c, OptConfig{});
  const OptConfig wide = parse_opt_config(json{{"hidden_size", 1024}, {"num_attention_heads", 16}}, "wide");
  EXPECT_EQ(wide.word_embed_proj_dim, 1024);  // follows hidden_size
  const OptConfig nulls = parse_opt_config(json{{"word_embed_proj_dim", nullptr}, {"pad_token_id", nullptr}}, "n");
  EXPECT_EQ(nulls, OptConfig{});
  const OptConfig no_final = parse_opt_config(json{{"_remove_final_layer_norm", true}}, "r");
  EXPECT_TRUE(no_final.remove_final_layer_norm);
  EXPECT_FALSE(no_final.has_final_layer_norm());
  EXPECT_EQ(parse_opt_config(json{{"torch_dtype", "bfloat16"}}, "b").torch_dtype, DType::BF16);
  EXPECT_EQ(parse_opt_config(json{{"torch_dtype", "float32"}}, "f").torch_dtype, DType::F32);
}

TEST(Config, RandomConfigsRoundTrip) {
  std::mt19937 rng(1234);
  const char* acts[] = {"relu", "gelu", "gelu_new", "silu"};
  const DType dtypes[] = {DType::F16, DType::BF16, DType::F32};
  for (int i = 0; i < 50; ++i) {
    OptConfig c;
    c.num_attention_heads = 1 + static_cast<int64_t>(rng() % 40);
    c.hidden_size = c.num_attention_heads * (1 + static_cast<int64_t>(rng() % 200));
    c.vocab_size = 3 + static_cast<int64_t>(rng() % 100000);
    c.num_hidden_layers = 1 + static_cast<int64_t>(rng() % 100);
    c.ffn_dim = 1 + static_cast<int64_t>(rng() % 50000);
    c.max_position_embeddings = 1 + static_cast<int64_t>(rng() % 8192);
    c.word_embed_proj_dim = 1 + static_cast<int64_t>(rng() % 4096);
    c.do_layer_norm_before = rng() & 1;
    c.remove_final_layer_norm = rng() & 1;
    c.enable_bias = rng() & 1;
    c.layer_norm_elementwise_affine = rng() & 1;
    c.tie_word_embeddings = rng() & 1;
    c.activation_function = acts[rng() % 4];
    c.bos_token_id = static_cast<int64_t>(rng() % static_cast<uint32_t>(c.vocab_size));
    c.eos_token_id = static_cast<int64_t>(rng() % static_cast<uint32_t>(c.vocab_size));
    c.pad_token_id = static_cast<int64_t>(rng() % static_cast<uint32_t>(c.vocab_size));
    c.torch_dtype = dtypes[rng() % 3];
    EXPECT_EQ(parse_opt_config(to_json(c), "random"), c) << to_json(c).dump();
    EXPECT_EQ(parse_opt_config(json::parse(to_json(c).dump()), "random"), c);
  }
}

TEST(Config, BadFieldsNameTheField) {
  const auto bad = [](json patch, std::initializer_list<std::string> parts) {
    json j = json::object();
    j.update(patch);
    expect_error([&] { parse_opt_config(j, "cfg.json"); }, parts);
    expect_error([&] { parse_opt_config(j, "cfg.json"); }, {"cfg.json"});
  };
  bad({{"hidden_size", 0}}, {"\"hidden_size\"", "positive"});
  bad({{"hidden_size", -768}}, {"\"hidden_size\"", "positive"});
  bad({{"hidden_size", "768"}}, {"\"hidden_size\"", "integer"});
  bad({{"hidden_size", 768.0}}, {"\"hidden_size\"", "integer"});
  bad({{"hidden_size", 18446744073709551615ull}}, {"\"hidden_size\"", "too large"});
  bad({{"vocab_size", 0}}, {"\"vocab_size\""});
  bad({{"num_hidden_layers", -1}}, {"\"num_hidden_layers\""});
  bad({{"ffn_dim", 0}}, {"\"ffn_dim\""});
  bad({{"max_position_embeddings", 0}}, {"\"max_position_embeddings\""});
  bad({{"word_embed_proj_dim", 0}}, {"\"word_embed_proj_dim\""});
  bad({{"num_attention_heads", 0}}, {"\"num_attention_heads\"", "positive"});
  bad({{"num_attention_heads", 7}}, {"\"num_attention_heads\"", "(7) must divide hidden_size (768)"});
  bad({{"activation_function", "tanh"}}, {"\"activation_function\"", "'tanh'"});
  bad({{"activation_function", 3}}, {"\"activation_function\"", "string"});
  bad({{"torch_dtype", "int8"}}, {"\"torch_dtype\"", "'int8'"});
  bad({{"do_layer_norm_before", "yes"}}, {"\"do_layer_norm_before\"", "true or false"});
  bad({{"do_layer_norm_before", 1}}, {"\"do_layer_norm_before\""});
  bad({{"enable_bias", "true"}}, {"\"enable_bias\""});
  bad({{"_remove_final_layer_norm", 0}}, {"\"_remove_final_layer_norm\""});
  bad({{"pad_token_id", 50272}}, {"\"pad_token_id\"", "vocab_size"});
  bad({{"bos_token_id", -1}}, {"\"bos_token_id\""});
  bad({{"model_type", "llama"}}, {"\"model_type\"", "'llama'"});
  expect_error([] { parse_opt_config(json::array(), "cfg.json"); }, {"cfg.json", "object"});
}

TEST(Config, ModelType) {
  EXPECT_EQ(model_type(json{{"model_type", "llama"}}, "c"), "llama");
  expect_error([] { model_type(json::object(), "c.json"); }, {"c.json", "missing \"model_type\""});
  expect_error([] { model_type(json{{"model_type", 1}}, "c.json"); }, {"c.json", "\"model_type\" must be a string"});
}

TEST(Config, ReadJsonFileErrors) {
  TempDir dir;
  const auto missing = dir / "config.json";
  expect_error([&] { read_json_file(missing); }, {"cannot read " + missing.string() + ": No such file or directory"});
  write_bytes(missing, "{\n  \"a\": 1,\n  \"b\": }");
  expect_error([&] { read_json_file(missing); }, {missing.string(), "invalid JSON at byte 20"});
  write_bytes(missing, R"({"hidden_size": 1e400})");
  expect_error([&] { read_json_file(missing); }, {missing.string(), "invalid JSON"});
  write_bytes(missing, std::string("{}\0{", 4));
  expect_error([&] { read_json_file(missing); }, {missing.string(), "invalid JSON at byte 3"});
  write_bytes(missing, R"({"model_type": "opt"})");
  EXPECT_EQ(model_type(read_json_file(missing), missing.string()), "opt");
  expect_error([&] { read_json_file(dir.path()); }, {"cannot read " + dir.path().string()});
}

}  // namespace
}  // namespace fineserve::ckpt
