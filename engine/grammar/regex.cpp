#include "engine/grammar/regex.h"

#include <algorithm>
#include <cctype>
#include <string>

#include "kernels/base.h"

namespace fineserve::grammar {

NodePtr empty() { return std::make_shared<Node>(); }

NodePtr nothing() {
  auto n = std::make_shared<Node>();
  n->kind = Node::Kind::Nothing;
  return n;
}

NodePtr byte_set(const ByteSet& bytes) {
  if (bytes.none()) return nothing();
  auto n = std::make_shared<Node>();
  n->kind = Node::Kind::Bytes;
  n->bytes = bytes;
  return n;
}

NodePtr literal(std::string_view bytes) {
  std::vector<NodePtr> parts;
  for (unsigned char c : bytes) {
    ByteSet b;
    b.set(c);
    parts.push_back(byte_set(b));
  }
  return seq(std::move(parts));
}

NodePtr seq(std::vector<NodePtr> parts) {
  std::vector<NodePtr> kept;
  for (auto& p : parts) {
    if (p->kind == Node::Kind::Nothing) return nothing();
    if (p->kind == Node::Kind::Empty) continue;
    kept.push_back(std::move(p));
  }
  if (kept.empty()) return empty();
  if (kept.size() == 1) return kept[0];
  auto n = std::make_shared<Node>();
  n->kind = Node::Kind::Concat;
  n->children = std::move(kept);
  return n;
}

NodePtr alt(std::vector<NodePtr> options) {
  std::vector<NodePtr> kept;
  for (auto& o : options)
    if (o->kind != Node::Kind::Nothing) kept.push_back(std::move(o));
  if (kept.empty()) return nothing();
  if (kept.size() == 1) return kept[0];
  auto n = std::make_shared<Node>();
  n->kind = Node::Kind::Alt;
  n->children = std::move(kept);
  return n;
}

NodePtr repeat(NodePtr node, int min, int max) {
  FS_ASSERT(min >= 0 && (max < 0 || max >= min));
  if (max == 0 || node->kind == Node::Kind::Empty) return empty();
  if (node->kind == Node::Kind::Nothing) return min == 0 ? empty() : nothing();
  if (min == 1 && max == 1) return node;
  auto n = std::make_shared<Node>();
  n->kind = Node::Kind::Repeat;
  n->children = {std::move(node)};
  n->min = min;
  n->max = max;
  return n;
}

NodePtr optional(NodePtr node) { return repeat(std::move(node), 0, 1); }

NodePtr members(std::vector<NodePtr> members, std::vector<bool> required, NodePtr separator,
                NodePtr extra) {
  FS_ASSERT(members.size() == required.size());
  auto n = std::make_shared<Node>();
  n->kind = Node::Kind::Members;
  n->children = std::move(members);
  n->required = std::move(required);
  n->separator = std::move(separator);
  if (extra && extra->kind != Node::Kind::Nothing) n->extra = std::move(extra);
  return n;
}

// ---- UTF-8 classes ----------------------------------------------------------------------------

namespace {

CodepointRanges normalize(CodepointRanges r) {
  std::sort(r.begin(), r.end());
  CodepointRanges out;
  for (auto [lo, hi] : r) {
    if (lo > hi) continue;
    hi = std::min<uint32_t>(hi, 0x10FFFF);
    if (lo > hi) continue;
    if (!out.empty() && lo <= out.back().second + 1) {
      out.back().second = std::max(out.back().second, hi);
    } else {
      out.emplace_back(lo, hi);
    }
  }
  // Drop the surrogates.
  CodepointRanges res;
  for (auto [lo, hi] : out) {
    if (hi < 0xD800 || lo > 0xDFFF) {
      res.emplace_back(lo, hi);
      continue;
    }
    if (lo < 0xD800) res.emplace_back(lo, 0xD7FF);
    if (hi > 0xDFFF) res.emplace_back(0xE000, hi);
  }
  return res;
}

int utf8_len(uint32_t cp) { return cp < 0x80 ? 1 : cp < 0x800 ? 2 : cp < 0x10000 ? 3 : 4; }

std::string utf8_encode(uint32_t cp) {
  std::string s;
  if (cp < 0x80) {
    s += static_cast<char>(cp);
  } else if (cp < 0x800) {
    s += static_cast<char>(0xC0 | (cp >> 6));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    s += static_cast<char>(0xE0 | (cp >> 12));
    s += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    s += static_cast<char>(0xF0 | (cp >> 18));
    s += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    s += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  }
  return s;
}

// Splits [lo, hi] until every piece encodes to byte strings of one length whose bytes vary
// independently per position (all sequences between enc(lo) and enc(hi) byte-wise), then emits
// one Concat of byte ranges per piece. The usual construction (as in RE2 / Rust regex-syntax).
void split_range(uint32_t lo, uint32_t hi, std::vector<NodePtr>& out) {
  static const uint32_t kMaxOfLen[] = {0x7F, 0x7FF, 0xFFFF, 0x10FFFF};
  for (int l = 0; l < 3; ++l) {
    if (lo <= kMaxOfLen[l] && hi > kMaxOfLen[l]) {
      split_range(lo, kMaxOfLen[l], out);
      split_range(kMaxOfLen[l] + 1, hi, out);
      return;
    }
  }
  const int len = utf8_len(lo);
  for (int i = 1; i < len; ++i) {
    const uint32_t m = (1u << (6 * i)) - 1;
    if ((lo & ~m) != (hi & ~m)) {
      if ((lo & m) != 0) {
        split_range(lo, lo | m, out);
        split_range((lo | m) + 1, hi, out);
        return;
      }
      if ((hi & m) != m) {
        split_range(lo, (hi & ~m) - 1, out);
        split_range(hi & ~m, hi, out);
        return;
      }
    }
  }
  const std::string a = utf8_encode(lo), b = utf8_encode(hi);
  std::vector<NodePtr> parts;
  for (size_t i = 0; i < a.size(); ++i) {
    ByteSet set;
    for (int c = static_cast<unsigned char>(a[i]); c <= static_cast<unsigned char>(b[i]); ++c) set.set(c);
    parts.push_back(byte_set(set));
  }
  out.push_back(seq(std::move(parts)));
}

}  // namespace

CodepointRanges complement(const CodepointRanges& ranges) {
  CodepointRanges in = normalize(ranges), out;
  uint32_t next = 0;
  for (auto [lo, hi] : in) {
    if (lo > next) out.emplace_back(next, lo - 1);
    next = hi + 1;
  }
  if (next <= 0x10FFFF) out.emplace_back(next, 0x10FFFF);
  return normalize(out);
}

NodePtr utf8_class(const CodepointRanges& ranges) {
  std::vector<NodePtr> options;
  ByteSet ascii;  // single-byte characters share one byte set
  for (auto [lo, hi] : normalize(ranges)) {
    for (; lo <= hi && lo < 0x80; ++lo) ascii.set(lo);
    if (lo <= hi) split_range(lo, hi, options);
  }
  if (ascii.any()) options.insert(options.begin(), byte_set(ascii));
  return alt(std::move(options));
}

NodePtr without_bytes(const NodePtr& node, const ByteSet& banned) {
  switch (node->kind) {
    case Node::Kind::Empty:
    case Node::Kind::Nothing:
      return node;
    case Node::Kind::Bytes:
      return byte_set(node->bytes & ~banned);
    default:
      break;
  }
  auto n = std::make_shared<Node>(*node);
  for (auto& c : n->children) c = without_bytes(c, banned);
  if (n->separator) n->separator = without_bytes(n->separator, banned);
  if (n->extra) n->extra = without_bytes(n->extra, banned);
  return n;
}

// ---- Regex parser -----------------------------------------------------------------------------

namespace {

class RegexParser {
 public:
  RegexParser(std::string_view p, const RegexLimits& limits) : p_(p), limits_(limits) {}

