#include "models/tokenizer/bpe.h"

#include <algorithm>
#include <functional>

#include <nlohmann/json.hpp>

#include "kernels/base.h"
#include "models/tokenizer/hf_config.h"
#include "models/tokenizer/pretokenize.h"
#include "models/tokenizer/utf8.h"

namespace fineserve {

using nlohmann::json;

namespace {

constexpr int64_t kMaxTokenId = (int64_t{1} << 24) - 1;  // far above any real vocabulary
constexpr size_t kCacheCapacity = 1 << 16;                // words
constexpr size_t kMaxCachedWordBytes = 256;               // as HF: long words are rarely repeated

// Inverse of gpt2_byte_chars(): code point -> byte, or -1. Every stand-in is below U+0144.
const std::array<int16_t, 0x144>& gpt2_char_bytes() {
  static const auto table = [] {
    std::array<int16_t, 0x144> t;
    t.fill(-1);
    for (int b = 0; b < 256; ++b) {
      const utf8::Decoded d = utf8::decode(gpt2_byte_chars()[static_cast<size_t>(b)], 0);
      t[d.code_point] = static_cast<int16_t>(b);
    }
    return t;
  }();
  return table;
}

// What HF's ByteLevel decoder makes of one token string: its characters mapped back to bytes when
// every one of them is a byte stand-in, else the string's own UTF-8 (added tokens like "→").
std::string token_to_bytes(std::string_view token) {
  std::string bytes;
  for (size_t pos = 0; pos < token.size();) {
    const utf8::Decoded d = utf8::decode(token, pos);
    const auto& table = gpt2_char_bytes();
    if (d.code_point >= table.size() || table[d.code_point] < 0) return std::string(token);
    bytes += static_cast<char>(table[d.code_point]);
    pos += d.length;
  }
  return bytes;
}

int32_t checked_id(int64_t id, const std::string& what) {
  if (id < 0 || id > kMaxTokenId) throw Error(what + ": token id " + std::to_string(id) + " is out of range");
  return static_cast<int32_t>(id);
}

}  // namespace

const std::array<std::string, 256>& gpt2_byte_chars() {
  // Printable Latin-1 bytes stand for themselves; the others (controls, space, NBSP, soft hyphen)
  // get U+0100 onwards in byte order, so that every byte is a visible, non-space character.
  static const auto table = [] {
    std::array<std::string, 256> t;
    uint32_t extra = 0;
    for (uint32_t b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
      utf8::append(printable ? b : 256 + extra++, t[b]);
    }
    return t;
  }();
  return table;
}

// ---- the tokenizer -------------------------------------------------------------------------

BpeTokenizer::BpeTokenizer(BpeSpec spec)
    : fuse_unk_(spec.fuse_unk),
      add_prefix_space_(spec.add_prefix_space),
      use_regex_(spec.use_regex),
      split_digits_(spec.split_digits),
      individual_digits_(spec.individual_digits),
      split_max_digits_(spec.split_max_digits),
      ignore_merges_(spec.ignore_merges) {
  int64_t max_id = -1;
  for (const auto& [token, id] : spec.vocab) max_id = std::max<int64_t>(max_id, checked_id(id, spec.source));
  for (const auto& t : spec.added_tokens) max_id = std::max<int64_t>(max_id, checked_id(t.id, spec.source));
  const auto size = static_cast<size_t>(max_id + 1);
  token_strings_.resize(size);
  token_bytes_.resize(size);
  kind_.assign(size, kNone);

  vocab_.reserve(spec.vocab.size());
  for (const auto& [token, id] : spec.vocab) {
    auto& slot = token_strings_[static_cast<size_t>(id)];
    // Two strings with one id: keep the smaller, so that the choice does not depend on hashing.
    if (kind_[static_cast<size_t>(id)] == kNone || token < slot) slot = token;
    kind_[static_cast<size_t>(id)] = kNormal;
  }
  while (!spec.vocab.empty()) {  // move the strings over instead of copying 50,000 of them
    auto node = spec.vocab.extract(spec.vocab.begin());
    vocab_.emplace(std::move(node.key()), node.mapped());
  }
  for (size_t b = 0; b < 256; ++b) {
    auto it = vocab_.find(gpt2_byte_chars()[b]);
    byte_ids_[b] = it == vocab_.end() ? -1 : it->second;
  }

  merges_.reserve(spec.merges.size());
  for (size_t rank = 0; rank < spec.merges.size(); ++rank) {
    const std::string& left = spec.merges[rank].first;  // not a structured binding: clang 14
    const std::string& right = spec.merges[rank].second;  // cannot capture those in a lambda
    auto id_of = [&](const std::string& token) {
      auto it = vocab_.find(token);
      if (it == vocab_.end()) {
        throw Error(spec.merges_source + ": merge " + std::to_string(rank + 1) + " \"" + left + " " +
                    right + "\": \"" + token + "\" is not in the vocabulary");
      }
      return it->second;
    };
    const int32_t a = id_of(left);
    const int32_t b = id_of(right);
    const int32_t merged = id_of(left + right);
    // A repeated pair keeps its last rank, as in HF (a map filled in file order).
    merges_[(uint64_t(uint32_t(a)) << 32) | uint32_t(b)] = Merge{static_cast<int32_t>(rank), merged};
  }

  added_ = AddedVocabulary(spec.added_tokens);
  for (const AddedToken& t : added_.tokens()) {
    // Added tokens win over the vocabulary for id -> string, as in HF.
    token_strings_[static_cast<size_t>(t.id)] = t.content;
    kind_[static_cast<size_t>(t.id)] = t.special ? kSpecial : kNormal;
  }
  // HF skips by content: a vocabulary id spelled like a special token is skipped too.
  for (const AddedToken& t : added_.tokens()) {
    auto it = vocab_.find(t.content);
    if (t.special && it != vocab_.end()) kind_[static_cast<size_t>(it->second)] = kSpecial;
  }
  for (size_t id = 0; id < size; ++id) {
    if (kind_[id] != kNone) token_bytes_[id] = token_to_bytes(token_strings_[id]);
  }

  if (spec.unk_token) {
    auto it = vocab_.find(*spec.unk_token);
    if (it == vocab_.end()) {
      throw Error(spec.source + ": unk_token \"" + *spec.unk_token + "\" is not in the vocabulary");
    }
    unk_id_ = it->second;
  }
  auto check = [&](int32_t id, const char* what) {
    if (id < 0 || static_cast<size_t>(id) >= size || kind_[static_cast<size_t>(id)] == kNone) {
      throw Error(spec.source + ": " + what + " id " + std::to_string(id) + " names no token");
    }
  };
  for (int32_t id : spec.prefix_ids) check(id, "post-processor");
  for (int32_t id : spec.suffix_ids) check(id, "post-processor");
  if (spec.bos_id) check(*spec.bos_id, "BOS");
  if (spec.eos_id) check(*spec.eos_id, "EOS");
  prefix_ids_ = spec.prefix_ids;
  suffix_ids_ = spec.suffix_ids;
  bos_id_ = spec.bos_id;
  eos_id_ = spec.eos_id;
}

std::optional<int32_t> BpeTokenizer::token_to_id(std::string_view token) const {
  if (auto id = added_.id_of(token)) return id;
  auto it = vocab_.find(token);
  if (it == vocab_.end()) return std::nullopt;
  return it->second;
}

std::optional<std::string> BpeTokenizer::id_to_token(int32_t id) const {
  if (id < 0 || id >= vocab_size() || kind_[static_cast<size_t>(id)] == kNone) return std::nullopt;
  return token_strings_[static_cast<size_t>(id)];
}

bool BpeTokenizer::is_special(int32_t id) const {
  return id >= 0 && id < vocab_size() && kind_[static_cast<size_t>(id)] == kSpecial;
}

void BpeTokenizer::append_token_bytes(int32_t id, bool skip_special_tokens, bool /*at_start*/,
                                      std::string& out) const {
  if (id < 0 || id >= vocab_size()) return;
  const uint8_t kind = kind_[static_cast<size_t>(id)];
  if (kind == kNone || (kind == kSpecial && skip_special_tokens)) return;
  out += token_bytes_[static_cast<size_t>(id)];
}

std::vector<int32_t> BpeTokenizer::encode(std::string_view text, bool add_special_tokens,
                                          std::span<const TextRange> literal) const {
  std::vector<int32_t> ids;
  ids.reserve(text.size() / 3 + prefix_ids_.size() + suffix_ids_.size() + 1);
  if (add_special_tokens) ids = prefix_ids_;
  if (added_.empty()) {
    encode_piece(text, ids);
  } else {
    std::vector<TextSegment> segments;
    added_.split(text, segments, literal);
    for (const TextSegment& seg : segments) {
      if (seg.token_id >= 0) {
        ids.push_back(seg.token_id);
      } else {
        encode_piece(seg.text, ids);
      }
    }
  }
  if (add_special_tokens) ids.insert(ids.end(), suffix_ids_.begin(), suffix_ids_.end());
  return ids;
}

void BpeTokenizer::encode_piece(std::string_view piece, std::vector<int32_t>& out) const {
  if (piece.empty()) return;
  if (!split_digits_ && split_max_digits_ == 0) {
    encode_split(piece, out);
    return;
  }
  std::vector<std::string_view> splits;
  if (split_digits_)
    split_digits(piece, individual_digits_, splits);
  else
    split_llama3_pretokens(piece, split_max_digits_, splits);
  for (std::string_view s : splits) encode_split(s, out);
}

// One split of the pre-tokenizer chain, through the ByteLevel step (prefix space, GPT-2 regex).
void BpeTokenizer::encode_split(std::string_view piece, std::vector<int32_t>& out) const {
  std::string prefixed;
  if (add_prefix_space_ && piece.front() != ' ') {
    prefixed.reserve(piece.size() + 1);
    prefixed += ' ';
    prefixed += piece;
    piece = prefixed;
  }
  if (!use_regex_) {
    encode_word(piece, out);
    return;
  }
  std::vector<std::string_view> words;
  split_gpt2_pretokens(piece, words);
  for (std::string_view w : words) encode_word(w, out);
}

void BpeTokenizer::encode_word(std::string_view word, std::vector<int32_t>& out) const {
  if (ignore_merges_) {
    std::string mapped;
    for (const char c : word) mapped += gpt2_byte_chars()[static_cast<uint8_t>(c)];
    if (auto it = vocab_.find(mapped); it != vocab_.end()) {
      out.push_back(it->second);
      return;
    }
  }
  if (word.size() == 1 && byte_ids_[static_cast<uint8_t>(word[0])] >= 0) {
    out.push_back(byte_ids_[static_cast<uint8_t>(word[0])]);
    return;
  }
  {
    std::shared_lock lock(cache_mutex_);
    if (auto it = cache_.find(word); it != cache_.end()) {
      out.insert(out.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  const size_t start = out.size();
  merge_word(word, out);
  if (word.size() <= kMaxCachedWordBytes) {
    std::unique_lock lock(cache_mutex_);
    if (cache_.size() >= kCacheCapacity) cache_.clear();  // simple bound; common words come back fast
    cache_.emplace(std::string(word), std::vector<int32_t>(out.begin() + static_cast<ptrdiff_t>(start), out.end()));
  }
}

const BpeTokenizer::Merge* BpeTokenizer::find_merge(int32_t left, int32_t right) const {
  auto it = merges_.find((uint64_t(uint32_t(left)) << 32) | uint32_t(right));
  return it == merges_.end() ? nullptr : &it->second;
}

void BpeTokenizer::merge_word(std::string_view word, std::vector<int32_t>& out) const {
  // The word's symbols as a doubly linked list over a vector: merging marks the right symbol dead.
  struct Symbol {
    int32_t id;
    int32_t prev, next;
    bool alive;
  };
  std::vector<Symbol> symbols;
  symbols.reserve(word.size());
  bool previous_unknown = false;
  for (const char c : word) {
    int32_t id = byte_ids_[static_cast<uint8_t>(c)];
    if (id < 0) {  // a byte missing from the vocabulary: unk, or dropped when there is none (HF)
      if (!unk_id_ || (fuse_unk_ && previous_unknown)) continue;
      id = *unk_id_;
      previous_unknown = true;
    } else {
      previous_unknown = false;
    }
    const auto i = static_cast<int32_t>(symbols.size());
    symbols.push_back({id, i - 1, i + 1, true});
  }
  if (symbols.empty()) return;
  symbols.back().next = -1;

  // Candidate merges, lowest rank first and leftmost among equal ranks (HF's order). Entries go
  // stale when a neighbour merges first; they are recognised on pop and dropped.
  struct Candidate {
    int32_t rank, pos, new_id;
    bool operator>(const Candidate& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  std::vector<Candidate> heap;
  auto push = [&](int32_t pos) {
    const Symbol& s = symbols[static_cast<size_t>(pos)];
    if (s.next < 0) return;
    if (const Merge* m = find_merge(s.id, symbols[static_cast<size_t>(s.next)].id)) {
      heap.push_back({m->rank, pos, m->new_id});
      std::push_heap(heap.begin(), heap.end(), std::greater<>());
    }
  };
  for (int32_t i = 0; i + 1 < static_cast<int32_t>(symbols.size()); ++i) push(i);

  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), std::greater<>());
    const Candidate top = heap.back();
    heap.pop_back();
    Symbol& left = symbols[static_cast<size_t>(top.pos)];
    if (!left.alive || left.next < 0) continue;
    Symbol& right = symbols[static_cast<size_t>(left.next)];
    const Merge* m = find_merge(left.id, right.id);
    if (m == nullptr || m->new_id != top.new_id) continue;  // stale
    left.id = top.new_id;
    right.alive = false;
    left.next = right.next;
    if (left.next >= 0) symbols[static_cast<size_t>(left.next)].prev = top.pos;
    if (left.prev >= 0) push(left.prev);
    push(top.pos);
  }
  for (int32_t i = 0; i >= 0; i = symbols[static_cast<size_t>(i)].next) {
    out.push_back(symbols[static_cast<size_t>(i)].id);
  }
}

// ---- loading -------------------------------------------------------------------------------

namespace {

std::unordered_map<std::string, int32_t> parse_vocab(const json& j, const std::string& where) {
  if (!j.is_object()) throw Error(where + ": expected an object {token: id}");
  std::unordered_map<std::string, int32_t> vocab;
  vocab.reserve(j.size());
  for (const auto& [token, id] : j.items()) {
    if (!id.is_number_integer()) throw Error(where + ": id of \"" + token + "\" is not an integer");
    vocab.emplace(token, checked_id(id.get<int64_t>(), where + " \"" + token + "\""));
  }
  if (vocab.empty()) throw Error(where + ": the vocabulary is empty");
  return vocab;
}

// vocab.json read with nlohmann's SAX interface straight into the map: building the DOM of a
// 50,000-key object first costs more than the rest of loading together.
class VocabSax final : public json::json_sax_t {
 public:
  explicit VocabSax(std::unordered_map<std::string, int32_t>& vocab) : vocab_(vocab) {}
  std::string error;

  bool start_object(size_t) override { return ++depth_ == 1 || fail("expected an object {token: id}"); }
  bool end_object() override { return --depth_, true; }
  bool key(string_t& k) override { return key_ = k, true; }
  bool number_integer(number_integer_t v) override { return id(v); }
  bool number_unsigned(number_unsigned_t v) override {
    return id(v > static_cast<number_unsigned_t>(kMaxTokenId) ? kMaxTokenId + 1 : static_cast<int64_t>(v));
  }
  bool null() override { return not_id(); }
  bool boolean(bool) override { return not_id(); }
  bool number_float(number_float_t, const string_t&) override { return not_id(); }
  bool string(string_t&) override { return not_id(); }
  bool binary(binary_t&) override { return not_id(); }
  bool start_array(size_t) override { return not_id(); }
  bool end_array() override { return true; }
  bool parse_error(size_t, const std::string&, const nlohmann::detail::exception& e) override {
    return fail(std::string("invalid JSON: ") + e.what());
  }

 private:
  bool fail(std::string message) {
    if (error.empty()) error = std::move(message);
    return false;
  }
  bool not_id() {
    if (depth_ == 0) return fail("expected an object {token: id}");
    return fail("id of \"" + key_ + "\" is not an integer");
  }
  bool id(int64_t v) {
    if (depth_ != 1) return not_id();
    if (v < 0 || v > kMaxTokenId) return fail("\"" + key_ + "\": token id " + std::to_string(v) + " is out of range");
    vocab_.insert_or_assign(key_, static_cast<int32_t>(v));  // a repeated key: the last wins, as in json.load
    return true;
  }
  std::unordered_map<std::string, int32_t>& vocab_;
  std::string key_;
  int depth_ = 0;
};

std::unordered_map<std::string, int32_t> read_vocab_json(const std::filesystem::path& path) {
  const std::string text = read_text_file(path);
  std::unordered_map<std::string, int32_t> vocab;
  vocab.reserve(text.size() / 16);
  VocabSax sax(vocab);
  if (!json::sax_parse(text, &sax)) {
    throw Error(path.string() + ": " + (sax.error.empty() ? "invalid JSON" : sax.error));
  }
  if (vocab.empty()) throw Error(path.string() + ": the vocabulary is empty");
  return vocab;
}

std::vector<std::pair<std::string, std::string>> parse_merges_txt(const std::filesystem::path& path) {
  const std::string text = read_text_file(path);
  std::vector<std::pair<std::string, std::string>> merges;
  size_t line_no = 0;
  for (size_t pos = 0; pos < text.size();) {
    size_t end = text.find('\n', pos);
    if (end == std::string::npos) end = text.size();
    std::string_view line(text.data() + pos, end - pos);
    pos = end + 1;
    ++line_no;
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (line.empty() || line.starts_with("#version")) continue;
    const size_t space = line.find(' ');
    if (space == std::string_view::npos || space == 0 || space + 1 == line.size() ||
        line.find(' ', space + 1) != std::string_view::npos) {
      throw Error(path.string() + " line " + std::to_string(line_no) +
                  ": expected two tokens separated by one space");
    }
    merges.emplace_back(std::string(line.substr(0, space)), std::string(line.substr(space + 1)));
  }
  return merges;
}

// Hands out ids to added tokens as HF's AddedVocabulary::add_tokens does: a token already added
// keeps its id (its flags are replaced), one in the vocabulary takes that id, any other gets the
// next free id after the vocabulary and the added tokens.
class AddedTokenSet {
 public:
  explicit AddedTokenSet(const std::unordered_map<std::string, int32_t>& vocab) : vocab_(vocab) {
    for (const auto& [token, id] : vocab) vocab_end_ = std::max(vocab_end_, id + 1);
  }

  int32_t add(AddedToken t) {
    if (t.content.empty()) return -1;
    if (auto it = index_.find(t.content); it != index_.end()) {
      t.id = tokens_[it->second].id;
      tokens_[it->second] = t;
      return t.id;
    }
    if (auto it = vocab_.find(t.content); it != vocab_.end()) {
      t.id = it->second;
    } else {
      t.id = std::max(vocab_end_, added_end_);
    }
    added_end_ = std::max(added_end_, t.id + 1);
    index_[t.content] = tokens_.size();
    tokens_.push_back(t);
    return t.id;
  }

  bool contains(const std::string& content) const { return index_.contains(content); }
  std::optional<int32_t> id_of(const std::string& content) const {
    auto it = index_.find(content);
    if (it == index_.end()) return std::nullopt;
    return tokens_[it->second].id;
  }
  const std::vector<AddedToken>& tokens() const { return tokens_; }

 private:
  const std::unordered_map<std::string, int32_t>& vocab_;
  int32_t vocab_end_ = 0;
  int32_t added_end_ = 0;
  std::vector<AddedToken> tokens_;
  std::unordered_map<std::string, size_t> index_;
};

AddedToken special_from_spec(const TokenSpec& s) {
  AddedToken t;
  t.content = s.content;
  t.special = true;
  t.lstrip = s.lstrip;
  t.rstrip = s.rstrip;
  t.single_word = s.single_word;
  t.normalized = false;
  return t;
}

// The side files' tokens, in the order transformers adds them: added_tokens_decoder by id, the
// legacy added_tokens.json by id, then the named special tokens not yet present.
void add_config_tokens(const HfTokenizerConfig& cfg, AddedTokenSet& set) {
  for (const auto* list : {&cfg.added_tokens_decoder, &cfg.legacy_added_tokens}) {
    std::vector<AddedToken> sorted = *list;
    std::stable_sort(sorted.begin(), sorted.end(), [](const auto& a, const auto& b) { return a.id < b.id; });
    for (AddedToken& t : sorted) set.add(std::move(t));
  }
  for (const auto& slot : cfg.named) {
    if (slot.token && !set.contains(slot.token->content)) set.add(special_from_spec(*slot.token));
  }
  for (const auto& spec : cfg.additional_special) {
    if (!set.contains(spec.content)) set.add(special_from_spec(spec));
  }
}

std::optional<int32_t> named_id(const HfTokenizerConfig& cfg, const AddedTokenSet& set, const char* key) {
  const auto& slot = cfg.slot(key);
  if (!slot.token) return std::nullopt;
  return set.id_of(slot.token->content);
}

// transformers' update_post_processor: "{bos} $A {eos}" from add_bos_token / add_eos_token.
void bos_eos_template(const HfTokenizerConfig& cfg, BpeSpec& spec) {
  spec.prefix_ids.clear();
  spec.suffix_ids.clear();
  if (cfg.add_bos_token.value_or(false) && spec.bos_id) spec.prefix_ids.push_back(*spec.bos_id);
  if (cfg.add_eos_token.value_or(false) && spec.eos_id) spec.suffix_ids.push_back(*spec.eos_id);
}

const json* find_field(const json& obj, const char* key) {
  auto it = obj.find(key);
  return it == obj.end() || it->is_null() ? nullptr : &*it;
}

std::string type_of(const json& obj, const std::string& where) {
  const json* t = obj.is_object() ? find_field(obj, "type") : nullptr;
  if (t == nullptr || !t->is_string()) throw Error(where + ": no \"type\"");
  return t->get<std::string>();
}

bool json_bool(const json& obj, const char* key, bool fallback, const std::string& where) {
  const json* v = find_field(obj, key);
  if (v == nullptr) return fallback;
  if (!v->is_boolean()) throw Error(where + ": \"" + key + "\" must be true or false");
  return v->get<bool>();
}

// The components of a tokenizer.json that FineServe accepts: a list of the pieces of a
// "Sequence", or the component itself.
std::vector<const json*> flatten(const json& component, const char* list_key) {
  if (component.is_object() && component.value("type", "") == "Sequence") {
    const json* list = find_field(component, list_key);
    std::vector<const json*> out;
    if (list != nullptr && list->is_array()) {
      for (const auto& c : *list) out.push_back(&c);
    }
    return out;
  }
  return {&component};
}

// The "Split" regexes FineServe has a matcher for (pretokenize.h), by their \p{N} bound.
int split_regex_max_digits(const json& split, const std::string& at) {
  static const std::string kLlama3 =
      R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
  static const std::string kQwen2 =
      R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
  const json* pattern = find_field(split, "pattern");
  const json* regex = pattern != nullptr && pattern->is_object() ? find_field(*pattern, "Regex") : nullptr;
  if (regex == nullptr || !regex->is_string()) throw Error(at + ": Split without a \"pattern\": {\"Regex\": ...}");
  const json* behavior = find_field(split, "behavior");
  if (behavior == nullptr || *behavior != "Isolated" || json_bool(split, "invert", false, at))
    throw Error(at + ": only Split with behavior \"Isolated\" and invert false is supported");
  const std::string& re = regex->get_ref<const std::string&>();
  if (re == kLlama3) return 3;
  if (re == kQwen2) return 1;
  throw Error(at + ": Split regex " + json(re).dump() + " is not supported (FineServe knows Llama 3's and Qwen2's)");
}

// Accepted: ByteLevel, optionally preceded by Digits (SmolLM2's Sequence[Digits, ByteLevel]) or by
// a Split with Llama 3's or Qwen2's regex (then ByteLevel does not split again: use_regex false).
void read_pre_tokenizer(const json& root, const std::string& where, BpeSpec& spec) {
  const json* pre = find_field(root, "pre_tokenizer");
  const std::string at = where + " pre_tokenizer";
  if (pre == nullptr) throw Error(at + ": none given; FineServe needs a ByteLevel pre-tokenizer");
  auto parts = flatten(*pre, "pretokenizers");
  if (parts.size() == 2 && type_of(*parts[0], at) == "Digits") {
    spec.split_digits = true;
    spec.individual_digits = json_bool(*parts[0], "individual_digits", false, at);
    parts.erase(parts.begin());
  } else if (parts.size() == 2 && type_of(*parts[0], at) == "Split") {
    spec.split_max_digits = split_regex_max_digits(*parts[0], at);
    parts.erase(parts.begin());
  }
  if (parts.size() != 1 || type_of(*parts[0], at) != "ByteLevel") {
    std::string found;
    for (const json* p : parts) found += (found.empty() ? "" : ", ") + type_of(*p, at);
    throw Error(at + ": only ByteLevel, optionally after Digits or a Split, is supported (found [" + found + "])");
  }
  spec.add_prefix_space = json_bool(*parts[0], "add_prefix_space", true, at);
  spec.use_regex = json_bool(*parts[0], "use_regex", true, at);
}

void read_decoder(const json& root, const std::string& where) {
  const json* dec = find_field(root, "decoder");
  const std::string at = where + " decoder";
  if (dec == nullptr) throw Error(at + ": none given; FineServe needs a ByteLevel decoder");
  for (const json* part : flatten(*dec, "decoders")) {
    const std::string type = type_of(*part, at);
    if (type != "ByteLevel") throw Error(at + ": decoder \"" + type + "\" is not supported (only ByteLevel)");
  }
}

// The post-processor's "single" template as ids before and after the text.
void read_post_processor(const json& proc, const std::string& at, BpeSpec& spec) {
  const std::string type = type_of(proc, at);
  if (type == "ByteLevel") return;  // offsets only
  if (type == "Sequence") {
    const json* list = find_field(proc, "processors");
    if (list == nullptr || !list->is_array()) throw Error(at + ": Sequence without \"processors\"");
    for (const auto& p : *list) read_post_processor(p, at, spec);
    return;
  }
  if (type == "RobertaProcessing" || type == "BertProcessing") {
    // {"cls": ["<s>", 0], "sep": ["</s>", 2]}: cls $A sep
    auto id_at = [&](const char* key) {
      const json* v = find_field(proc, key);
      if (v == nullptr || !v->is_array() || v->size() != 2 || !(*v)[1].is_number_integer()) {
        throw Error(at + ": \"" + key + "\" must be [token, id]");
      }
      return checked_id((*v)[1].get<int64_t>(), at);
    };
    spec.prefix_ids.insert(spec.prefix_ids.begin(), id_at("cls"));
    spec.suffix_ids.push_back(id_at("sep"));
    return;
  }
  if (type != "TemplateProcessing") throw Error(at + ": post-processor \"" + type + "\" is not supported");
  const json* single = find_field(proc, "single");
  const json* specials = find_field(proc, "special_tokens");
  if (single == nullptr || !single->is_array()) throw Error(at + ": TemplateProcessing without \"single\"");
  std::vector<int32_t> before, after;
  bool seen_sequence = false;
  for (const auto& piece : *single) {
    if (const json* seq = piece.is_object() ? find_field(piece, "Sequence") : nullptr) {
      if (seq->value("id", "") != "A" || seen_sequence) throw Error(at + ": \"single\" must hold sequence A once");
      seen_sequence = true;
      continue;
    }
    const json* sp = piece.is_object() ? find_field(piece, "SpecialToken") : nullptr;
    const json* name = sp != nullptr ? find_field(*sp, "id") : nullptr;
    if (name == nullptr || !name->is_string()) throw Error(at + ": unknown piece in \"single\"");
    const std::string n = name->get<std::string>();
    const json* entry = specials != nullptr ? find_field(*specials, n.c_str()) : nullptr;
    const json* ids = entry != nullptr ? find_field(*entry, "ids") : nullptr;
    if (ids == nullptr || !ids->is_array()) throw Error(at + ": special token \"" + n + "\" has no ids");
    for (const auto& id : *ids) {
      if (!id.is_number_integer()) throw Error(at + ": special token \"" + n + "\" has a non-integer id");
      (seen_sequence ? after : before).push_back(checked_id(id.get<int64_t>(), at));
    }
  }
  if (!seen_sequence) throw Error(at + ": \"single\" does not contain sequence A");
  spec.prefix_ids.insert(spec.prefix_ids.begin(), before.begin(), before.end());
  spec.suffix_ids.insert(spec.suffix_ids.end(), after.begin(), after.end());
}

}  // namespace

std::unique_ptr<BpeTokenizer> load_bpe_tokenizer_json(const std::filesystem::path& dir) {
  const auto path = dir / "tokenizer.json";
  const std::string where = path.string();
  const json root = read_json_file(path);
  if (!root.is_object()) throw Error(where + ": expected a JSON object");
  const json* model = find_field(root, "model");
  if (model == nullptr || !model->is_object()) throw Error(where + ": no \"model\" object");

  // Old files may leave out the model type; a model with merges is BPE.
  std::string type = model->contains("merges") ? "BPE" : "?";
  if (const json* t = find_field(*model, "type")) type = t->is_string() ? t->get<std::string>() : "?";
  if (type != "BPE") {
    throw Error(where + ": tokenizer model type \"" + type +
                "\" is not supported (FineServe reads byte-level BPE tokenizers)");
  }
  const std::string at = where + " model";
  if (json_bool(*model, "byte_fallback", false, at)) {
    throw Error(at + ": BPE with byte_fallback (SentencePiece style) is not supported");
  }
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    const json* v = find_field(*model, key);
    if (v != nullptr && (!v->is_string() || !v->get<std::string>().empty())) {
      throw Error(at + ": \"" + key + "\" is not supported");
    }
  }
  if (const json* norm = find_field(root, "normalizer")) {
    throw Error(where + " normalizer: \"" + type_of(*norm, where + " normalizer") + "\" is not supported");
  }

  BpeSpec spec;
  spec.source = where;
  const json* vocab = find_field(*model, "vocab");
  if (vocab == nullptr) throw Error(at + ": no \"vocab\"");
  spec.vocab = parse_vocab(*vocab, at + ".vocab");
  const json* merges = find_field(*model, "merges");
  if (merges == nullptr || !merges->is_array()) throw Error(at + ": \"merges\" must be a list");
  spec.merges_source = at + ".merges";
  for (size_t i = 0; i < merges->size(); ++i) {
    const json& m = (*merges)[i];
    const std::string bad = at + ".merges[" + std::to_string(i) + "]: expected \"a b\" or [\"a\", \"b\"]";
    if (m.is_array()) {  // the format tokenizers >= 0.20 writes
      if (m.size() != 2 || !m[0].is_string() || !m[1].is_string()) throw Error(bad);
      spec.merges.emplace_back(m[0].get<std::string>(), m[1].get<std::string>());
    } else if (m.is_string()) {
      const std::string s = m.get<std::string>();
      const size_t space = s.find(' ');
      if (space == std::string::npos || s.find(' ', space + 1) != std::string::npos) throw Error(bad);
      spec.merges.emplace_back(s.substr(0, space), s.substr(space + 1));
    } else {
      throw Error(bad);
    }
  }
  if (const json* unk = find_field(*model, "unk_token")) {
    if (!unk->is_string()) throw Error(at + ": \"unk_token\" must be a string");
    spec.unk_token = unk->get<std::string>();
  }
  spec.fuse_unk = json_bool(*model, "fuse_unk", false, at);
  spec.ignore_merges = json_bool(*model, "ignore_merges", false, at);
  read_pre_tokenizer(root, where, spec);
  read_decoder(root, where);

  // Added tokens: tokenizers re-adds them in file order (ids follow from the vocabulary).
  AddedTokenSet added(spec.vocab);
  if (const json* list = find_field(root, "added_tokens")) {
    if (!list->is_array()) throw Error(where + ": \"added_tokens\" must be a list");
    for (size_t i = 0; i < list->size(); ++i) {
      const json& t = (*list)[i];
      const std::string at_t = where + " added_tokens[" + std::to_string(i) + "]";
      const json* content = t.is_object() ? find_field(t, "content") : nullptr;
      if (content == nullptr || !content->is_string()) throw Error(at_t + ": no string \"content\"");
      AddedToken tok;
      tok.content = content->get<std::string>();
      tok.special = json_bool(t, "special", false, at_t);
      tok.single_word = json_bool(t, "single_word", false, at_t);
      tok.lstrip = json_bool(t, "lstrip", false, at_t);
      tok.rstrip = json_bool(t, "rstrip", false, at_t);
      tok.normalized = json_bool(t, "normalized", !tok.special, at_t);
      added.add(std::move(tok));
    }
  }
  const HfTokenizerConfig cfg = read_hf_tokenizer_config(dir);
  add_config_tokens(cfg, added);
  spec.added_tokens = added.tokens();

  if (const json* proc = find_field(root, "post_processor")) {
    read_post_processor(*proc, where + " post_processor", spec);
  }
  spec.bos_id = named_id(cfg, added, "bos_token");
  spec.eos_id = named_id(cfg, added, "eos_token");
  if (!spec.bos_id && !spec.prefix_ids.empty()) spec.bos_id = spec.prefix_ids.front();
  // transformers rebuilds the template when tokenizer_config.json says add_bos/eos_token.
  if (cfg.add_bos_token || cfg.add_eos_token) {
    spec.bos_id = named_id(cfg, added, "bos_token");
    bos_eos_template(cfg, spec);
  }
  return std::make_unique<BpeTokenizer>(std::move(spec));
}

std::unique_ptr<BpeTokenizer> load_bpe_vocab_merges(const std::filesystem::path& dir) {
  HfTokenizerConfig cfg = read_hf_tokenizer_config(dir);  // small: report its errors first
  BpeSpec spec;
  spec.source = (dir / "vocab.json").string();
  spec.vocab = read_vocab_json(dir / "vocab.json");
  const auto merges_path = dir / "merges.txt";
  spec.merges = parse_merges_txt(merges_path);
  spec.merges_source = merges_path.string();

  // transformers' GPT2Tokenizer defaults, for names no file gives.
  static const std::string kEndOfText = "<|endoftext|>";
  for (const char* key : {"bos_token", "eos_token", "unk_token"}) {
    auto& slot = cfg.slot(key);
    if (!slot.given && spec.vocab.contains(kEndOfText)) slot.token = TokenSpec{kEndOfText};
  }
  spec.add_prefix_space = cfg.add_prefix_space.value_or(false);

  AddedTokenSet added(spec.vocab);
  add_config_tokens(cfg, added);
  spec.added_tokens = added.tokens();
  spec.bos_id = named_id(cfg, added, "bos_token");
  spec.eos_id = named_id(cfg, added, "eos_token");
  bos_eos_template(cfg, spec);
  return std::make_unique<BpeTokenizer>(std::move(spec));
}

}  // namespace fineserve
