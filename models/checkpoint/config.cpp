// config.json reading and the OPT config.
#include "models/checkpoint/config.h"

#include <string_view>

#include "kernels/base.h"
#include "models/checkpoint/util.h"

namespace fineserve::ckpt {

Activation activation_from_hf_name(const std::string& name) {
  if (name == "relu") return Activation::ReLU;
  if (name == "gelu") return Activation::GELU;
  if (name == "gelu_new" || name == "gelu_pytorch_tanh") return Activation::GELUTanh;
  if (name == "silu") return Activation::SiLU;
  throw Error("activation '" + name + "' is not supported (relu, gelu, gelu_new, gelu_pytorch_tanh, silu)");
}

using nlohmann::json;

nlohmann::json read_json_file(const std::filesystem::path& path) {
  const std::string text = read_file(path);
  // nlohmann::json stops at a NUL byte as if the input ended there; valid JSON never holds one.
  if (const size_t nul = text.find('\0'); nul != std::string::npos)
    throw Error(path.string() + ": invalid JSON at byte " + std::to_string(nul + 1) + ": NUL byte");
  try {
    return json::parse(text);
  } catch (const json::parse_error& e) {
    throw Error(path.string() + ": invalid JSON at byte " + std::to_string(e.byte) + ": " + e.what());
  } catch (const json::exception& e) {  // out_of_range for a number like 1e400
    throw Error(path.string() + ": invalid JSON: " + e.what());
  }
}

std::string model_type(const nlohmann::json& config, const std::string& source) {
  if (!config.is_object()) throw Error(source + ": config must be a JSON object");
  const auto it = config.find("model_type");
  if (it == config.end()) throw Error(source + ": missing \"model_type\"");
  if (!it->is_string()) throw Error(source + ": \"model_type\" must be a string, got " + it->dump());
  return it->get<std::string>();
}

namespace {

// Typed reads of optional fields: an absent (or null, as HF writes "unset") field keeps the default.
class FieldReader {
 public:
  FieldReader(const json& config, const std::string& source) : config_(config), source_(source) {}

  [[noreturn]] void fail(std::string_view field, const std::string& msg) const {
    throw Error(source_ + ": field \"" + std::string(field) + "\" " + msg);
  }

  const json* find(std::string_view field) const {
    const auto it = config_.find(field);
    return it == config_.end() || it->is_null() ? nullptr : &*it;
  }

  void read(std::string_view field, int64_t& out) const {
    const json* v = find(field);
    if (!v) return;
    // JSON integers only: 7.0, true or "7" are mistakes, not 7.
    if (v->is_number_unsigned()) {
      if (v->get<uint64_t>() > static_cast<uint64_t>(INT64_MAX)) fail(field, "is too large: " + v->dump());
      out = static_cast<int64_t>(v->get<uint64_t>());
    } else if (v->is_number_integer()) {
      out = v->get<int64_t>();
    } else {
      fail(field, "must be an integer, got " + v->dump());
    }
  }

  void read(std::string_view field, bool& out) const {
    const json* v = find(field);
    if (!v) return;
    if (!v->is_boolean()) fail(field, "must be true or false, got " + v->dump());
    out = v->get<bool>();
  }

  // A JSON number (integer or not), as config.json writes 1e-05 or 10000 alike.
  void read(std::string_view field, double& out) const {
    const json* v = find(field);
    if (!v) return;
    if (!v->is_number()) fail(field, "must be a number, got " + v->dump());
    out = v->get<double>();
  }

  void read(std::string_view field, std::string& out) const {
    const json* v = find(field);
    if (!v) return;
    if (!v->is_string()) fail(field, "must be a string, got " + v->dump());
    out = v->get<std::string>();
  }

 private:
  const json& config_;
  const std::string& source_;
};

std::string_view torch_dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "float32";
    case DType::F16: return "float16";
    case DType::BF16: return "bfloat16";
    default: return "";
  }
}

// config.json's torch_dtype, one of the names above.
DType torch_dtype_from_name(const std::string& name, const FieldReader& r) {
  for (const DType t : {DType::F16, DType::BF16, DType::F32})
    if (torch_dtype_name(t) == name) return t;
  r.fail("torch_dtype", "'" + name + "' is not one of float16, bfloat16, float32");
}

}  // namespace

