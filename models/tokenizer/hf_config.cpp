#include "models/tokenizer/hf_config.h"

#include <charconv>
#include <fstream>
#include <sstream>
#include <system_error>

#include "kernels/base.h"

namespace fineserve {

using nlohmann::json;

std::string read_text_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error("cannot open " + path.string());
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) throw Error("cannot read " + path.string());
  return std::move(ss).str();
}

json read_json_file(const std::filesystem::path& path) {
  const std::string text = read_text_file(path);
  try {
    return json::parse(text);
  } catch (const json::parse_error& e) {
    throw Error(path.string() + ": invalid JSON: " + e.what());
  }
}

namespace {

bool optional_bool(const json& obj, const char* key, bool fallback, const std::string& where) {
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return fallback;
  if (!it->is_boolean()) throw Error(where + ": \"" + key + "\" must be true or false");
  return it->get<bool>();
}

std::optional<bool> maybe_bool(const json& obj, const char* key, const std::string& where) {
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return std::nullopt;
  if (!it->is_boolean()) throw Error(where + ": \"" + key + "\" must be true or false");
  return it->get<bool>();
}

const char* const kNamedKeys[] = {"bos_token", "eos_token", "unk_token", "sep_token",
                                  "pad_token", "cls_token", "mask_token"};

// Reads the named and additional special tokens of one file; they replace ones read before.
void read_special_tokens(const json& obj, const std::string& where, HfTokenizerConfig& cfg) {
  for (auto& slot : cfg.named) {
    auto it = obj.find(slot.key);
    if (it == obj.end()) continue;
    slot.given = true;
    slot.token = parse_token_spec(*it, where + " \"" + slot.key + "\"");
  }
  for (const char* key : {"additional_special_tokens", "extra_special_tokens"}) {
    auto it = obj.find(key);
    if (it == obj.end() || it->is_null()) continue;
    // extra_special_tokens may also be a {name: token} object (transformers v5).
    if (!it->is_array() && !it->is_object()) {
      throw Error(where + ": \"" + key + "\" must be a list of tokens");
    }
    std::vector<TokenSpec> tokens;
    for (const auto& v : *it) {
      if (auto t = parse_token_spec(v, where + " \"" + key + "\"")) tokens.push_back(*t);
    }
    cfg.additional_special = std::move(tokens);
  }
}

int32_t parse_token_id(std::string_view s, const std::string& where) {
  int64_t id = -1;
  auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), id);
  if (ec != std::errc() || end != s.data() + s.size() || id < 0 || id >= (int64_t{1} << 24)) {
    throw Error(where + ": \"" + std::string(s) + "\" is not a valid token id");
  }
  return static_cast<int32_t>(id);
}

}  // namespace

std::optional<TokenSpec> parse_token_spec(const json& v, const std::string& where) {
  if (v.is_null()) return std::nullopt;
  if (v.is_string()) return TokenSpec{v.get<std::string>()};
  if (!v.is_object()) throw Error(where + ": a token must be a string or an object with \"content\"");
  auto it = v.find("content");
  if (it == v.end() || !it->is_string()) throw Error(where + ": token object has no string \"content\"");
  TokenSpec t;
  t.content = it->get<std::string>();
  t.lstrip = optional_bool(v, "lstrip", false, where);
  t.rstrip = optional_bool(v, "rstrip", false, where);
  t.single_word = optional_bool(v, "single_word", false, where);
  return t;
}

const NamedSpecialToken& HfTokenizerConfig::slot(const std::string& key) const {
  for (const auto& s : named) {
    if (s.key == key) return s;
  }
  assert_fail("slot(key)", __FILE__, __LINE__, "unknown special token slot");
}

NamedSpecialToken& HfTokenizerConfig::slot(const std::string& key) {
  return const_cast<NamedSpecialToken&>(std::as_const(*this).slot(key));
}

HfTokenizerConfig read_hf_tokenizer_config(const std::filesystem::path& dir) {
  HfTokenizerConfig cfg;
  for (const char* key : kNamedKeys) cfg.named.push_back({key, false, std::nullopt});
  std::error_code ec;

  const auto config_path = dir / "tokenizer_config.json";
  if (std::filesystem::exists(config_path, ec)) {
    const json j = read_json_file(config_path);
    const std::string where = config_path.string();
    if (!j.is_object()) throw Error(where + ": expected a JSON object");
    read_special_tokens(j, where, cfg);
    cfg.add_bos_token = maybe_bool(j, "add_bos_token", where);
    cfg.add_eos_token = maybe_bool(j, "add_eos_token", where);
    cfg.add_prefix_space = maybe_bool(j, "add_prefix_space", where);
    if (auto it = j.find("added_tokens_decoder"); it != j.end() && !it->is_null()) {
      if (!it->is_object()) throw Error(where + ": \"added_tokens_decoder\" must be an object");
      for (const auto& [key, value] : it->items()) {
        const std::string at = where + " added_tokens_decoder[\"" + key + "\"]";
        auto spec = parse_token_spec(value, at);
        if (!spec) continue;
        AddedToken t;
        t.id = parse_token_id(key, at);
        t.content = spec->content;
        t.lstrip = spec->lstrip;
        t.rstrip = spec->rstrip;
        t.single_word = spec->single_word;
        t.special = value.is_object() ? optional_bool(value, "special", false, at) : false;
        t.normalized = value.is_object() ? optional_bool(value, "normalized", !t.special, at) : !t.special;
        cfg.added_tokens_decoder.push_back(std::move(t));
      }
    }
  }

  const auto map_path = dir / "special_tokens_map.json";
  if (std::filesystem::exists(map_path, ec)) {
    const json j = read_json_file(map_path);
    if (!j.is_object()) throw Error(map_path.string() + ": expected a JSON object");
    read_special_tokens(j, map_path.string(), cfg);
  }

  const auto added_path = dir / "added_tokens.json";
  if (std::filesystem::exists(added_path, ec)) {
    const json j = read_json_file(added_path);
    const std::string where = added_path.string();
    if (!j.is_object()) throw Error(where + ": expected an object {token: id}");
    for (const auto& [content, id] : j.items()) {
      if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() >= (int64_t{1} << 24)) {
        throw Error(where + ": id of \"" + content + "\" is not a valid token id");
      }
      AddedToken t;
      t.content = content;
      t.id = id.get<int32_t>();
      t.normalized = true;
      cfg.legacy_added_tokens.push_back(std::move(t));
    }
  }
  return cfg;
}

}  // namespace fineserve
