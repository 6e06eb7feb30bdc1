// config.json: reading it and parsing it into typed config structs.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "kernels/dtype.h"
#include "kernels/ops.h"

namespace fineserve::ckpt {

// The kernel activation for a Hugging Face activation name (transformers' ACT2FN): relu, gelu,
// gelu_new and gelu_pytorch_tanh (the tanh approximation), silu. Throws fineserve::Error for others.
Activation activation_from_hf_name(const std::string& name);

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

// Rotary position embedding scaling, as config.json's "rope_scaling" (or transformers 5's
// "rope_parameters") describes it. The inverse frequencies it implies are computed by the model.
struct RopeScaling {
  std::string type = "default";  // "default" (none), "linear", "llama3"
  double factor = 1.0;           // linear, llama3
  double low_freq_factor = 1.0;  // llama3
  double high_freq_factor = 4.0;  // llama3
  int64_t original_max_position_embeddings = 0;  // llama3: the pre-training context

  bool operator==(const RopeScaling&) const = default;
};

// Every Llama / Mistral / Mixtral / Qwen2 config.json field that changes the graph (HF LlamaConfig /
// MistralConfig / MixtralConfig / Qwen2Config defaults where a field is absent). Mixtral is Mistral
// with each layer's MLP replaced by a sparse mixture of SwiGLU experts (num_local_experts > 0);
// Qwen2 is Llama with biases on the q/k/v projections (none on o_proj).
struct LlamaConfig {
  std::string model_type = "llama";  // "llama", "mistral", "mixtral" or "qwen2"
  int64_t vocab_size = 32000;
  int64_t hidden_size = 4096;
  int64_t intermediate_size = 11008;
  int64_t num_hidden_layers = 32;
  int64_t num_attention_heads = 32;
  int64_t num_key_value_heads = 32;  // < num_attention_heads: grouped-query attention
  int64_t head_dim = 128;            // hidden_size / num_attention_heads unless given
  int64_t max_position_embeddings = 2048;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  bool attention_bias = false;  // q/k/v/o projections have biases
  bool qkv_bias = false;        // q/k/v projections have biases, o_proj none (Qwen2, always)
  bool mlp_bias = false;        // gate/up/down projections have biases
  bool tie_word_embeddings = false;
  std::string hidden_act = "silu";
  int64_t sliding_window = 0;  // > 0: attend to the last sliding_window positions only (Mistral)
  int64_t bos_token_id = 1;    // -1: none
  std::vector<int64_t> eos_token_ids = {2};  // config.json allows one id or a list (Llama 3.1)
  int64_t pad_token_id = -1;
  DType torch_dtype = DType::F16;
  // Mixtral: experts per layer (0: a dense MLP) and experts each token is routed to. The router's
  // auxiliary loss (router_aux_loss_coef) and jitter only matter in training and are not read.
  int64_t num_local_experts = 0;
  int64_t num_experts_per_tok = 0;

  bool is_moe() const { return num_local_experts > 0; }
  bool operator==(const LlamaConfig&) const = default;
};

// Parses and checks a Llama, Mistral, Mixtral or Qwen2 config (model_type "llama" / "mistral" /
// "mixtral" / "qwen2"; Qwen2's use_sliding_window = true is refused): positive sizes, 1 <= num_experts_per_tok <= num_local_experts (Mixtral),
// heads dividing hidden_size or an explicit head_dim, num_key_value_heads dividing
// num_attention_heads, a known activation and rope scaling type. Throws fineserve::Error naming
// `source` and the field.
LlamaConfig parse_llama_config(const nlohmann::json& config, const std::string& source);
nlohmann::json to_json(const LlamaConfig& c);

}  // namespace fineserve::ckpt
