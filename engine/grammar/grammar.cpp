#include "engine/grammar/grammar.h"

#include <algorithm>
#include <limits>
#include <numeric>

#include "kernels/base.h"
#include "models/tokenizer/tokenizer.h"

namespace fineserve::grammar {

// ---- VocabIndex -------------------------------------------------------------------------------

VocabIndex::VocabIndex(std::vector<std::string> token_bytes, std::vector<std::string> start_bytes,
                       std::vector<int32_t> eos_ids)
    : bytes_(std::move(token_bytes)), start_(std::move(start_bytes)), eos_(std::move(eos_ids)) {
  FS_ASSERT(start_.empty() || start_.size() == bytes_.size());
  std::sort(eos_.begin(), eos_.end());
  eos_.erase(std::unique(eos_.begin(), eos_.end()), eos_.end());
  std::erase_if(eos_, [&](int32_t id) { return id < 0 || id >= size(); });
  // An EOS id is matched as EOS, never by its text.
  for (int32_t id : eos_) {
    bytes_[static_cast<size_t>(id)].clear();
    if (!start_.empty()) start_[static_cast<size_t>(id)].clear();
  }
  build_trie();
}

std::shared_ptr<const VocabIndex> VocabIndex::from_tokenizer(const Tokenizer& tokenizer, int32_t width,
                                                             std::vector<int32_t> eos_ids) {
  std::vector<std::string> bytes(static_cast<size_t>(width)), start(static_cast<size_t>(width));
  bool differs = false;
  const int32_t n = std::min(width, tokenizer.vocab_size());
  for (int32_t id = 0; id < n; ++id) {
    if (tokenizer.is_special(id)) continue;  // decodes to nothing: never allowed
    tokenizer.append_token_bytes(id, /*skip_special_tokens=*/true, /*at_start=*/false, bytes[static_cast<size_t>(id)]);
    tokenizer.append_token_bytes(id, true, /*at_start=*/true, start[static_cast<size_t>(id)]);
    differs = differs || start[static_cast<size_t>(id)] != bytes[static_cast<size_t>(id)];
  }
  if (!differs) start.clear();
  return std::make_shared<const VocabIndex>(std::move(bytes), std::move(start), std::move(eos_ids));
}

bool VocabIndex::is_eos(int32_t id) const { return std::binary_search(eos_.begin(), eos_.end(), id); }

void VocabIndex::build_trie() {
  std::vector<int32_t> order;
  for (int32_t id = 0; id < size(); ++id)
    if (!bytes_[static_cast<size_t>(id)].empty()) order.push_back(id);
  std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
    return bytes_[static_cast<size_t>(a)] != bytes_[static_cast<size_t>(b)] ? bytes_[static_cast<size_t>(a)] < bytes_[static_cast<size_t>(b)] : a < b;
  });
  trie_.assign(1, TrieNode{});
  trie_tokens_.clear();
  // Breadth-first over groups of the sorted list: every entry of [lo, hi) shares the node's
  // prefix of length depth; those of exactly that length end here, the rest split by next byte.
  struct Work {
    int32_t node;
    size_t lo, hi, depth;
  };
  std::vector<Work> queue{{0, 0, order.size(), 0}};
  for (size_t q = 0; q < queue.size(); ++q) {
    const Work w = queue[q];
    size_t i = w.lo;
    trie_[static_cast<size_t>(w.node)].token_begin = static_cast<int32_t>(trie_tokens_.size());
    while (i < w.hi && bytes_[static_cast<size_t>(order[i])].size() == w.depth) trie_tokens_.push_back(order[i++]);
    trie_[static_cast<size_t>(w.node)].token_end = static_cast<int32_t>(trie_tokens_.size());
    trie_[static_cast<size_t>(w.node)].child_begin = static_cast<int32_t>(trie_.size());
    while (i < w.hi) {
      const auto b = static_cast<uint8_t>(bytes_[static_cast<size_t>(order[i])][w.depth]);
      size_t j = i;
      while (j < w.hi && static_cast<uint8_t>(bytes_[static_cast<size_t>(order[j])][w.depth]) == b) ++j;
      TrieNode child;
      child.byte = b;
      trie_.push_back(child);
      queue.push_back({static_cast<int32_t>(trie_.size() - 1), i, j, w.depth + 1});
      i = j;
    }
    trie_[static_cast<size_t>(w.node)].child_end = static_cast<int32_t>(trie_.size());
  }
}

// ---- Grammar ----------------------------------------------------------------------------------

namespace {

void set_bit(TokenMask& m, int32_t id) {
  uint64_t& w = m.words[static_cast<size_t>(id) >> 6];
  const uint64_t bit = uint64_t{1} << (id & 63);
  if (!(w & bit)) w |= bit, ++m.count;
}

}  // namespace

Grammar::Grammar(Dfa dfa, std::shared_ptr<const VocabIndex> vocab, size_t max_cached_masks)
    : dfa_(std::move(dfa)), vocab_(std::move(vocab)), max_cached_(max_cached_masks),
      cache_(static_cast<size_t>(std::max(dfa_.num_states(), 0))) {}

void Grammar::add_eos(int32_t state, TokenMask& m) const {
  if (!dfa_.accepting(state)) return;
  for (int32_t id : vocab_->eos_ids()) set_bit(m, id);
}