OptConfig parse_opt_config(const nlohmann::json& config, const std::string& source) {
  if (!config.is_object()) throw Error(source + ": config must be a JSON object");
  const FieldReader r(config, source);
  std::string type = "opt";
  r.read("model_type", type);
  if (type != "opt") r.fail("model_type", "is '" + type + "', expected 'opt'");

  OptConfig c;
  r.read("vocab_size", c.vocab_size);
  r.read("hidden_size", c.hidden_size);
  r.read("num_hidden_layers", c.num_hidden_layers);
  r.read("ffn_dim", c.ffn_dim);
  r.read("num_attention_heads", c.num_attention_heads);
  r.read("max_position_embeddings", c.max_position_embeddings);
  c.word_embed_proj_dim = c.hidden_size;  // HF: word_embed_proj_dim or hidden_size
  r.read("word_embed_proj_dim", c.word_embed_proj_dim);
  r.read("do_layer_norm_before", c.do_layer_norm_before);
  r.read("_remove_final_layer_norm", c.remove_final_layer_norm);
  r.read("enable_bias", c.enable_bias);
  r.read("layer_norm_elementwise_affine", c.layer_norm_elementwise_affine);
  r.read("tie_word_embeddings", c.tie_word_embeddings);
  r.read("activation_function", c.activation_function);
  r.read("bos_token_id", c.bos_token_id);
  r.read("eos_token_id", c.eos_token_id);
  r.read("pad_token_id", c.pad_token_id);
  std::string dtype(torch_dtype_name(c.torch_dtype));
  r.read("torch_dtype", dtype);

  const std::pair<std::string_view, int64_t> sizes[] = {
      {"vocab_size", c.vocab_size},
      {"hidden_size", c.hidden_size},
      {"num_hidden_layers", c.num_hidden_layers},
      {"ffn_dim", c.ffn_dim},
      {"num_attention_heads", c.num_attention_heads},
      {"max_position_embeddings", c.max_position_embeddings},
      {"word_embed_proj_dim", c.word_embed_proj_dim},
  };
  for (const auto& [field, value] : sizes)
    if (value <= 0) r.fail(field, "must be positive, got " + std::to_string(value));
  if (c.hidden_size % c.num_attention_heads != 0)
    r.fail("num_attention_heads", "(" + std::to_string(c.num_attention_heads) + ") must divide hidden_size (" +
                                      std::to_string(c.hidden_size) + ")");
  const std::pair<std::string_view, int64_t> token_ids[] = {
      {"bos_token_id", c.bos_token_id}, {"eos_token_id", c.eos_token_id}, {"pad_token_id", c.pad_token_id}};
  for (const auto& [field, value] : token_ids)
    if (value < 0 || value >= c.vocab_size)
      r.fail(field, "(" + std::to_string(value) + ") must be in [0, vocab_size = " + std::to_string(c.vocab_size) + ")");
  // The activations HF's ACT2FN offers that OPT checkpoints use.
  if (c.activation_function != "relu" && c.activation_function != "gelu" && c.activation_function != "gelu_new" &&
      c.activation_function != "silu")
    r.fail("activation_function", "'" + c.activation_function + "' is not one of relu, gelu, gelu_new, silu");
  c.torch_dtype = torch_dtype_from_name(dtype, r);
  return c;
}

nlohmann::json to_json(const OptConfig& c) {
  FS_ASSERT(!torch_dtype_name(c.torch_dtype).empty(), "OPT torch_dtype must be a float type");
  return json{
      {"model_type", "opt"},
      {"architectures", json::array({"OPTForCausalLM"})},
      {"vocab_size", c.vocab_size},
      {"hidden_size", c.hidden_size},
      {"num_hidden_layers", c.num_hidden_layers},
      {"ffn_dim", c.ffn_dim},
      {"num_attention_heads", c.num_attention_heads},
      {"max_position_embeddings", c.max_position_embeddings},
      {"word_embed_proj_dim", c.word_embed_proj_dim},
      {"do_layer_norm_before", c.do_layer_norm_before},
      {"_remove_final_layer_norm", c.remove_final_layer_norm},
      {"enable_bias", c.enable_bias},
      {"layer_norm_elementwise_affine", c.layer_norm_elementwise_affine},
      {"tie_word_embeddings", c.tie_word_embeddings},
      {"activation_function", c.activation_function},
      {"bos_token_id", c.bos_token_id},
      {"eos_token_id", c.eos_token_id},
      {"pad_token_id", c.pad_token_id},
      {"torch_dtype", torch_dtype_name(c.torch_dtype)},
  };
}

