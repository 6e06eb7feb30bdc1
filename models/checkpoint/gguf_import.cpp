// GGUF -> Hugging Face checkpoint (see gguf_import.h).
#include "models/checkpoint/gguf_import.h"

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstring>
#include <numbers>
#include <regex>

#include <spdlog/spdlog.h>

#include "kernels/base.h"
#include "kernels/half.h"
#include "models/checkpoint/atomic_dir.h"
#include "models/checkpoint/config.h"
#include "models/checkpoint/gguf_spm.h"
#include "models/checkpoint/safetensors.h"
#include "models/checkpoint/util.h"

namespace fineserve::ckpt {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

// Typed metadata reads that name the file and key in their errors.
class Meta {
 public:
  explicit Meta(const gguf::File& f) : f_(f), label_(f.path().string()) {}

  const gguf::Value* find(const std::string& key) const { return f_.find(key); }
  std::string what(const std::string& key) const { return label_ + ": metadata key " + key; }
  [[noreturn]] void fail(const std::string& msg) const { throw Error(label_ + ": " + msg); }

  const gguf::Value& get(const std::string& key) const {
    const gguf::Value* v = find(key);
    if (!v) fail("missing metadata key " + key);
    return *v;
  }
  int64_t integer(const std::string& key) const { return get(key).as_int(what(key)); }
  int64_t integer(const std::string& key, int64_t fallback) const {
    return find(key) ? integer(key) : fallback;
  }
  double number(const std::string& key, double fallback) const {
    return find(key) ? get(key).as_double(what(key)) : fallback;
  }
  // A number as config.json would write it: float32 values by their shortest decimal form (the
  // value the model was converted from: 1e-05, not 9.99999974737875e-06).
  double real(const std::string& key, double fallback) const {
    if (!find(key)) return fallback;
    const gguf::Value& v = get(key);
    const double x = v.as_double(what(key));
    if (v.type != gguf::ValueType::F32) return x;
    char buf[64];
    const auto res = std::to_chars(buf, buf + sizeof buf, static_cast<float>(x));
    return std::strtod(std::string(buf, res.ptr).c_str(), nullptr);
  }
  std::string string(const std::string& key, const std::string& fallback = "") const {
    return find(key) ? get(key).as_string(what(key)) : fallback;
  }
  // A per-model count that some architectures store per layer: one value for every layer.
  int64_t uniform(const std::string& key) const {
    const gguf::Value& v = get(key);
    if (!v.is_array()) return v.as_int(what(key));
    const auto& items = v.as_array(what(key));
    if (items.empty()) fail("metadata key " + key + " is an empty array");
    const int64_t first = items[0].as_int(what(key));
    for (const gguf::Value& x : items)
      if (x.as_int(what(key)) != first) fail("metadata key " + key + " differs between layers, which Llama does not allow");
    return first;
  }

