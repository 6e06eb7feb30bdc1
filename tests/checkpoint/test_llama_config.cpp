// The Llama / Mistral config.json parser: HF defaults, both rope formats, and clear errors.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "models/checkpoint/config.h"
#include "tests/checkpoint/test_util.h"

namespace fineserve::ckpt {
namespace {

using nlohmann::json;
using testing::expect_error;

json small() {
  return {{"model_type", "llama"}, {"vocab_size", 100}, {"hidden_size", 64}, {"intermediate_size", 96},
          {"num_hidden_layers", 2}, {"num_attention_heads", 4}};
}

TEST(LlamaConfig, DefaultsAsTransformers) {
  const LlamaConfig c = parse_llama_config(small(), "c.json");
  EXPECT_EQ(c.num_key_value_heads, 4);  // one KV head per query head
  EXPECT_EQ(c.head_dim, 16);
  EXPECT_EQ(c.rope_theta, 10000.0);
  EXPECT_EQ(c.rope_scaling.type, "default");
  EXPECT_EQ(c.rms_norm_eps, 1e-6);
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_EQ(c.hidden_act, "silu");
  EXPECT_EQ(c.sliding_window, 0);
  EXPECT_EQ(c.bos_token_id, 1);
  EXPECT_EQ(c.eos_token_ids, std::vector<int64_t>{2});
  EXPECT_EQ(c.pad_token_id, -1);

  // Mistral: absent num_key_value_heads is 8 and absent sliding_window 4096; null means "none".
  json m = small();
  m["model_type"] = "mistral";
  m["num_attention_heads"] = 16;
  const LlamaConfig mc = parse_llama_config(m, "m.json");
  EXPECT_EQ(mc.num_key_value_heads, 8);
  EXPECT_EQ(mc.sliding_window, 4096);
  EXPECT_EQ(mc.max_position_embeddings, 4096 * 32);
  m["sliding_window"] = nullptr;
  m["num_key_value_heads"] = nullptr;
  const LlamaConfig mc2 = parse_llama_config(m, "m.json");
  EXPECT_EQ(mc2.sliding_window, 0);
  EXPECT_EQ(mc2.num_key_value_heads, 16);
  EXPECT_EQ(parse_llama_config(to_json(mc), "round trip"), mc);
  m["attention_bias"] = true;  // Mistral's projections have no biases whatever the config says
  EXPECT_FALSE(parse_llama_config(m, "m.json").attention_bias);
}

TEST(LlamaConfig, MistralDefaultKvHeadsMustDivide) {
  json m = small();
  m["model_type"] = "mistral";  // absent num_key_value_heads is 8, which does not divide 4 heads
  expect_error([&] { parse_llama_config(m, "m.json"); }, {"m.json", "num_key_value_heads", "(8)"});
}

TEST(LlamaConfig, BothRopeFormats) {
  json legacy = small();
  legacy["rope_theta"] = 500000.0;
  legacy["rope_scaling"] = {{"type", "llama3"}, {"factor", 8.0}, {"low_freq_factor", 1.0}, {"high_freq_factor", 4.0},
                            {"original_max_position_embeddings", 8192}};
  const LlamaConfig a = parse_llama_config(legacy, "a.json");
  json v5 = small();
  v5["rope_parameters"] = {{"rope_type", "llama3"}, {"rope_theta", 500000}, {"factor", 8}, {"low_freq_factor", 1},
                           {"high_freq_factor", 4}, {"original_max_position_embeddings", 8192}};
  const LlamaConfig b = parse_llama_config(v5, "b.json");
  EXPECT_EQ(a, b);
  EXPECT_EQ(a.rope_theta, 500000.0);
  EXPECT_EQ(a.rope_scaling.type, "llama3");
  EXPECT_EQ(a.rope_scaling.factor, 8.0);
  EXPECT_EQ(a.rope_scaling.original_max_position_embeddings, 8192);
  // to_json writes the legacy form, which parses back to the same config.
  EXPECT_EQ(parse_llama_config(to_json(a), "round trip"), a);

  json linear = small();
  linear["rope_scaling"] = {{"rope_type", "linear"}, {"factor", 2}};
  EXPECT_EQ(parse_llama_config(linear, "l.json").rope_scaling.factor, 2.0);
}

TEST(LlamaConfig, EosListAndNullTokens) {
  json j = small();
  j["eos_token_id"] = {2, 5, 7};
  j["bos_token_id"] = nullptr;
  j["pad_token_id"] = 3;
  const LlamaConfig c = parse_llama_config(j, "c.json");
  EXPECT_EQ(c.eos_token_ids, (std::vector<int64_t>{2, 5, 7}));
  EXPECT_EQ(c.bos_token_id, -1);
  EXPECT_EQ(c.pad_token_id, 3);
  EXPECT_EQ(parse_llama_config(to_json(c), "round trip"), c);
}

TEST(LlamaConfig, ExplicitHeadDim) {
  json j = small();
  j["num_attention_heads"] = 3;  // 64 / 3 does not divide, but head_dim is given
  j["num_key_value_heads"] = 1;
  j["head_dim"] = 32;
  const LlamaConfig c = parse_llama_config(j, "c.json");
  EXPECT_EQ(c.head_dim, 32);
  j.erase("head_dim");
  expect_error([&] { parse_llama_config(j, "c.json"); }, {"c.json", "num_attention_heads", "hidden_size"});
}

TEST(LlamaConfig, BadFieldsAreClearErrors) {
  auto bad = [](const char* field, json value, std::initializer_list<std::string> parts) {
    json j = small();
    j[field] = value;
    expect_error([&] { parse_llama_config(j, "c.json"); }, parts);
  };
  bad("model_type", "gpt2", {"c.json", "model_type", "gpt2"});
  bad("hidden_size", 0, {"hidden_size", "positive"});
  bad("hidden_size", "64", {"hidden_size", "integer"});
  bad("num_key_value_heads", 3, {"num_key_value_heads", "divide"});
  bad("rms_norm_eps", "1e-6", {"rms_norm_eps", "number"});
  bad("rope_theta", -1.0, {"rope_theta", "positive"});
  bad("hidden_act", "swish", {"hidden_act", "swish"});
  bad("eos_token_id", 100, {"eos_token_id", "vocab_size"});
  bad("eos_token_id", json::array({1, "x"}), {"eos_token_id", "integer"});
  bad("bos_token_id", 1000, {"bos_token_id"});
  bad("torch_dtype", "int8", {"torch_dtype", "int8"});
  bad("rope_scaling", json{{"type", "dynamic"}, {"factor", 2.0}}, {"rope type 'dynamic' is not supported"});
  bad("rope_scaling", json{{"type", "yarn"}, {"factor", 2.0}}, {"'yarn'"});
  bad("rope_scaling", json{{"type", "linear"}}, {"factor", "required"});
  bad("rope_scaling", json{{"type", "linear"}, {"factor", 0.5}}, {"factor", ">= 1"});
  bad("rope_scaling", json{{"type", "llama3"}, {"factor", 8.0}, {"low_freq_factor", 1.0}, {"high_freq_factor", 4.0}},
      {"original_max_position_embeddings"});
  bad("rope_scaling", json{{"type", "llama3"}, {"factor", 8.0}, {"low_freq_factor", 4.0}, {"high_freq_factor", 1.0},
                           {"original_max_position_embeddings", 64}},
      {"high_freq_factor"});
  bad("rope_scaling", 3, {"rope_scaling", "object"});
  bad("head_dim", 15, {"head_dim", "even"});
}

}  // namespace
}  // namespace fineserve::ckpt