// ---- Llama / Mistral ------------------------------------------------------------------------

namespace {

// rope_scaling (or rope_parameters) -> RopeScaling; `where` names the object in messages.
RopeScaling parse_rope_scaling(const json& obj, const std::string& source, const std::string& where) {
  if (!obj.is_object()) throw Error(source + ": field \"" + where + "\" must be an object or null, got " + obj.dump());
  const std::string sub = source + " " + where;
  const FieldReader r(obj, sub);
  RopeScaling s;
  r.read("type", s.type);  // older configs
  r.read("rope_type", s.type);
  if (s.type == "default") return s;
  if (s.type == "linear" || s.type == "llama3") {
    if (!r.find("factor")) r.fail("factor", "is required for rope type '" + s.type + "'");
    r.read("factor", s.factor);
    if (!(s.factor >= 1.0)) r.fail("factor", "must be >= 1, got " + std::to_string(s.factor));
  }
  if (s.type == "linear") return s;
  if (s.type == "llama3") {
    for (const char* field : {"low_freq_factor", "high_freq_factor"})
      if (!r.find(field)) r.fail(field, "is required for rope type 'llama3'");
    r.read("low_freq_factor", s.low_freq_factor);
    r.read("high_freq_factor", s.high_freq_factor);
    r.read("original_max_position_embeddings", s.original_max_position_embeddings);
    if (!(s.low_freq_factor > 0) || !(s.high_freq_factor > s.low_freq_factor))
      r.fail("high_freq_factor", "must exceed low_freq_factor (> 0)");
    return s;
  }
  throw Error(sub + ": rope type '" + s.type + "' is not supported (default, linear, llama3)");
}

}  // namespace