 private:
  const gguf::File& f_;
  std::string label_;
};

int64_t layer_of(const std::string& hf_name) {
  static const std::regex re(R"(^model\.layers\.(\d{1,9})\.)");
  std::smatch m;
  if (!std::regex_search(hf_name, m, re)) return -1;
  return std::stoll(m[1].str());
}

// GGUF's [out, in] matrices interleave the two rotary halves of each head: llama.cpp's converter
// stores HF row h*d + s*(d/2) + j at row h*d + 2j + s (its "permute"). This maps back: the HF row
// whose data sits at GGUF row `r`.
int64_t hf_row_of(int64_t r, int64_t head_dim) {
  const int64_t h = r / head_dim, within = r % head_dim;
  return h * head_dim + (within % 2) * (head_dim / 2) + within / 2;
}

json pre_tokenizer_for(const std::string& pre, const std::string& label) {
  const json byte_level = {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", true}};
  if (pre.empty() || pre == "default" || pre == "gpt-2" || pre == "gpt2") return byte_level;
  if (pre == "smollm")  // llama.cpp: single digits, then GPT-2's regex
    return {{"type", "Sequence"},
            {"pretokenizers", json::array({{{"type", "Digits"}, {"individual_digits", true}}, byte_level})}};
  if (pre == "llama-bpe" || pre == "llama3") {  // Llama 3's split regex, then bytes without GPT-2's regex
    const std::string regex =
        "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
        "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
    json split = {{"type", "Split"}, {"pattern", {{"Regex", regex}}}, {"behavior", "Isolated"}, {"invert", false}};
    json bytes = byte_level;
    bytes["use_regex"] = false;
    return {{"type", "Sequence"}, {"pretokenizers", json::array({split, bytes})}};
  }
  throw Error(label + ": tokenizer.ggml.pre '" + pre +
              "' is not supported by import-gguf (supported: default, gpt-2, smollm, llama-bpe)");
}

// `source` names the GGUF file for the one way a dump fails: strings (tokens, the chat template)
// that are not UTF-8, which JSON cannot hold.
void write_json(const fs::path& path, const json& j, const std::string& source) {
  std::string text;
  try {
    text = j.dump(2);
  } catch (const json::exception& e) {
    throw Error(source + ": cannot write " + path.filename().string() + ": " + e.what());
  }
  write_file(path, text + "\n");
}

// Llama 3.1's rope scaling: f = 1 for short wavelengths, `factor` for long ones, and in between
// 1 / ((1 - s) / factor + s) with s = (old_ctx / wavelength - low) / (high - low).
std::vector<double> llama3_factors(const RopeScaling& s, double theta, int64_t head_dim) {
  std::vector<double> f;
  for (int64_t i = 0; i < head_dim / 2; ++i) {
    const double inv = std::pow(theta, -static_cast<double>(2 * i) / static_cast<double>(head_dim));
    const double wavelen = 2 * std::numbers::pi / inv, old = static_cast<double>(s.original_max_position_embeddings);
    if (wavelen < old / s.high_freq_factor) {
      f.push_back(1.0);
    } else if (wavelen > old / s.low_freq_factor) {
      f.push_back(s.factor);
    } else {
      const double smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
      f.push_back(1.0 / ((1 - smooth) / s.factor + smooth));
    }
  }
  return f;
}

// llama.cpp stores Llama 3.1's rope scaling as per-frequency divisors (rope_freqs.weight) and drops
// its parameters; config.json needs them back. factor is the largest divisor; low_freq_factor and
// high_freq_factor follow from the divisors of the smoothed band, which are linear in 1 / wavelength
// (any original context gives the same frequencies; the metadata's, else Llama 3.1's 8192, is
// used). The result is checked to reproduce every divisor.
RopeScaling llama3_scaling_from_factors(const gguf::File& file, const gguf::TensorInfo& t, double theta,
                                        int64_t head_dim, int64_t original_ctx) {
  const std::string what = file.path().string() + ": tensor rope_freqs.weight";
  if (t.shape() != std::vector<int64_t>{head_dim / 2}) throw Error(what + " must have head_dim / 2 elements");
  std::vector<float> f(static_cast<size_t>(t.numel));
  gguf::dequantize(t.type, file.data(t), t.numel, f.data(), what);
  RopeScaling s;
  s.type = "llama3";
  s.original_max_position_embeddings = original_ctx;
  s.factor = *std::max_element(f.begin(), f.end());
  if (!(s.factor > 1.0) || original_ctx <= 0) throw Error(what + " does not describe Llama 3 rope scaling");
  std::vector<std::pair<double, double>> band;  // (1 / wavelength, smooth) of the smoothed band
  for (int64_t i = 0; i < head_dim / 2; ++i) {
    const double fi = f[static_cast<size_t>(i)];
    if (fi > 1.0 + 1e-6 && fi < s.factor * (1 - 1e-6)) {
      const double inv = std::pow(theta, -static_cast<double>(2 * i) / static_cast<double>(head_dim));
      band.emplace_back(inv / (2 * std::numbers::pi), (1 / fi - 1 / s.factor) / (1 - 1 / s.factor));
    }
  }
  if (band.size() >= 2) {  // smooth = old / wavelength / (high - low) - low / (high - low)
    const double a = (band.back().second - band.front().second) / (band.back().first - band.front().first);
    const double b = a * band.front().first - band.front().second;
    const double old = static_cast<double>(original_ctx);
    s.low_freq_factor = b * old / a;
    s.high_freq_factor = s.low_freq_factor + old / a;
  }  // else: Llama 3.1's 1 and 4
  const std::vector<double> want = llama3_factors(s, theta, head_dim);
  for (size_t i = 0; i < want.size(); ++i)
    if (std::abs(want[i] - f[i]) > 1e-3 * want[i] || !(s.low_freq_factor > 0) || !(s.high_freq_factor > s.low_freq_factor))
      throw Error(what + " (frequency divisors) does not match Llama 3 rope scaling, the only kind import-gguf "
                  "converts");
  return s;
}

}  // namespace

std::string gguf_to_hf_name(const std::string& g) {
  static const std::pair<const char*, const char*> globals[] = {
      {"token_embd.weight", "model.embed_tokens.weight"},
      {"output_norm.weight", "model.norm.weight"},
      {"output.weight", "lm_head.weight"},
  };
  for (const auto& [from, to] : globals)
    if (g == from) return to;
  static const std::regex block(R"(^blk\.(\d{1,9})\.([a-z_]+)\.(weight|bias)$)");
  static const std::pair<const char*, const char*> parts[] = {
      {"attn_norm", "input_layernorm"}, {"attn_q", "self_attn.q_proj"}, {"attn_k", "self_attn.k_proj"},
      {"attn_v", "self_attn.v_proj"},   {"attn_output", "self_attn.o_proj"}, {"ffn_norm", "post_attention_layernorm"},
      {"ffn_gate", "mlp.gate_proj"},    {"ffn_up", "mlp.up_proj"},        {"ffn_down", "mlp.down_proj"},
  };
  std::smatch m;
  if (!std::regex_match(g, m, block)) return "";
  for (const auto& [from, to] : parts)
    if (m[2].str() == from) {
      if (m[3].str() == "bias" && std::string(to).ends_with("norm")) return "";  // RMSNorm has no bias
      return "model.layers." + m[1].str() + "." + to + "." + m[3].str();
    }
  return "";
}

nlohmann::json gguf_llama_config(const gguf::File& file) {
  const Meta meta(file);
  const std::string label = file.path().string();
  const std::string arch = meta.string("general.architecture");
  if (arch.empty()) meta.fail("missing metadata key general.architecture");
  if (arch != "llama")
    meta.fail("general.architecture '" + arch + "' is not supported by import-gguf (supported: llama)");
  const std::string p = arch + ".";
  if (meta.integer(p + "expert_count", 0) > 0)
    meta.fail("a mixture-of-experts model (" + p + "expert_count = " + std::to_string(meta.integer(p + "expert_count")) +
              ") is not supported by import-gguf yet");

  LlamaConfig c;
  c.model_type = "llama";
  c.hidden_size = meta.integer(p + "embedding_length");
  c.num_hidden_layers = meta.integer(p + "block_count");
  c.intermediate_size = meta.uniform(p + "feed_forward_length");
  c.num_attention_heads = meta.uniform(p + "attention.head_count");
  c.num_key_value_heads = meta.find(p + "attention.head_count_kv") ? meta.uniform(p + "attention.head_count_kv")
                                                                    : c.num_attention_heads;
  if (c.num_attention_heads <= 0) meta.fail("metadata key " + p + "attention.head_count must be positive");
  c.head_dim = meta.integer(p + "attention.key_length", c.hidden_size / c.num_attention_heads);
  if (meta.integer(p + "attention.value_length", c.head_dim) != c.head_dim)
    meta.fail("metadata keys " + p + "attention.key_length and value_length differ, which Llama does not allow");
  if (meta.integer(p + "rope.dimension_count", c.head_dim) != c.head_dim)
    meta.fail("metadata key " + p + "rope.dimension_count (" + std::to_string(meta.integer(p + "rope.dimension_count")) +
              ") is not the head size (" + std::to_string(c.head_dim) + "): partial rotary is not supported");
  c.max_position_embeddings = meta.integer(p + "context_length", 2048);
  c.rms_norm_eps = meta.real(p + "attention.layer_norm_rms_epsilon", 1e-5);
  c.rope_theta = meta.real(p + "rope.freq_base", 10000.0);
  const std::string scaling = meta.string(p + "rope.scaling.type", "none");
  if (scaling == "linear") {
    c.rope_scaling.type = "linear";
    c.rope_scaling.factor = meta.real(p + "rope.scaling.factor", 1.0);
  } else if (scaling != "none") {
    meta.fail("metadata key " + p + "rope.scaling.type is '" + scaling + "', not supported by import-gguf (none, linear)");
  }
  if (const gguf::TensorInfo* freqs = file.header().find_tensor("rope_freqs.weight")) {
    if (c.rope_scaling.type != "default") meta.fail("rope_freqs.weight and " + p + "rope.scaling.type are both given");
    c.rope_scaling = llama3_scaling_from_factors(file, *freqs, c.rope_theta, c.head_dim,
                                                 meta.integer(p + "rope.scaling.original_context_length", 8192));
  }

  const gguf::TensorInfo* embd = file.header().find_tensor("token_embd.weight");
  if (!embd) meta.fail("missing tensor token_embd.weight");
  const std::vector<int64_t> embd_shape = embd->shape();
  c.vocab_size = embd_shape.empty() ? 0 : embd_shape[0];
  c.vocab_size = meta.integer(p + "vocab_size", c.vocab_size);
  c.tie_word_embeddings = file.header().find_tensor("output.weight") == nullptr;
  c.attention_bias = file.header().find_tensor("blk.0.attn_q.bias") != nullptr;
  c.mlp_bias = file.header().find_tensor("blk.0.ffn_up.bias") != nullptr;
  c.hidden_act = "silu";
  c.sliding_window = 0;
  c.bos_token_id = meta.integer("tokenizer.ggml.bos_token_id", -1);
  const int64_t eos = meta.integer("tokenizer.ggml.eos_token_id", -1);
  c.eos_token_ids = eos >= 0 ? std::vector<int64_t>{eos} : std::vector<int64_t>{};
  c.pad_token_id = meta.integer("tokenizer.ggml.padding_token_id", -1);
  c.torch_dtype = DType::F16;

  json j = to_json(c);
  parse_llama_config(j, label + " (config.json derived from its metadata)");  // the usual checks
  return j;
}

namespace {

bool flag(const Meta& meta, const std::string& key, bool fallback) {
  return meta.find(key) ? meta.get(key).as_bool(meta.what(key)) : fallback;
}

// A token id metadata key names, as its token's text (JSON null when the key is absent).
json token_of(const Meta& meta, const std::vector<std::string>& text, const char* key) {
  const int64_t id = meta.integer(key, -1);
  if (id < 0) return nullptr;
  if (id >= static_cast<int64_t>(text.size()))
    meta.fail("metadata key " + std::string(key) + " = " + std::to_string(id) + " is past the " +
              std::to_string(text.size()) + " tokens");
  return text[static_cast<size_t>(id)];
}

std::vector<std::string> token_texts(const Meta& meta) {
  const auto& tokens = meta.get("tokenizer.ggml.tokens").as_array(meta.what("tokenizer.ggml.tokens"));
  std::vector<std::string> text(tokens.size());
  for (size_t i = 0; i < tokens.size(); ++i) text[i] = tokens[i].as_string(meta.what("tokenizer.ggml.tokens"));
  return text;
}

// tokenizer.ggml.token_type, or every token NORMAL when the file has none (as llama.cpp reads it).
std::vector<int64_t> token_types(const Meta& meta, size_t n) {
  std::vector<int64_t> types(n, kNormal);
  if (const gguf::Value* t = meta.find("tokenizer.ggml.token_type")) {
    const auto& list = t->as_array(meta.what("tokenizer.ggml.token_type"));
    if (list.size() != n)
      meta.fail("tokenizer.ggml.token_type has " + std::to_string(list.size()) + " entries for " + std::to_string(n) +
                " tokens");
    for (size_t i = 0; i < list.size(); ++i) types[i] = list[i].as_int(meta.what("tokenizer.ggml.token_type"));
  }
  return types;
}

// tokenizer_config.json's entries that do not depend on the tokenizer's kind.
json common_tokenizer_config(const Meta& meta, const std::vector<std::string>& text, bool add_bos, bool add_eos) {
  const json bos = token_of(meta, text, "tokenizer.ggml.bos_token_id");
  const json eos = token_of(meta, text, "tokenizer.ggml.eos_token_id");
  if (add_bos && bos.is_null()) meta.fail("tokenizer.ggml.add_bos_token is set but there is no bos_token_id");
  if (add_eos && eos.is_null()) meta.fail("tokenizer.ggml.add_eos_token is set but there is no eos_token_id");
  json tc = {{"clean_up_tokenization_spaces", false},
             {"add_bos_token", add_bos},
             {"add_eos_token", add_eos},
             {"bos_token", bos},
             {"eos_token", eos},
             {"unk_token", token_of(meta, text, "tokenizer.ggml.unknown_token_id")},
             {"pad_token", token_of(meta, text, "tokenizer.ggml.padding_token_id")}};
  const std::string arch = meta.string("general.architecture");
  if (const int64_t ctx = meta.integer(arch + ".context_length", 0); ctx > 0) tc["model_max_length"] = ctx;
  if (meta.find("tokenizer.chat_template")) tc["chat_template"] = meta.string("tokenizer.chat_template");
  return tc;
}

// tokenizer.ggml.model "gpt2": tokenizer.json with the byte-level BPE.
GgufTokenizerFiles byte_level_tokenizer_files(const Meta& meta, const std::string& label) {
  const std::vector<std::string> text = token_texts(meta);
  const auto& merges = meta.get("tokenizer.ggml.merges").as_array(meta.what("tokenizer.ggml.merges"));
  const std::vector<int64_t> types = token_types(meta, text.size());

  json vocab = json::object();
  json added = json::array();
  size_t duplicates = 0;
  for (size_t i = 0; i < text.size(); ++i) {
    if (vocab.contains(text[i])) {  // a vocabulary maps each string to one id: the first wins
      ++duplicates;
      continue;
    }
    vocab[text[i]] = i;
    if (types[i] == kControl || types[i] == kUnknown || types[i] == kUserDefined) {
      const bool special = types[i] != kUserDefined;
      added.push_back({{"id", i}, {"content", text[i]}, {"single_word", false}, {"lstrip", false},
                       {"rstrip", false}, {"normalized", false}, {"special", special}});
    }
  }
  if (duplicates) spdlog::warn("{}: {} duplicate token strings kept their first id only", label, duplicates);
  json merge_list = json::array();
  for (const gguf::Value& m : merges) {
    const std::string& s = m.as_string(meta.what("tokenizer.ggml.merges"));
    if (std::count(s.begin(), s.end(), ' ') != 1)
      meta.fail("tokenizer.ggml.merges entry '" + s.substr(0, 64) + "' is not two tokens separated by a space");
    merge_list.push_back(s);
  }

  const bool add_bos = flag(meta, "tokenizer.ggml.add_bos_token", false);
  const bool add_eos = flag(meta, "tokenizer.ggml.add_eos_token", false);
  GgufTokenizerFiles out;
  json& tc = out.tokenizer_config;
  tc = common_tokenizer_config(meta, text, add_bos, add_eos);
  tc["tokenizer_class"] = "PreTrainedTokenizerFast";

  json post = {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", false}, {"use_regex", true}};
  if (add_bos || add_eos) {
    json single = json::array(), specials = json::object();
    auto special = [&](const json& tok, const char* key) {
      single.push_back({{"SpecialToken", {{"id", tok}, {"type_id", 0}}}});
      specials[tok.get<std::string>()] = {{"id", tok}, {"ids", {meta.integer(key)}}, {"tokens", {tok}}};
    };
    if (add_bos) special(tc["bos_token"], "tokenizer.ggml.bos_token_id");
    single.push_back({{"Sequence", {{"id", "A"}, {"type_id", 0}}}});
    if (add_eos) special(tc["eos_token"], "tokenizer.ggml.eos_token_id");
    post = {{"type", "TemplateProcessing"}, {"single", single}, {"pair", single}, {"special_tokens", specials}};
  }

  out.tokenizer = {
      {"version", "1.0"},
      {"truncation", nullptr},
      {"padding", nullptr},
      {"added_tokens", added},
      {"normalizer", nullptr},
      {"pre_tokenizer", pre_tokenizer_for(meta.string("tokenizer.ggml.pre"), label)},
      {"post_processor", post},
      {"decoder", {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true}, {"use_regex", true}}},
      {"model",
       {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", nullptr}, {"continuing_subword_prefix", nullptr},
        {"end_of_word_suffix", nullptr}, {"fuse_unk", false}, {"byte_fallback", false}, {"ignore_merges", false},
        {"vocab", vocab}, {"merges", merge_list}}},
  };
  return out;
}

// tokenizer.ggml.model "llama": the SentencePiece model back as tokenizer.model (gguf_spm.h), with a
// tokenizer_config.json for transformers' LlamaTokenizer.
GgufTokenizerFiles sentencepiece_tokenizer_files(const Meta& meta, const std::string& label) {
  GgufSpmVocab v;
  v.tokens = token_texts(meta);
  const size_t n = v.tokens.size();
  if (!meta.find("tokenizer.ggml.scores"))
    meta.fail("missing metadata key tokenizer.ggml.scores (a SentencePiece vocabulary needs its pieces' scores)");
  if (!meta.find("tokenizer.ggml.token_type"))
    meta.fail("missing metadata key tokenizer.ggml.token_type (a SentencePiece vocabulary needs its pieces' types)");
  const auto& scores = meta.get("tokenizer.ggml.scores").as_array(meta.what("tokenizer.ggml.scores"));
  if (scores.size() != n)
    meta.fail("tokenizer.ggml.scores has " + std::to_string(scores.size()) + " entries for " + std::to_string(n) +
              " tokens");
  for (const gguf::Value& s : scores) v.scores.push_back(static_cast<float>(s.as_double(meta.what("tokenizer.ggml.scores"))));
  v.types = token_types(meta, n);
  v.unk_id = meta.integer("tokenizer.ggml.unknown_token_id", -1);
  v.bos_id = meta.integer("tokenizer.ggml.bos_token_id", -1);
  v.eos_id = meta.integer("tokenizer.ggml.eos_token_id", -1);
  v.pad_id = meta.integer("tokenizer.ggml.padding_token_id", -1);
  v.add_space_prefix = flag(meta, "tokenizer.ggml.add_space_prefix", true);

  GgufTokenizerFiles out;
  out.sentencepiece_model = gguf_spm_model_proto(v, label);  // checks the vocabulary
  const int64_t unk = gguf_spm_unknown_id(v, label);

  // llama.cpp adds a BOS to SentencePiece prompts unless the file says otherwise.
  const bool add_bos = flag(meta, "tokenizer.ggml.add_bos_token", v.bos_id >= 0);
  const bool add_eos = flag(meta, "tokenizer.ggml.add_eos_token", false);
  json& tc = out.tokenizer_config;
  tc = common_tokenizer_config(meta, v.tokens, add_bos, add_eos);
  tc["tokenizer_class"] = "LlamaTokenizer";
  // No GGUF key records transformers' `legacy` flag. false is transformers' default for a
  // LlamaTokenizer and what it assumes for a GGUF's SentencePiece vocabulary: text right after an
  // added token gets no '▁' (llama.cpp gives it one; docs/formats.md lists the differences).
  tc["legacy"] = false;
  tc["add_prefix_space"] = v.add_space_prefix;
  tc["unk_token"] = v.tokens[static_cast<size_t>(unk)];
  // The special (CONTROL, the unknown) and user-defined pieces, as transformers lists them.
  json decoder = json::object();
  for (size_t i = 0; i < n; ++i) {
    const int64_t type = static_cast<int64_t>(i) == unk ? kUnknown : v.types[i];
    if (type != kControl && type != kUnknown && type != kUserDefined) continue;
    decoder[std::to_string(i)] = {{"content", v.tokens[i]}, {"lstrip", false}, {"normalized", false}, {"rstrip", false},
                                  {"single_word", false}, {"special", type != kUserDefined}};
  }
  tc["added_tokens_decoder"] = decoder;
  out.tokenizer = nullptr;
  return out;
}

}  // namespace

GgufTokenizerFiles gguf_tokenizer_files(const gguf::File& file) {
  const Meta meta(file);
  const std::string label = file.path().string();
  const std::string model = meta.string("tokenizer.ggml.model");
  if (model.empty()) meta.fail("missing metadata key tokenizer.ggml.model (the file embeds no tokenizer)");
  if (model == "gpt2") return byte_level_tokenizer_files(meta, label);
  if (model == "llama") return sentencepiece_tokenizer_files(meta, label);
  meta.fail("tokenizer.ggml.model '" + model +
            "' is not supported by import-gguf (supported: 'gpt2', byte-level BPE; 'llama', SentencePiece)");
}

GgufImportPlan plan_gguf_import(const std::filesystem::path& path) {
  GgufImportPlan plan;
  plan.file = gguf::File::open(path);
  const gguf::File& file = *plan.file;
  const std::string label = path.string();
  const Meta meta(file);
  plan.config = gguf_llama_config(file);
  const LlamaConfig c = parse_llama_config(plan.config, label);
  plan.tokenizer = gguf_tokenizer_files(file);
  plan.head_dim = c.head_dim;
  plan.architecture = "llama";
  plan.model_name = meta.string("general.name");

  // Every GGUF tensor gets an HF name and the shape config.json implies; nothing may be missing.
  const int64_t h = c.hidden_size, f = c.intermediate_size, hd = c.head_dim;
  const int64_t q_dim = c.num_attention_heads * hd, kv_dim = c.num_key_value_heads * hd;
  std::vector<GgufTensorPlan>& maps = plan.tensors;
  std::map<std::string, const GgufTensorPlan*> by_name;
  for (const gguf::TensorInfo& t : file.header().tensors) {
    // Old files' precomputed rotary table nobody reads; rope frequency divisors (in config.json).
    if (t.name.ends_with(".attn_rot_embd") || t.name == "rope_freqs.weight") continue;
    GgufTensorPlan m;
    m.src = &t;
    m.name = gguf_to_hf_name(t.name);
    if (m.name.empty()) meta.fail("tensor '" + t.name.substr(0, 96) + "' has no Llama counterpart");
    const int64_t layer = layer_of(m.name);
    if (layer >= c.num_hidden_layers)
      meta.fail("tensor " + t.name + " belongs to layer " + std::to_string(layer) + " but llama.block_count is " +
                std::to_string(c.num_hidden_layers));
    const bool bias = m.name.ends_with(".bias");
    auto expect = [&](int64_t rows, int64_t cols) {
      m.shape = bias ? std::vector<int64_t>{rows} : std::vector<int64_t>{rows, cols};
    };
    const std::string& n = m.name;
    auto has = [&](const char* part) { return n.find(part) != std::string::npos; };
    if (n == "model.embed_tokens.weight" || n == "lm_head.weight") {
      expect(c.vocab_size, h);
    } else if (n.ends_with("norm.weight")) {
      m.shape = {h};
    } else if (has("q_proj")) {
      expect(q_dim, h);
      m.rotary = true;
    } else if (has("k_proj")) {
      expect(kv_dim, h);
      m.rotary = true;
    } else if (has("v_proj")) {
      expect(kv_dim, h);
    } else if (has("o_proj")) {
      expect(h, q_dim);
    } else if (has("gate_proj") || has("up_proj")) {
      expect(f, h);
    } else if (has("down_proj")) {
      expect(h, f);
    }
    if (t.shape() != m.shape)
      meta.fail("tensor " + t.name + " has shape " + format_shape(t.shape()) + " (GGUF dims reversed) but the metadata implies " +
                format_shape(m.shape));
    if (!gguf::can_dequantize(t.type))
      gguf::dequantize(t.type, {}, 0, nullptr, label + ": tensor " + t.name);  // throws, naming the type
    ++plan.source_types[gguf::ggml_type_name(t.type)];
    maps.push_back(std::move(m));
  }
  for (const GgufTensorPlan& m : maps) by_name[m.name] = &m;
  std::vector<std::string> required = {"model.embed_tokens.weight", "model.norm.weight"};
  if (!c.tie_word_embeddings) required.push_back("lm_head.weight");
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    for (const char* part : {"input_layernorm", "post_attention_layernorm"}) required.push_back(p + part + ".weight");
    for (const char* part : {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"}) {
      required.push_back(p + part + ".weight");
      if (c.attention_bias) required.push_back(p + part + ".bias");
    }
    for (const char* part : {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}) {
      required.push_back(p + part + ".weight");
      if (c.mlp_bias) required.push_back(p + part + ".bias");
    }
  }
  for (const std::string& name : required)
    if (!by_name.count(name)) meta.fail("missing the tensor that becomes " + name);
  if (by_name.size() != required.size())
    meta.fail("holds " + std::to_string(by_name.size()) + " Llama tensors where " + std::to_string(required.size()) +
              " are expected (biases on some projections only?)");
  return plan;
}

int64_t GgufImportPlan::hf_row(const GgufTensorPlan& t, int64_t r) const {
  return t.rotary && t.shape.size() == 2 ? hf_row_of(r, head_dim) : r;
}

int64_t GgufImportPlan::hf_element(const GgufTensorPlan& t, int64_t j) const {
  return t.rotary && t.shape.size() == 1 ? hf_row_of(j, head_dim) : j;
}

void write_gguf_side_files(const GgufImportPlan& plan, const nlohmann::json& config, const std::filesystem::path& dir) {
  const std::string label = plan.file->path().string();
  write_json(dir / "config.json", config, label);
  json gen = {{"bos_token_id", config["bos_token_id"]}, {"eos_token_id", config["eos_token_id"]}};
  if (!config["pad_token_id"].is_null()) gen["pad_token_id"] = config["pad_token_id"];
  write_json(dir / "generation_config.json", gen, label);
  if (!plan.tokenizer.tokenizer.is_null()) write_json(dir / "tokenizer.json", plan.tokenizer.tokenizer, label);
  if (!plan.tokenizer.sentencepiece_model.empty())
    write_file(dir / "tokenizer.model", plan.tokenizer.sentencepiece_model);
  write_json(dir / "tokenizer_config.json", plan.tokenizer.tokenizer_config, label);
}

GgufImportReport import_gguf(const GgufImportOptions& o,
                             const std::function<void(size_t, size_t, const std::string&)>& progress) {
  const auto t0 = std::chrono::steady_clock::now();
  if (o.dtype != DType::F16 && o.dtype != DType::BF16 && o.dtype != DType::F32)
    throw Error("import-gguf: the output dtype must be F16, BF16 or F32");
  const GgufImportPlan plan = plan_gguf_import(o.gguf);
  const gguf::File* file = plan.file.get();
  const std::string label = o.gguf.string();
  const Meta meta(*file);
  json config = plan.config;
  config["torch_dtype"] = o.dtype == DType::F16 ? "float16" : o.dtype == DType::BF16 ? "bfloat16" : "float32";

  GgufImportReport report;
  report.architecture = plan.architecture;
  report.model_name = plan.model_name;
  report.source_types = plan.source_types;
  const std::vector<GgufTensorPlan>& maps = plan.tensors;

  AtomicDirectory out(o.out, o.overwrite);
  std::vector<std::string> names;
  for (const GgufTensorPlan& m : maps) names.push_back(m.name);
  CheckpointWriter writer(out.path(), names, {{"format", "pt"}}, o.max_shard_bytes);
  const size_t esize = dtype_size(o.dtype);
  std::vector<float> row;
  std::vector<std::byte> buf;
  for (size_t i = 0; i < maps.size(); ++i) {
    const GgufTensorPlan& m = maps[i];
    const gguf::TensorInfo& t = *m.src;
    if (progress) progress(i, maps.size(), m.name);
    const std::string what = label + ": tensor " + t.name;
    // Row by row: a row is one run of dims[0] elements, whole blocks.
    const int64_t cols = t.dims.empty() ? 1 : t.dims[0], rows = cols ? t.numel / cols : 0;
    const uint64_t row_bytes = rows ? t.nbytes / static_cast<uint64_t>(rows) : 0;
    const std::span<const std::byte> data = file->data(t);
    row.resize(static_cast<size_t>(cols));
    buf.resize(static_cast<size_t>(t.numel) * esize);
    for (int64_t r = 0; r < rows; ++r) {
      gguf::dequantize(t.type, data.subspan(static_cast<size_t>(r) * row_bytes, row_bytes), cols, row.data(), what);
      // A bias is one "row" of all its elements; its rotary permutation runs over elements.
      std::byte* dst = buf.data() + static_cast<size_t>(plan.hf_row(m, r) * cols) * esize;
      for (int64_t j = 0; j < cols; ++j) {
        const float x = row[static_cast<size_t>(j)];
        const int64_t at = plan.hf_element(m, j);
        if (o.dtype == DType::F32) {
          std::memcpy(dst + at * 4, &x, 4);
          continue;
        }
        const uint16_t v = o.dtype == DType::F16 ? float_to_half(x) : float_to_bf16(x);
        if (o.dtype == DType::F16 && std::isfinite(x) && (v & 0x7c00u) == 0x7c00u)
          meta.fail("tensor " + t.name + " holds " + std::to_string(x) +
                    ", beyond float16's range: import with --dtype bf16 or f32");
        std::memcpy(dst + at * 2, &v, 2);
      }
    }
    writer.add(m.name, o.dtype, m.shape, buf);
    file->release(t);
    report.bytes_in += t.nbytes;
    report.bytes_out += buf.size();
  }
  writer.finish();
  report.tensors = maps.size();

  write_gguf_side_files(plan, config, out.path());
  out.commit();
  report.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (progress) progress(maps.size(), maps.size(), "");
  return report;
}

}  // namespace fineserve::ckpt