TokenMask Grammar::walk(int32_t state) const {
  TokenMask m;
  m.words.assign((static_cast<size_t>(vocab_->size()) + 63) / 64, 0);
  if (state < 0) return m;
  const auto& trie = vocab_->trie();
  const auto& toks = vocab_->trie_tokens();
  // Depth-first over (trie node, DFA state after its bytes); a subtree is skipped as soon as its
  // prefix is no longer a prefix of the language.
  std::vector<std::pair<int32_t, int32_t>> stack;
  const VocabIndex::TrieNode& root = trie[0];
  for (int32_t c = root.child_begin; c < root.child_end; ++c) stack.emplace_back(c, state);
  while (!stack.empty()) {
    const auto [node_id, from] = stack.back();
    stack.pop_back();
    const VocabIndex::TrieNode& node = trie[static_cast<size_t>(node_id)];
    const int32_t s = dfa_.next(from, node.byte);
    if (s < 0) continue;
    for (int32_t t = node.token_begin; t < node.token_end; ++t) set_bit(m, toks[static_cast<size_t>(t)]);
    for (int32_t c = node.child_begin; c < node.child_end; ++c) stack.emplace_back(c, s);
  }
  add_eos(state, m);
  return m;
}

TokenMask Grammar::allowed_brute_force(int32_t state, bool first) const {
  TokenMask m;
  m.words.assign((static_cast<size_t>(vocab_->size()) + 63) / 64, 0);
  if (state < 0) return m;
  for (int32_t id = 0; id < vocab_->size(); ++id) {
    const std::string& b = first ? vocab_->start_bytes(id) : vocab_->bytes(id);
    if (!b.empty() && dfa_.walk(state, b) >= 0) set_bit(m, id);
  }
  add_eos(state, m);
  return m;
}

std::shared_ptr<const TokenMask> Grammar::allowed(int32_t state, bool first) const {
  if (state < 0) return std::make_shared<const TokenMask>(walk(state));
  if (first && vocab_->has_start_forms()) {
    // Only the start state is ever asked with `first`; its mask is computed once, by testing
    // every token's start form (one pass over the vocabulary per grammar).
    FS_ASSERT(state == dfa_.start());
    std::lock_guard<std::mutex> lock(mu_);
    if (!first_mask_) first_mask_ = std::make_shared<const TokenMask>(allowed_brute_force(state, true));
    return first_mask_;
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (cache_[static_cast<size_t>(state)]) return cache_[static_cast<size_t>(state)];
  }
  auto m = std::make_shared<const TokenMask>(walk(state));
  std::lock_guard<std::mutex> lock(mu_);
  if (!cache_[static_cast<size_t>(state)] && num_cached_ < max_cached_) {
    cache_[static_cast<size_t>(state)] = m;
    ++num_cached_;
  }
  return m;
}

size_t Grammar::cached_masks() const {
  std::lock_guard<std::mutex> lock(mu_);
  return num_cached_;
}

std::shared_ptr<const Grammar> compile_grammar(const NodePtr& root, std::shared_ptr<const VocabIndex> vocab,
                                               const GrammarLimits& limits) {
  Dfa dfa = compile_dfa(*root, limits.automaton);
  if (dfa.start() < 0) throw Error("the grammar matches no output at all");
  const size_t mask_bytes = (static_cast<size_t>(vocab->size()) + 63) / 64 * 8 + sizeof(TokenMask);
  const size_t max_cached = std::max<size_t>(limits.max_mask_cache_bytes / mask_bytes, 1);
  return std::make_shared<const Grammar>(std::move(dfa), std::move(vocab), max_cached);
}

// ---- GrammarConstraint ------------------------------------------------------------------------

GrammarConstraint::GrammarConstraint(std::shared_ptr<const Grammar> grammar)
    : grammar_(std::move(grammar)), state_(grammar_->dfa().start()) {}

std::shared_ptr<const TokenMask> GrammarConstraint::allowed() const {
  if (finished_) return grammar_->allowed(Dfa::kDead, false);
  return grammar_->allowed(state_, first_);
}

void GrammarConstraint::allowed(std::vector<bool>& out) const {
  const auto m = allowed();
  out.assign(static_cast<size_t>(grammar_->vocab().size()), false);
  for (int32_t id = 0; id < grammar_->vocab().size(); ++id) out[static_cast<size_t>(id)] = m->test(id);
}

bool TokenMask::apply(float* logits, int32_t width) const {
  if (count == 0) return false;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  // Word by word: most words of a mask are all-zero (set 64 logits) or all-one (skip).
  for (int32_t base = 0; base < width; base += 64) {
    const size_t w = static_cast<size_t>(base) >> 6;
    const uint64_t bits = w < words.size() ? words[w] : 0;
    const int32_t n = std::min<int32_t>(64, width - base);
    if (bits == ~uint64_t{0} && n == 64) continue;
    for (int32_t i = 0; i < n; ++i)
      if (!((bits >> i) & 1)) logits[base + i] = kNegInf;
  }
  return true;
}

bool GrammarConstraint::advance(int32_t token) {
  if (finished_ || state_ < 0) {
    state_ = Dfa::kDead;
    finished_ = false;
    return false;
  }
  const VocabIndex& v = grammar_->vocab();
  if (token >= 0 && token < v.size() && v.is_eos(token) && grammar_->dfa().accepting(state_)) {
    finished_ = true;
    return true;
  }
  const bool first = first_;
  first_ = false;
  if (token < 0 || token >= v.size()) {
    state_ = Dfa::kDead;
    return false;
  }
  const std::string& b = first ? v.start_bytes(token) : v.bytes(token);
  const int32_t next = b.empty() ? Dfa::kDead : grammar_->dfa().walk(state_, b);
  state_ = next;
  return next >= 0;
}

bool GrammarConstraint::is_dead() const { return allowed()->count == 0; }

}  // namespace fineserve::grammar