LlamaConfig parse_llama_config(const nlohmann::json& config, const std::string& source) {
  if (!config.is_object()) throw Error(source + ": config must be a JSON object");
  const FieldReader r(config, source);
  LlamaConfig c;
  r.read("model_type", c.model_type);
  if (c.model_type != "llama" && c.model_type != "mistral" && c.model_type != "mixtral" && c.model_type != "qwen2")
    r.fail("model_type", "is '" + c.model_type + "', expected 'llama', 'mistral', 'mixtral' or 'qwen2'");
  const bool mixtral = c.model_type == "mixtral";
  const bool qwen2 = c.model_type == "qwen2";
  if (qwen2) {  // HF Qwen2Config's defaults where they differ from Llama's
    c.vocab_size = 151936;
    c.intermediate_size = 22016;
    c.max_position_embeddings = 32768;
    c.qkv_bias = true;
    c.bos_token_id = -1;
    c.eos_token_ids.clear();
    // Qwen2 may restrict attention to a window from layer max_window_layers on; no released
    // checkpoint turns it on, and serving it as full attention would be silently wrong.
    bool use_sliding_window = false;
    r.read("use_sliding_window", use_sliding_window);
    if (use_sliding_window) r.fail("use_sliding_window", "is true: Qwen2's per-layer sliding window is not supported");
  }
  // Mixtral shares Mistral's attention (no biases, optional sliding window, 8 KV heads by default).
  const bool mistral = c.model_type == "mistral" || mixtral;
  if (mistral) {  // HF MistralConfig's defaults
    c.intermediate_size = 14336;
    c.max_position_embeddings = 4096 * 32;
    c.sliding_window = 4096;
  }
  if (mixtral) {  // HF MixtralConfig's defaults where they differ from Mistral's
    c.sliding_window = 0;
    c.rms_norm_eps = 1e-5;
    c.rope_theta = 1e6;
    c.num_local_experts = 8;
    c.num_experts_per_tok = 2;
    r.read("num_local_experts", c.num_local_experts);
    r.read("num_experts_per_tok", c.num_experts_per_tok);
    if (c.num_local_experts <= 0)
      r.fail("num_local_experts", "must be positive, got " + std::to_string(c.num_local_experts));
    if (c.num_experts_per_tok <= 0 || c.num_experts_per_tok > c.num_local_experts)
      r.fail("num_experts_per_tok", "(" + std::to_string(c.num_experts_per_tok) + ") must be in [1, num_local_experts = " +
                                        std::to_string(c.num_local_experts) + "]");
  }
  r.read("vocab_size", c.vocab_size);
  r.read("hidden_size", c.hidden_size);
  r.read("intermediate_size", c.intermediate_size);
  r.read("num_hidden_layers", c.num_hidden_layers);
  r.read("num_attention_heads", c.num_attention_heads);
  // Absent: Mistral's default is 8 heads; null (or absent for Llama): one KV head per query head.
  c.num_key_value_heads = mistral && !config.contains("num_key_value_heads") ? 8 : c.num_attention_heads;
  r.read("num_key_value_heads", c.num_key_value_heads);
  c.head_dim = c.num_attention_heads > 0 ? c.hidden_size / c.num_attention_heads : 0;
  const bool explicit_head_dim = r.find("head_dim") != nullptr;
  r.read("head_dim", c.head_dim);
  r.read("max_position_embeddings", c.max_position_embeddings);
  r.read("rms_norm_eps", c.rms_norm_eps);
  if (!mistral && !qwen2) {  // Mistral's projections never have biases; Qwen2's q/k/v always do
    r.read("attention_bias", c.attention_bias);
    r.read("mlp_bias", c.mlp_bias);
  }
  r.read("tie_word_embeddings", c.tie_word_embeddings);
  r.read("hidden_act", c.hidden_act);
  if (mistral && config.contains("sliding_window")) {
    c.sliding_window = 0;  // null: full attention
    r.read("sliding_window", c.sliding_window);
  }

  // Rotary: transformers >= 5 writes "rope_parameters" (theta inside); older versions write
  // "rope_theta" and "rope_scaling".
  if (const json* params = r.find("rope_parameters")) {
    c.rope_scaling = parse_rope_scaling(*params, source, "rope_parameters");
    if (params->is_object()) FieldReader(*params, source + " rope_parameters").read("rope_theta", c.rope_theta);
  } else {
    r.read("rope_theta", c.rope_theta);
    if (const json* scaling = r.find("rope_scaling")) c.rope_scaling = parse_rope_scaling(*scaling, source, "rope_scaling");
  }
  if (c.rope_scaling.type == "llama3" && c.rope_scaling.original_max_position_embeddings == 0)
    r.fail("rope_scaling", "of type 'llama3' needs original_max_position_embeddings");

  // Token ids: absent keeps the default, null means none; eos may be one id or a list.
  auto token_id = [&](const char* field, int64_t& out) {
    if (!config.contains(field)) return;
    out = -1;
    r.read(field, out);
  };
  token_id("bos_token_id", c.bos_token_id);
  token_id("pad_token_id", c.pad_token_id);
  if (const auto it = config.find("eos_token_id"); it != config.end()) {
    c.eos_token_ids.clear();
    const json list = it->is_array() ? *it : json::array({*it});
    for (const json& id : list) {
      if (id.is_null()) continue;
      if (!id.is_number_integer()) r.fail("eos_token_id", "must be an integer or a list of integers, got " + it->dump());
      c.eos_token_ids.push_back(id.get<int64_t>());
    }
  }
  std::string dtype(torch_dtype_name(c.torch_dtype));
  r.read("torch_dtype", dtype);
  r.read("dtype", dtype);  // transformers >= 5

  const std::pair<std::string_view, int64_t> sizes[] = {
      {"vocab_size", c.vocab_size},
      {"hidden_size", c.hidden_size},
      {"intermediate_size", c.intermediate_size},
      {"num_hidden_layers", c.num_hidden_layers},
      {"num_attention_heads", c.num_attention_heads},
      {"num_key_value_heads", c.num_key_value_heads},
      {"head_dim", c.head_dim},
      {"max_position_embeddings", c.max_position_embeddings},
  };
  for (const auto& [field, value] : sizes)
    if (value <= 0) r.fail(field, "must be positive, got " + std::to_string(value));
  if (!explicit_head_dim && c.hidden_size % c.num_attention_heads != 0)
    r.fail("num_attention_heads", "(" + std::to_string(c.num_attention_heads) + ") must divide hidden_size (" +
                                      std::to_string(c.hidden_size) + ") unless head_dim is given");
  if (c.num_attention_heads % c.num_key_value_heads != 0)
    r.fail("num_key_value_heads", "(" + std::to_string(c.num_key_value_heads) + ") must divide num_attention_heads (" +
                                      std::to_string(c.num_attention_heads) + ")");
  if (c.head_dim % 2 != 0) r.fail("head_dim", "must be even for rotary embeddings, got " + std::to_string(c.head_dim));
  if (!(c.rms_norm_eps > 0)) r.fail("rms_norm_eps", "must be positive");
  if (!(c.rope_theta > 0)) r.fail("rope_theta", "must be positive");
  if (c.sliding_window < 0) r.fail("sliding_window", "must be positive or null, got " + std::to_string(c.sliding_window));
  auto check_id = [&](std::string_view field, int64_t value) {
    if (value < -1 || value >= c.vocab_size)
      r.fail(field, "(" + std::to_string(value) + ") must be in [0, vocab_size = " + std::to_string(c.vocab_size) + ")");
  };
  check_id("bos_token_id", c.bos_token_id);
  check_id("pad_token_id", c.pad_token_id);
  for (int64_t id : c.eos_token_ids)
    if (id < 0 || id >= c.vocab_size)
      r.fail("eos_token_id", "(" + std::to_string(id) + ") must be in [0, vocab_size = " + std::to_string(c.vocab_size) + ")");
  if (c.hidden_act != "silu" && c.hidden_act != "gelu" && c.hidden_act != "gelu_pytorch_tanh" &&
      c.hidden_act != "gelu_new")
    r.fail("hidden_act", "'" + c.hidden_act + "' is not one of silu, gelu, gelu_pytorch_tanh, gelu_new");
  c.torch_dtype = torch_dtype_from_name(dtype, r);
  return c;
}

