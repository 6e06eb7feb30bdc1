#include "models/tokenizer/added_tokens.h"

#include <algorithm>

#include "kernels/base.h"
#include "models/tokenizer/unicode.h"
#include "models/tokenizer/utf8.h"

namespace fineserve {
namespace {

// The code point that ends text[0, end), or utf8::kInvalid when that is not well-formed UTF-8.
std::pair<uint32_t, size_t> last_char(std::string_view text, size_t end) {
  size_t start = end - 1;
  // Step back over at most three continuation bytes (10xxxxxx) to the lead byte.
  while (start > 0 && end - start < 4 && (static_cast<uint8_t>(text[start]) & 0xC0) == 0x80) --start;
  const utf8::Decoded d = utf8::decode(text, start);
  if (d.code_point == utf8::kInvalid || start + d.length != end) return {utf8::kInvalid, end - 1};
  return {d.code_point, start};
}

// HF: `\w$` on the text before a match.
bool ends_with_word(std::string_view text, size_t end) {
  return end > 0 && unicode::is_word_char(last_char(text, end).first);
}

// HF: `^\w` on the text after a match.
bool starts_with_word(std::string_view text, size_t pos) {
  return pos < text.size() && unicode::is_word_char(utf8::decode(text, pos).code_point);
}

// HF lstrip: where the whitespace that ends text[0, end) begins.
size_t start_of_trailing_space(std::string_view text, size_t end) {
  while (end > 0) {
    const auto [cp, start] = last_char(text, end);
    if (!unicode::is_space(cp)) break;
    end = start;
  }
  return end;
}

// HF rstrip: where the whitespace that starts text[pos, ...) ends.
size_t end_of_leading_space(std::string_view text, size_t pos) {
  while (pos < text.size()) {
    const utf8::Decoded d = utf8::decode(text, pos);
    if (!unicode::is_space(d.code_point)) break;
    pos += d.length;
  }
  return pos;
}

}  // namespace

void AddedVocabulary::Trie::insert(std::string_view s, int32_t token) {
  if (nodes.empty()) nodes.emplace_back();
  first_byte[static_cast<uint8_t>(s[0])] = true;
  int32_t node = 0;
  for (const char ch : s) {
    const auto b = static_cast<uint8_t>(ch);
    auto& kids = nodes[node].children;
    auto it = std::lower_bound(kids.begin(), kids.end(), std::pair<uint8_t, int32_t>(b, -1));
    if (it != kids.end() && it->first == b) {
      node = it->second;
    } else {
      const auto child = static_cast<int32_t>(nodes.size());
      kids.insert(it, {b, child});
      nodes.emplace_back();  // invalidates `kids`; not used again below
      node = child;
    }
  }
  nodes[node].token = token;
}

std::pair<int32_t, size_t> AddedVocabulary::Trie::longest_at(std::string_view text, size_t pos) const {
  std::pair<int32_t, size_t> best{-1, 0};
  int32_t node = 0;
  for (size_t i = pos; i < text.size(); ++i) {
    const auto b = static_cast<uint8_t>(text[i]);
    const auto& kids = nodes[node].children;
    auto it = std::lower_bound(kids.begin(), kids.end(), std::pair<uint8_t, int32_t>(b, -1));
    if (it == kids.end() || it->first != b) break;
    node = it->second;
    if (nodes[node].token >= 0) best = {nodes[node].token, i + 1 - pos};
  }
  return best;
}

AddedVocabulary::AddedVocabulary(std::vector<AddedToken> tokens) {
  for (auto& t : tokens) {
    if (t.content.empty()) continue;
    FS_ASSERT(t.id >= 0, "added token without an id");
    FS_ASSERT(!by_content_.contains(t.content), "duplicate added token content");
    const size_t index = tokens_.size();
    by_id_[t.id] = index;
    by_content_[t.content] = index;
    (t.normalized ? normalized_ : raw_).insert(t.content, static_cast<int32_t>(index));
    tokens_.push_back(std::move(t));
  }
}

const AddedToken* AddedVocabulary::find(int32_t id) const {
  auto it = by_id_.find(id);
  return it == by_id_.end() ? nullptr : &tokens_[it->second];
}

std::optional<int32_t> AddedVocabulary::id_of(std::string_view content) const {
  auto it = by_content_.find(std::string(content));
  if (it == by_content_.end()) return std::nullopt;
  return tokens_[it->second].id;
}

void AddedVocabulary::split_pass(const Trie& trie, std::string_view text, std::vector<TextSegment>& out,
                                 const char* base, std::span<const TextRange> literal) const {
  // Whether [begin, end) of `text` overlaps a literal range (they are few: a scan suffices).
  const auto in_literal = [&](size_t begin, size_t end) {
    const auto offset = static_cast<size_t>(text.data() - base);
    for (const TextRange& r : literal)
      if (r.begin < offset + end && offset + begin < r.end) return true;
    return false;
  };
  size_t done = 0;  // text[0, done) has been emitted
  if (!trie.nodes.empty()) {
    for (size_t pos = 0; pos < text.size(); ++pos) {
      if (!trie.first_byte[static_cast<uint8_t>(text[pos])]) continue;
      const auto [index, length] = trie.longest_at(text, pos);
      if (index < 0) continue;
      const AddedToken& token = tokens_[static_cast<size_t>(index)];
      size_t start = pos;
      size_t stop = pos + length;
      if (token.special && !literal.empty() && in_literal(start, stop)) continue;
      if (token.single_word && (ends_with_word(text, start) || starts_with_word(text, stop))) {
        pos = stop - 1;  // HF's match iterator resumes after a discarded match
        continue;
      }
      if (token.lstrip) start = std::max(start_of_trailing_space(text, start), done);
      if (token.rstrip) stop = end_of_leading_space(text, stop);
      if (done < start) out.push_back({text.substr(done, start - done), -1});
      out.push_back({text.substr(start, stop - start), token.id});
      done = stop;
      pos = stop - 1;
    }
  }
  if (done < text.size()) out.push_back({text.substr(done), -1});
}

void AddedVocabulary::split(std::string_view text, std::vector<TextSegment>& out,
                            std::span<const TextRange> literal) const {
  out.clear();
  if (text.empty()) return;
  if (normalized_.nodes.empty()) {
    split_pass(raw_, text, out, text.data(), literal);
    return;
  }
  std::vector<TextSegment> first;
  split_pass(raw_, text, first, text.data(), literal);
  for (const TextSegment& seg : first) {
    if (seg.token_id >= 0) {
      out.push_back(seg);
    } else {
      split_pass(normalized_, seg.text, out, text.data(), literal);
    }
  }
}

}  // namespace fineserve
