// The grammar language: a small tree of byte-level operators that every constraint (regular
// expressions, JSON Schema, tool-call formats) is written in before it becomes an automaton.
//
//   NodePtr n = seq({literal("{\"a\":"), parse_regex("[0-9]+"), literal("}")});
//   Dfa dfa = compile_dfa(*n, limits);                   // engine/grammar/automaton.h
//
// Everything works on bytes: a character class over Unicode code points becomes an alternation
// of UTF-8 byte sequences (utf8_class), so an automaton never needs to know where characters
// begin and a token that ends in the middle of a multi-byte character is handled like any other.
#pragma once

#include <bitset>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace fineserve::grammar {

struct Node;
using NodePtr = std::shared_ptr<const Node>;
using ByteSet = std::bitset<256>;

struct Node {
  enum class Kind {
    Empty,    // the empty string
    Nothing,  // no string at all (e.g. a schema `false`, a recursion cut off)
    Bytes,    // one byte from `bytes`
    Concat,   // children in order
    Alt,      // any one child
    Repeat,   // children[0] between min and max times (max < 0: unbounded)
    Members,  // JSON object members, see members()
  };
  Kind kind = Kind::Empty;
  ByteSet bytes;
  std::vector<NodePtr> children;
  int min = 0, max = -1;       // Repeat
  std::vector<bool> required;  // Members: one flag per child
  NodePtr separator;           // Members: between two members
  NodePtr extra;               // Members: may repeat after the listed ones (null: none)
};

NodePtr empty();
NodePtr nothing();
NodePtr byte_set(const ByteSet& bytes);
NodePtr literal(std::string_view bytes);
NodePtr seq(std::vector<NodePtr> parts);
NodePtr alt(std::vector<NodePtr> options);
NodePtr repeat(NodePtr node, int min, int max);  // max < 0: unbounded
NodePtr optional(NodePtr node);
// The members of a JSON object in the listed order: member i appears exactly once when
// required[i], at most once otherwise, `separator` goes between two members that appear, and
// after them `extra` (when set) may appear any number of times, also separated. Written as one
// operator because the plain-regex form of "optional members in order" grows quadratically.
NodePtr members(std::vector<NodePtr> members, std::vector<bool> required, NodePtr separator,
                NodePtr extra);

// A set of Unicode scalar values as inclusive ranges; surrogates (U+D800..U+DFFF) are dropped
// because they have no UTF-8 form.
using CodepointRanges = std::vector<std::pair<uint32_t, uint32_t>>;
// One character from `ranges`, as an alternation of UTF-8 byte sequences.
NodePtr utf8_class(const CodepointRanges& ranges);
// The ranges not in `ranges`, over all of Unicode.
CodepointRanges complement(const CodepointRanges& ranges);

// The same language with every byte in `banned` removed from every byte set. For JSON string
// patterns: banning '"', '\\' and control bytes keeps exactly the matches that need no escaping
// (UTF-8 continuation and lead bytes are >= 0x80, so multi-byte characters are untouched).
NodePtr without_bytes(const NodePtr& node, const ByteSet& banned);

struct RegexLimits {
  int max_depth = 64;       // nesting of groups
  int max_repeat = 1000;    // n and m in {n,m}
  size_t max_length = 16384;  // pattern bytes
};

// Parses a regular expression (ECMAScript / Python syntax subset) for a full match of the
// output. Supported: literals (UTF-8), '.', [classes] with ranges and negation, \d \w \s and
// their negations, \n \r \t \f \v \0 \xHH \uHHHH escapes, groups (...) (?:...) (?<name>...)
// (?P<name>...), alternation, * + ? {n} {n,} {n,m} (lazy '?' suffix accepted; matching is the
// same), and ^ / $ at the very start / end. Throws fineserve::Error naming the construct for
// anything else (backreferences, lookaround, \b, flags).
NodePtr parse_regex(std::string_view pattern, const RegexLimits& limits = {});

}  // namespace fineserve::grammar
