// Constrained decoding: which tokens of the vocabulary may come next under a grammar.
//
//   auto vocab = VocabIndex::from_tokenizer(tokenizer, model_vocab, eos_ids);   // once per model
//   auto g = compile_grammar(json_schema_grammar(schema), vocab);               // once per request
//   GrammarConstraint c(g);                                                    // per sequence
//   each step: c.mask_logits(logits) (false: no token allowed), sample, c.advance(token)
//
// How the allowed set is found without testing every token: the vocabulary's byte strings form a
// trie (VocabIndex), and the set for a DFA state is one walk of that trie in step with the DFA,
// which skips a whole subtree as soon as its prefix leaves the language. Each state's set is
// cached in the Grammar (shared by every sequence of that grammar), so a state costs one walk
// however many sequences and steps visit it; afterwards a step is one cache look-up.
//
// Tokens are matched by the bytes they add to decoded text, so byte-level BPE ("Ġ" = space) and
// SentencePiece ("▁" = space, <0xNN> byte tokens) look alike, and a token that ends inside a
// multi-byte UTF-8 character simply leaves the DFA between bytes. Special tokens (they decode to
// nothing) are never allowed, except the end-of-sequence ids, which are allowed exactly in
// accepting states.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "engine/grammar/automaton.h"
#include "engine/grammar/regex.h"

namespace fineserve {
class Tokenizer;
}

namespace fineserve::grammar {

class VocabIndex {
 public:
  // token_bytes[id]: what token id adds to decoded text (empty: never allowed). start_bytes:
  // what it adds as the first decoded token when that differs (SentencePiece drops a leading
  // space there); empty vector when no token differs, else one entry per id.
  VocabIndex(std::vector<std::string> token_bytes, std::vector<std::string> start_bytes,
             std::vector<int32_t> eos_ids);

  // width: the number of logits per row (the model's vocabulary, possibly more rows than the
  // tokenizer has tokens). eos_ids: the ids that end a sequence.
  static std::shared_ptr<const VocabIndex> from_tokenizer(const Tokenizer& tokenizer, int32_t width,
                                                          std::vector<int32_t> eos_ids);

  int32_t size() const { return static_cast<int32_t>(bytes_.size()); }
  const std::string& bytes(int32_t id) const { return bytes_[static_cast<size_t>(id)]; }
  const std::string& start_bytes(int32_t id) const {
    return start_.empty() ? bytes_[static_cast<size_t>(id)] : start_[static_cast<size_t>(id)];
  }
  bool has_start_forms() const { return !start_.empty(); }
  const std::vector<int32_t>& eos_ids() const { return eos_; }
  bool is_eos(int32_t id) const;

  // The trie: node 0 is the root (the empty prefix); a node's children are the contiguous range
  // [child_begin, child_end) and the tokens whose bytes end exactly there [token_begin, token_end)
  // of trie_tokens().
  struct TrieNode {
    int32_t child_begin = 0, child_end = 0;
    int32_t token_begin = 0, token_end = 0;
    uint8_t byte = 0;
  };
  const std::vector<TrieNode>& trie() const { return trie_; }
  const std::vector<int32_t>& trie_tokens() const { return trie_tokens_; }

 private:
  void build_trie();

  std::vector<std::string> bytes_;
  std::vector<std::string> start_;
  std::vector<int32_t> eos_;
  std::vector<TrieNode> trie_;
  std::vector<int32_t> trie_tokens_;
};

// A set of token ids as a bitset over the vocabulary.
struct TokenMask {
  std::vector<uint64_t> words;
  int32_t count = 0;
  bool test(int32_t id) const {
    return id >= 0 && static_cast<size_t>(id >> 6) < words.size() && ((words[static_cast<size_t>(id) >> 6] >> (id & 63)) & 1);
  }
  // Sets every logit of `logits` [width] whose token is not in the mask to -infinity; false
  // (changing nothing) when the mask is empty.
  bool apply(float* logits, int32_t width) const;
};

// A compiled grammar bound to one vocabulary; shared (thread-safe) by all sequences using it.
class Grammar {
 public:
  Grammar(Dfa dfa, std::shared_ptr<const VocabIndex> vocab, size_t max_cached_masks);

  const Dfa& dfa() const { return dfa_; }
  const VocabIndex& vocab() const { return *vocab_; }
  // Tokens allowed in DFA state `state` (EOS included when it accepts). `first`: nothing has
  // been generated yet (SentencePiece's first piece loses its leading space).
  std::shared_ptr<const TokenMask> allowed(int32_t state, bool first) const;
  // The same set by testing every token: the reference the trie walk is tested against.
  TokenMask allowed_brute_force(int32_t state, bool first) const;
  size_t cached_masks() const;

 private:
  TokenMask walk(int32_t state) const;
  void add_eos(int32_t state, TokenMask& m) const;

  Dfa dfa_;
  std::shared_ptr<const VocabIndex> vocab_;
  size_t max_cached_;
  mutable std::mutex mu_;
  mutable std::vector<std::shared_ptr<const TokenMask>> cache_;  // [state]
  mutable size_t num_cached_ = 0;
  mutable std::shared_ptr<const TokenMask> first_mask_;  // start state with start forms
};

struct GrammarLimits {
  AutomatonLimits automaton;
  // Memory for one grammar's cached masks (vocabulary / 8 bytes each); states beyond it have their
  // mask recomputed on every visit.
  size_t max_mask_cache_bytes = 16u << 20;
};

// Throws fineserve::Error when the grammar is too large or matches nothing.
std::shared_ptr<const Grammar> compile_grammar(const NodePtr& root, std::shared_ptr<const VocabIndex> vocab,
                                               const GrammarLimits& limits = {});

// The state of one sequence.
class GrammarConstraint {
 public:
  explicit GrammarConstraint(std::shared_ptr<const Grammar> grammar);

  // The tokens allowed next.
  std::shared_ptr<const TokenMask> allowed() const;
  // Fills `out` (resized to the vocabulary) with allowed().
  void allowed(std::vector<bool>& out) const;
  // Sets every disallowed logit of `logits` [width] to -infinity; false when no token is allowed
  // (the sequence cannot continue: do not sample). allowed()->apply(logits, width).
  bool mask_logits(float* logits, int32_t width) const { return allowed()->apply(logits, width); }
  // Moves past `token`; false (and the constraint is dead) when the token was not allowed. An
  // allowed end-of-sequence token leaves the constraint finished (accepting, nothing allowed).
  bool advance(int32_t token);

  bool is_accepting() const { return finished_ || grammar_->dfa().accepting(state_); }
  // No token can follow (finished, or a disallowed token was forced in).
  bool is_dead() const;
  bool is_finished() const { return finished_; }

 private:
  std::shared_ptr<const Grammar> grammar_;
  int32_t state_;
  bool first_ = true;
  bool finished_ = false;
};

}  // namespace fineserve::grammar
