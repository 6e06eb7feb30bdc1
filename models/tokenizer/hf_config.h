// Reading the Hugging Face tokenizer side files: tokenizer_config.json, special_tokens_map.json and
// added_tokens.json, which name the special tokens (BOS, EOS, ...) and say whether to add a BOS.
#pragma once

#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "models/tokenizer/added_tokens.h"

namespace fineserve {

// Reads a whole file; throws fineserve::Error naming it when it cannot be read.
std::string read_text_file(const std::filesystem::path& path);
// Reads and parses a JSON file; throws fineserve::Error naming it (and the parse position).
nlohmann::json read_json_file(const std::filesystem::path& path);

// A token as the side files spell one: a string, or {"content": ..., "lstrip": ..., ...}.
struct TokenSpec {
  std::string content;
  bool lstrip = false;
  bool rstrip = false;
  bool single_word = false;
};

// Parses a TokenSpec; nullopt for JSON null. Throws fineserve::Error naming `where` otherwise.
std::optional<TokenSpec> parse_token_spec(const nlohmann::json& value, const std::string& where);

// A special token slot transformers knows by name.
struct NamedSpecialToken {
  std::string key;                  // "bos_token", "eos_token", ...
  bool given = false;               // a file sets the key (possibly to null)
  std::optional<TokenSpec> token;   // nullopt: not given, or given as null
};

struct HfTokenizerConfig {
  // bos_token, eos_token, unk_token, sep_token, pad_token, cls_token, mask_token: transformers'
  // order, which is also the order new ids are handed out in. special_tokens_map.json wins over
  // tokenizer_config.json, as in transformers.
  std::vector<NamedSpecialToken> named;
  std::vector<TokenSpec> additional_special;     // additional_special_tokens / extra_special_tokens
  std::vector<AddedToken> added_tokens_decoder;  // tokenizer_config.json, with explicit ids
  std::vector<AddedToken> legacy_added_tokens;   // added_tokens.json {content: id}
  std::optional<bool> add_bos_token;
  std::optional<bool> add_eos_token;
  std::optional<bool> add_prefix_space;

  const NamedSpecialToken& slot(const std::string& key) const;
  NamedSpecialToken& slot(const std::string& key);
};

// Reads whichever of the three files exist in `dir` (none is required).
HfTokenizerConfig read_hf_tokenizer_config(const std::filesystem::path& dir);

}  // namespace fineserve
