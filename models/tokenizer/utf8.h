// UTF-8 decoding for the tokenizers: strict validation, and U+FFFD replacement that matches
// Python's bytes.decode("utf-8", errors="replace") and Rust's String::from_utf8_lossy (both replace
// each "maximal subpart" of an ill-formed sequence with one U+FFFD, Unicode 16 §3.9).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace fineserve::utf8 {

inline constexpr uint32_t kInvalid = 0xFFFFFFFFu;  // stands for one byte that starts no valid character

struct Decoded {
  uint32_t code_point;  // kInvalid for an ill-formed byte
  uint32_t length;      // bytes consumed: 1..4 (1 for an ill-formed byte)
};

// Decodes the well-formed character at text[pos] (pos < text.size()); an ill-formed or truncated
// sequence yields {kInvalid, 1}, so that the caller moves on one byte at a time.
Decoded decode(std::string_view text, size_t pos);

// Appends the UTF-8 encoding of a valid code point.
void append(uint32_t code_point, std::string& out);

// Appends `in` to `out` with every ill-formed maximal subpart replaced by U+FFFD. When `final` is
// false, a truncated but so far valid sequence at the very end is left alone (it may be completed
// by later bytes); the return value is the number of bytes of `in` consumed.
size_t append_replacing_invalid(std::string_view in, bool final, std::string& out);

inline std::string replace_invalid(std::string_view in) {
  std::string out;
  out.reserve(in.size());
  append_replacing_invalid(in, /*final=*/true, out);
  return out;
}

bool is_valid(std::string_view text);

}  // namespace fineserve::utf8
