// Byte-level BPE (GPT-2, OPT, GPT-NeoX), bit-exact with Hugging Face's tokenizers:
//
//   text ──split on added tokens──▶ pieces ──GPT-2 pre-tokenizer──▶ words
//        ──bytes as GPT-2's printable alphabet──▶ merges by rank ──▶ ids
//
// and back: ids ──token strings──▶ bytes ──UTF-8 with U+FFFD for bad bytes──▶ text.
#pragma once

#include <array>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "models/tokenizer/added_tokens.h"
#include "models/tokenizer/tokenizer.h"

namespace fineserve {

// Everything a byte-level BPE tokenizer is made of, as the checkpoint's files describe it.
struct BpeSpec {
  std::unordered_map<std::string, int32_t> vocab;           // token (GPT-2 byte alphabet) -> id
  std::vector<std::pair<std::string, std::string>> merges;  // highest priority first
  std::string source = "tokenizer";                         // names the files in error messages
  std::string merges_source = "merges";                     // names the merges in error messages
  std::vector<AddedToken> added_tokens;                     // ids already assigned
  std::optional<std::string> unk_token;  // model-level: a byte missing from the vocab becomes this
  bool fuse_unk = false;                 // consecutive unknown bytes become one unk
  bool add_prefix_space = false;         // pre-tokenizer: a piece not starting with ' ' gets one
  bool use_regex = true;                 // pre-tokenizer: split pieces with the GPT-2 regex
  bool split_digits = false;             // pre-tokenizer: a "Digits" step before ByteLevel ...
  bool individual_digits = false;        // ... isolating each digit rather than runs of them
  int split_max_digits = 0;              // pre-tokenizer: Llama 3's "Split" regex step before
                                         // ByteLevel (0 = none), with \p{N}{1,split_max_digits}
  bool ignore_merges = false;            // a word that is itself in the vocab is one token
  std::vector<int32_t> prefix_ids;       // added before the text by encode(add_special_tokens)
  std::vector<int32_t> suffix_ids;       // ... and after it
  std::optional<int32_t> bos_id;
  std::optional<int32_t> eos_id;
};

class BpeTokenizer final : public Tokenizer {
 public:
  // Throws fineserve::Error when the spec is inconsistent (a merge of tokens not in the vocab,
  // an unknown unk_token, ids out of range).
  explicit BpeTokenizer(BpeSpec spec);

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

  const std::vector<int32_t>& prefix_ids() const { return prefix_ids_; }
  const std::vector<int32_t>& suffix_ids() const { return suffix_ids_; }

 private:
  struct Merge {
    int32_t rank;
    int32_t new_id;
  };
  struct StringHash {
    using is_transparent = void;
    size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
  };
  using WordCache = std::unordered_map<std::string, std::vector<int32_t>, StringHash, std::equal_to<>>;

  void encode_piece(std::string_view piece, std::vector<int32_t>& out) const;
  void encode_split(std::string_view piece, std::vector<int32_t>& out) const;
  void encode_word(std::string_view word, std::vector<int32_t>& out) const;
  // The merge loop: O(n log n) in the word's length with a heap of candidate pairs.
  void merge_word(std::string_view word, std::vector<int32_t>& out) const;
  const Merge* find_merge(int32_t left, int32_t right) const;

  std::unordered_map<std::string, int32_t, StringHash, std::equal_to<>> vocab_;
  std::unordered_map<uint64_t, Merge> merges_;  // key: left id << 32 | right id
  std::array<int32_t, 256> byte_ids_{};         // id of each byte's one-character token, or -1
  AddedVocabulary added_;
  std::vector<std::string> token_strings_;      // by id; empty for an id that names nothing
  std::vector<std::string> token_bytes_;        // by id: what decoding it produces
  enum : uint8_t { kNone, kNormal, kSpecial };
  std::vector<uint8_t> kind_;                   // by id: kNone for an id that names nothing
  std::optional<int32_t> unk_id_;
  bool fuse_unk_ = false;
  bool add_prefix_space_ = false;
  bool use_regex_ = true;
  bool split_digits_ = false;
  bool individual_digits_ = false;
  int split_max_digits_ = 0;
  bool ignore_merges_ = false;
  std::vector<int32_t> prefix_ids_, suffix_ids_;
  std::optional<int32_t> bos_id_, eos_id_;

  // Words seen before -> their ids. Text repeats words, so most words skip the merge loop.
  mutable std::shared_mutex cache_mutex_;
  mutable WordCache cache_;
};

// GPT-2's reversible map from bytes to printable characters (UTF-8): the alphabet of byte-level
// vocabularies ("Ġ" is the space byte).
const std::array<std::string, 256>& gpt2_byte_chars();

// Loaders; both throw fineserve::Error naming the file and field on bad input.
// dir/tokenizer.json (a "BPE" model with a ByteLevel pre-tokenizer and decoder), plus
// tokenizer_config.json / special_tokens_map.json for the special token names.
std::unique_ptr<BpeTokenizer> load_bpe_tokenizer_json(const std::filesystem::path& dir);
// dir/vocab.json + dir/merges.txt (+ the side files), as transformers' GPT2Tokenizer reads them:
// where no file names them, BOS, EOS and UNK are "<|endoftext|>" (when in the vocab).
std::unique_ptr<BpeTokenizer> load_bpe_vocab_merges(const std::filesystem::path& dir);

}  // namespace fineserve