  NodePtr parse() {
    if (p_.size() > limits_.max_length)
      throw Error("regex pattern is longer than " + std::to_string(limits_.max_length) + " bytes");
    if (!p_.empty() && p_[0] == '^') ++pos_;
    NodePtr n = parse_alt(0);
    if (pos_ < p_.size()) fail("unbalanced ')'");
    return n;
  }

 private:
  [[noreturn]] void fail(const std::string& what) const {
    throw Error("regex: " + what + " at offset " + std::to_string(pos_));
  }
  bool at_end() const { return pos_ >= p_.size(); }
  char peek() const { return p_[pos_]; }

  NodePtr parse_alt(int depth) {
    if (depth > limits_.max_depth) fail("groups nested deeper than " + std::to_string(limits_.max_depth));
    std::vector<NodePtr> options{parse_concat(depth)};
    while (!at_end() && peek() == '|') {
      ++pos_;
      options.push_back(parse_concat(depth));
    }
    return options.size() == 1 ? options[0] : alt(std::move(options));
  }

  NodePtr parse_concat(int depth) {
    std::vector<NodePtr> parts;
    while (!at_end() && peek() != '|' && peek() != ')') {
      if (peek() == '$') {
        // An end anchor: only where the pattern (or a top-level alternative) ends.
        ++pos_;
        if (!(at_end() || (depth == 0 && peek() == '|'))) fail("'$' is only supported at the end");
        continue;
      }
      parts.push_back(parse_repeat(depth));
    }
    return seq(std::move(parts));
  }

