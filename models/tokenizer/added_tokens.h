// Added tokens (Hugging Face "added_tokens"): strings such as "<|endoftext|>" or "</s>" that are cut
// out of the input before pre-tokenization and become one id each, whatever the BPE merges say.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "models/tokenizer/tokenizer.h"  // TextRange

namespace fineserve {

struct AddedToken {
  std::string content;
  int32_t id = -1;
  bool special = false;      // skipped by decode(skip_special_tokens=true)
  bool single_word = false;  // matches only when no word character touches it on either side
  bool lstrip = false;       // also swallows the whitespace before it
  bool rstrip = false;       // also swallows the whitespace after it
  bool normalized = false;   // matched in the second pass (HF: against the normalized text)
};

// One piece of split input: ordinary text (token_id < 0) or an added token.
struct TextSegment {
  std::string_view text;
  int32_t token_id = -1;
};

class AddedVocabulary {
 public:
  AddedVocabulary() = default;
  // Tokens with empty content are ignored, as HF does. Contents must be unique.
  explicit AddedVocabulary(std::vector<AddedToken> tokens);

  // Splits `text` like HF's AddedVocabulary::extract_and_normalize with no normalizer: first the
  // tokens with normalized=false are cut out of the whole text, then those with normalized=true
  // out of the remaining pieces; each pass takes leftmost-longest, non-overlapping matches and
  // honours single_word, lstrip and rstrip. Replaces `out`. A special token overlapping one of
  // the `literal` byte ranges of `text` is not matched there.
  void split(std::string_view text, std::vector<TextSegment>& out, std::span<const TextRange> literal = {}) const;

  const AddedToken* find(int32_t id) const;
  std::optional<int32_t> id_of(std::string_view content) const;
  const std::vector<AddedToken>& tokens() const { return tokens_; }
  bool empty() const { return tokens_.empty(); }

 private:
  // A byte trie over the contents of one pass's tokens, for longest match at a position.
  struct Trie {
    struct Node {
      std::vector<std::pair<uint8_t, int32_t>> children;  // (byte, node index), sorted by byte
      int32_t token = -1;                                 // index into tokens_ ending here
    };
    std::vector<Node> nodes;
    bool first_byte[256] = {};  // quick rejection of positions where no token can start

    void insert(std::string_view s, int32_t token);
    // Longest token starting at text[pos]: (index into tokens_, length), or token -1.
    std::pair<int32_t, size_t> longest_at(std::string_view text, size_t pos) const;
  };

  // `base`: the start of the whole text, which `literal` offsets count from.
  void split_pass(const Trie& trie, std::string_view text, std::vector<TextSegment>& out, const char* base,
                  std::span<const TextRange> literal) const;

  std::vector<AddedToken> tokens_;
  std::unordered_map<int32_t, size_t> by_id_;
  std::unordered_map<std::string, size_t> by_content_;
  Trie raw_, normalized_;
};

}  // namespace fineserve
