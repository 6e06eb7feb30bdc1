// SentencePiece tokenizers (Llama, Llama-2, Mistral, Mixtral): the checkpoint's tokenizer.model run
// through the SentencePiece library, wrapped to give exactly the ids and text of transformers'
// LlamaTokenizer (transformers 5, the Rust "tokenizers" backend that AutoTokenizer builds from
// tokenizer.model when there is no tokenizer.json, and from the tokenizer.json's vocab otherwise):
//
//   text ──split on added tokens (<s>, </s>, <unk>, tokenizer_config.json's)──▶ pieces
//        ──' ' as '▁', a '▁' put in front (Metaspace: see PrefixRule)──▶ SentencePiece BPE ──▶ ids
//
// and back: ids ──pieces, '▁' as ' ', <0xNN> as the byte NN──▶ bytes ──the first leading space
// dropped──▶ UTF-8 (U+FFFD for bad bytes).
//
// The model's own normalizer is switched off (no dummy prefix, no whitespace folding, no character
// map), as transformers does: the prefix space is this class's job, so that text after a special
// token follows HF's rule and not SentencePiece's.
#pragma once

#include <array>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "models/tokenizer/added_tokens.h"
#include "models/tokenizer/tokenizer.h"

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace fineserve {

// Where encode() puts the '▁' that stands for the space before the first word (HF's Metaspace
// prepend_scheme). Text that already starts with a space or '▁' gets none.
enum class PrefixRule {
  kNever,   // add_prefix_space=false
  kFirst,   // only the text at the very start of the input (legacy=false, transformers 5's default)
  kAlways,  // every piece of text between added tokens (legacy=true, e.g. Mistral's config)
};

// What tokenizer_config.json (and the loader's defaults) say about a SentencePiece tokenizer.
struct SentencePieceSpec {
  std::string model_bytes;                // the serialized tokenizer.model
  std::string source = "tokenizer.model";  // names the file in error messages
  // Added tokens from the side files; ids are assigned on construction (a content in the
  // vocabulary takes its id, another one the next free id after it). The model's control pieces
  // (<s>, </s>) become special added tokens and its user-defined pieces plain ones, as in HF.
  std::vector<AddedToken> added_tokens;
  std::optional<std::string> bos_token = "<s>";   // LlamaTokenizer's defaults
  std::optional<std::string> eos_token = "</s>";
  bool add_bos = true;
  bool add_eos = false;
  PrefixRule prefix = PrefixRule::kFirst;
  bool strip_leading_space = true;  // decoding drops the first ' ' (with add_prefix_space)
};

class SentencePieceTokenizer final : public Tokenizer {
 public:
  // Throws fineserve::Error when the model bytes are not a SentencePiece BPE model, or the spec
  // names tokens the vocabulary lacks.
  explicit SentencePieceTokenizer(SentencePieceSpec spec);
  ~SentencePieceTokenizer() override;

  using Tokenizer::encode;
  std::vector<int32_t> encode(std::string_view text, bool add_special_tokens,
                              std::span<const TextRange> literal) const override;
  int32_t vocab_size() const override { return static_cast<int32_t>(token_strings_.size()); }
  std::optional<int32_t> bos_id() const override { return bos_id_; }
  std::optional<int32_t> eos_id() const override { return eos_id_; }
  std::optional<int32_t> token_to_id(std::string_view token) const override;
  std::optional<std::string> id_to_token(int32_t id) const override;
  bool is_special(int32_t id) const override;
  void append_token_bytes(int32_t id, bool skip_special_tokens, bool at_start,
                          std::string& out) const override;

  PrefixRule prefix_rule() const { return prefix_; }

 private:
  // One piece of text between added tokens, '▁' prepended when `prefix` says so.
  void encode_text(std::string_view text, bool prefix, std::vector<int32_t>& out) const;

  std::unique_ptr<sentencepiece::SentencePieceProcessor> processor_;
  std::unordered_map<std::string, int32_t> vocab_;  // piece -> id (the model's pieces)
  std::array<int32_t, 256> byte_ids_{};             // id of the <0xNN> piece of each byte, or -1
  int32_t unk_id_ = -1;
  AddedVocabulary added_;
  std::vector<std::string> token_strings_;  // by id; empty for an id that names nothing
  std::vector<std::string> token_bytes_;    // by id: what decoding it produces
  enum : uint8_t { kNone, kNormal, kSpecial };
  std::vector<uint8_t> kind_;               // by id
  std::optional<int32_t> bos_id_, eos_id_;
  bool add_bos_ = true, add_eos_ = false;
  PrefixRule prefix_ = PrefixRule::kFirst;
  bool strip_leading_space_ = true;
};

// dir/tokenizer.model with dir/tokenizer_config.json (and special_tokens_map.json,
// added_tokens.json) when present. Throws fineserve::Error naming the file on a missing or
// unreadable model, one that is not SentencePiece BPE, or a tokenizer_class other than Llama's.
std::unique_ptr<SentencePieceTokenizer> load_sentencepiece_tokenizer(const std::filesystem::path& dir);

}  // namespace fineserve