  int parse_int() {
    if (at_end() || !std::isdigit(static_cast<unsigned char>(peek()))) fail("expected a number in {}");
    long v = 0;
    while (!at_end() && std::isdigit(static_cast<unsigned char>(peek()))) {
      v = v * 10 + (peek() - '0');
      if (v > limits_.max_repeat) fail("repetition count above " + std::to_string(limits_.max_repeat));
      ++pos_;
    }
    return static_cast<int>(v);
  }

  NodePtr parse_repeat(int depth) {
    NodePtr atom = parse_atom(depth);
    while (!at_end()) {
      int min, max;
      const char c = peek();
      if (c == '*') {
        min = 0, max = -1, ++pos_;
      } else if (c == '+') {
        min = 1, max = -1, ++pos_;
      } else if (c == '?') {
        min = 0, max = 1, ++pos_;
      } else if (c == '{') {
        ++pos_;
        min = parse_int();
        max = min;
        if (!at_end() && peek() == ',') {
          ++pos_;
          max = (!at_end() && peek() == '}') ? -1 : parse_int();
        }
        if (at_end() || peek() != '}') fail("expected '}'");
        ++pos_;
        if (max >= 0 && max < min) fail("{n,m} with m < n");
      } else {
        break;
      }
      if (!at_end() && peek() == '?') ++pos_;  // lazy: same language for a full match
      if (!at_end() && peek() == '+') fail("possessive quantifiers are not supported");
      atom = repeat(atom, min, max);
    }
    return atom;
  }

  // Reads one UTF-8 encoded code point of the pattern.
  uint32_t read_codepoint() {
    const auto c0 = static_cast<unsigned char>(p_[pos_]);
    int len = c0 < 0x80 ? 1 : (c0 >> 5) == 6 ? 2 : (c0 >> 4) == 14 ? 3 : (c0 >> 3) == 30 ? 4 : 0;
    if (len == 0 || pos_ + static_cast<size_t>(len) > p_.size()) fail("pattern is not valid UTF-8");
    uint32_t cp = len == 1 ? c0 : c0 & (0x7F >> len);
    for (int i = 1; i < len; ++i) {
      const auto c = static_cast<unsigned char>(p_[pos_ + static_cast<size_t>(i)]);
      if ((c >> 6) != 2) fail("pattern is not valid UTF-8");
      cp = (cp << 6) | (c & 0x3F);
    }
    pos_ += static_cast<size_t>(len);
    return cp;
  }

  uint32_t read_hex(int digits) {
    uint32_t v = 0;
    for (int i = 0; i < digits; ++i) {
      if (at_end() || !std::isxdigit(static_cast<unsigned char>(peek()))) fail("bad hex escape");
      const char c = p_[pos_++];
      v = v * 16 + static_cast<uint32_t>(std::isdigit(static_cast<unsigned char>(c)) ? c - '0' : (std::tolower(c) - 'a' + 10));
    }
    return v;
  }

  static CodepointRanges class_escape(char c) {
    switch (c) {
      case 'd': return {{'0', '9'}};
      case 'D': return complement({{'0', '9'}});
      case 'w': return {{'0', '9'}, {'A', 'Z'}, {'_', '_'}, {'a', 'z'}};
      case 'W': return complement({{'0', '9'}, {'A', 'Z'}, {'_', '_'}, {'a', 'z'}});
      case 's': return {{'\t', '\r'}, {' ', ' '}};
      case 'S': return complement({{'\t', '\r'}, {' ', ' '}});
      default: return {};
    }
  }

