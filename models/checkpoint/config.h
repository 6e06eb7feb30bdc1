// config.json: reading it and parsing it into typed config structs.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>

#include <nlohmann/json.hpp>

#include "kernels/dtype.h"

namespace fineserve::ckpt {

// Reads and parses a JSON file; throws fineserve::Error naming the file (and the parse position).
nlohmann::json read_json_file(const std::filesystem::path& path);

// The "model_type" field ("opt", "llama", ...); throws when absent.
std::string model_type(const nlohmann::json& config, const std::string& source);

// Every OPT config.json field that changes the graph (HF OPTConfig defaults where a field is absent).
struct OptConfig {
  int64_t vocab_size = 50272;
  int64_t hidden_size = 768;
  int64_t num_hidden_layers = 12;
  int64_t ffn_dim = 3072;
  int64_t num_attention_heads = 12;
  int64_t max_position_embeddings = 2048;
  int64_t word_embed_proj_dim = 768;  // != hidden_size: project_in / project_out exist (opt-350m)
  bool do_layer_norm_before = true;    // false: post-LayerNorm (opt-350m)
  bool remove_final_layer_norm = false;  // "_remove_final_layer_norm"
  bool enable_bias = true;
  bool layer_norm_elementwise_affine = true;
  bool tie_word_embeddings = true;
  std::string activation_function = "relu";
  int64_t bos_token_id = 2;
  int64_t eos_token_id = 2;
  int64_t pad_token_id = 1;
  DType torch_dtype = DType::F16;

  int64_t head_dim() const { return hidden_size / num_attention_heads; }
  // OPT learns positions with an offset of 2: position p uses row p + 2.
  static constexpr int64_t kPositionOffset = 2;
  bool has_final_layer_norm() const { return do_layer_norm_before && !remove_final_layer_norm; }

  bool operator==(const OptConfig&) const = default;
};

// Parses and checks an OPT config (positive sizes, heads dividing hidden_size, known activation);
// throws fineserve::Error naming `source` and the field.
OptConfig parse_opt_config(const nlohmann::json& config, const std::string& source);
nlohmann::json to_json(const OptConfig& c);

}  // namespace fineserve::ckpt
