// config.json reading and the OPT config.
#include "models/checkpoint/config.h"

#include <string_view>

#include "kernels/base.h"
#include "models/checkpoint/util.h"

namespace fineserve::ckpt {

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
  if (dtype == "float16") {
    c.torch_dtype = DType::F16;
  } else if (dtype == "bfloat16") {
    c.torch_dtype = DType::BF16;
  } else if (dtype == "float32") {
    c.torch_dtype = DType::F32;
  } else {
    r.fail("torch_dtype", "'" + dtype + "' is not one of float16, bfloat16, float32");
  }
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

}  // namespace fineserve::ckpt