nlohmann::json to_json(const LlamaConfig& c) {
  FS_ASSERT(!torch_dtype_name(c.torch_dtype).empty(), "Llama torch_dtype must be a float type");
  const bool mixtral = c.model_type == "mixtral";
  const bool mistral = c.model_type == "mistral" || mixtral;
  json j{
      {"model_type", c.model_type},
      {"architectures", json::array({mixtral                   ? "MixtralForCausalLM"
                                     : mistral                 ? "MistralForCausalLM"
                                     : c.model_type == "qwen2" ? "Qwen2ForCausalLM"
                                                               : "LlamaForCausalLM"})},
      {"vocab_size", c.vocab_size},
      {"hidden_size", c.hidden_size},
      {"intermediate_size", c.intermediate_size},
      {"num_hidden_layers", c.num_hidden_layers},
      {"num_attention_heads", c.num_attention_heads},
      {"num_key_value_heads", c.num_key_value_heads},
      {"head_dim", c.head_dim},
      {"max_position_embeddings", c.max_position_embeddings},
      {"rms_norm_eps", c.rms_norm_eps},
      {"rope_theta", c.rope_theta},
      {"tie_word_embeddings", c.tie_word_embeddings},
      {"hidden_act", c.hidden_act},
      {"bos_token_id", c.bos_token_id >= 0 ? json(c.bos_token_id) : json(nullptr)},
      {"pad_token_id", c.pad_token_id >= 0 ? json(c.pad_token_id) : json(nullptr)},
      {"torch_dtype", torch_dtype_name(c.torch_dtype)},
  };
  if (c.eos_token_ids.empty())
    j["eos_token_id"] = nullptr;
  else if (c.eos_token_ids.size() == 1)
    j["eos_token_id"] = c.eos_token_ids[0];
  else
    j["eos_token_id"] = c.eos_token_ids;
  if (mixtral) {
    j["num_local_experts"] = c.num_local_experts;
    j["num_experts_per_tok"] = c.num_experts_per_tok;
  }
  if (mistral) {
    j["sliding_window"] = c.sliding_window > 0 ? json(c.sliding_window) : json(nullptr);
  } else if (c.model_type == "qwen2") {
    j["use_sliding_window"] = false;
  } else {
    j["attention_bias"] = c.attention_bias;
    j["mlp_bias"] = c.mlp_bias;
  }
  if (c.rope_scaling.type == "default") {
    j["rope_scaling"] = nullptr;
  } else {
    json s{{"rope_type", c.rope_scaling.type}, {"factor", c.rope_scaling.factor}};
    if (c.rope_scaling.type == "llama3") {
      s["low_freq_factor"] = c.rope_scaling.low_freq_factor;
      s["high_freq_factor"] = c.rope_scaling.high_freq_factor;
      s["original_max_position_embeddings"] = c.rope_scaling.original_max_position_embeddings;
    }
    j["rope_scaling"] = s;
  }
  return j;
}

}  // namespace fineserve::ckpt