  // After a backslash: either a class (\d...) in `cls`, or one code point returned.
  bool parse_escape(CodepointRanges& cls, uint32_t& cp) {
    if (at_end()) fail("pattern ends with '\\'");
    const char c = p_[pos_++];
    switch (c) {
      case 'd': case 'D': case 'w': case 'W': case 's': case 'S':
        cls = class_escape(c);
        return true;
      case 'n': cp = '\n'; return false;
      case 'r': cp = '\r'; return false;
      case 't': cp = '\t'; return false;
      case 'f': cp = '\f'; return false;
      case 'v': cp = '\v'; return false;
      case '0': cp = 0; return false;
      case 'x': cp = read_hex(2); return false;
      case 'u': cp = read_hex(4); return false;
      case 'b': case 'B': fail("word boundaries (\\b, \\B) are not supported");
      case 'A': case 'Z': case 'z': fail("anchors other than ^ and $ are not supported");
      default:
        if (std::isdigit(static_cast<unsigned char>(c))) fail("backreferences are not supported");
        if (std::isalpha(static_cast<unsigned char>(c))) fail(std::string("unknown escape \\") + c);
        --pos_;
        cp = read_codepoint();  // an escaped punctuation character stands for itself
        return false;
    }
  }

  NodePtr parse_class() {
    // At '[' already consumed.
    bool negate = false;
    if (!at_end() && peek() == '^') negate = true, ++pos_;
    CodepointRanges ranges;
    bool first = true;
    while (true) {
      if (at_end()) fail("unterminated '['");
      if (peek() == ']' && !first) break;
      first = false;
      if (peek() == '[' && pos_ + 1 < p_.size() && p_[pos_ + 1] == ':') fail("POSIX classes [:name:] are not supported");
      uint32_t lo;
      if (peek() == '\\') {
        ++pos_;
        CodepointRanges cls;
        if (parse_escape(cls, lo)) {
          ranges.insert(ranges.end(), cls.begin(), cls.end());
          continue;
        }
      } else {
        lo = read_codepoint();
      }
      uint32_t hi = lo;
      if (pos_ + 1 < p_.size() && peek() == '-' && p_[pos_ + 1] != ']') {
        ++pos_;
        if (peek() == '\\') {
          ++pos_;
          CodepointRanges cls;
          if (parse_escape(cls, hi)) fail("a class escape cannot end a range");
        } else {
          hi = read_codepoint();
        }
        if (hi < lo) fail("range out of order in [...]");
      }
      ranges.emplace_back(lo, hi);
    }
    ++pos_;  // ']'
    return utf8_class(negate ? complement(ranges) : ranges);
  }

  NodePtr parse_atom(int depth) {
    const char c = peek();
    switch (c) {
      case '(': {
        ++pos_;
        if (!at_end() && peek() == '?') {
          ++pos_;
          if (!at_end() && peek() == ':') {
            ++pos_;
          } else if (!at_end() && (peek() == '<' || peek() == 'P')) {
            if (peek() == 'P') ++pos_;
            if (at_end() || peek() != '<') fail("bad group name");
            if (pos_ + 1 < p_.size() && (p_[pos_ + 1] == '=' || p_[pos_ + 1] == '!')) fail("lookbehind is not supported");
            const size_t close = p_.find('>', pos_);
            if (close == std::string_view::npos) fail("unterminated group name");
            pos_ = close + 1;
          } else if (!at_end() && (peek() == '=' || peek() == '!')) {
            fail("lookahead is not supported");
          } else {
            fail("inline flags (?...) are not supported");
          }
        }
        NodePtr inner = parse_alt(depth + 1);
        if (at_end() || peek() != ')') fail("missing ')'");
        ++pos_;
        return inner;
      }
      case '[':
        ++pos_;
        return parse_class();
      case '.':
        ++pos_;
        return utf8_class(complement({{'\n', '\n'}}));
      case '\\': {
        ++pos_;
        CodepointRanges cls;
        uint32_t cp;
        if (parse_escape(cls, cp)) return utf8_class(cls);
        return utf8_class({{cp, cp}});
      }
      case '*': case '+': case '?': case '{':
        fail(std::string("nothing to repeat before '") + c + "'");
      case '^':
        fail("'^' is only supported at the start");
      default: {
        const uint32_t cp = read_codepoint();
        return literal(utf8_encode(cp));
      }
    }
  }

  std::string_view p_;
  const RegexLimits& limits_;
  size_t pos_ = 0;
};

}  // namespace

NodePtr parse_regex(std::string_view pattern, const RegexLimits& limits) {
  return RegexParser(pattern, limits).parse();
}

}  // namespace fineserve::grammar
