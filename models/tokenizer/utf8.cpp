#include "models/tokenizer/utf8.h"

namespace fineserve::utf8 {
namespace {

// The well-formed byte sequences (Unicode Table 3-7): the lead byte fixes the length and the
// allowed range of the second byte; later bytes are always 80..BF.
struct LeadInfo {
  uint8_t length;  // 0: not a lead byte
  uint8_t second_lo, second_hi;
};

constexpr LeadInfo lead_info(uint8_t b) {
  if (b < 0x80) return {1, 0, 0};
  if (b >= 0xC2 && b <= 0xDF) return {2, 0x80, 0xBF};
  if (b == 0xE0) return {3, 0xA0, 0xBF};
  if (b == 0xED) return {3, 0x80, 0x9F};  // excludes the surrogates D800..DFFF
  if (b >= 0xE1 && b <= 0xEF) return {3, 0x80, 0xBF};
  if (b == 0xF0) return {4, 0x90, 0xBF};
  if (b >= 0xF1 && b <= 0xF3) return {4, 0x80, 0xBF};
  if (b == 0xF4) return {4, 0x80, 0x8F};  // nothing above U+10FFFF
  return {0, 0, 0};
}

// How many bytes from text[pos] form a valid prefix of a well-formed sequence (at least 1), and
// whether that prefix is a whole character.
struct Prefix {
  uint32_t valid;
  bool complete;
};

Prefix valid_prefix(std::string_view text, size_t pos) {
  const auto b0 = static_cast<uint8_t>(text[pos]);
  const LeadInfo info = lead_info(b0);
  if (info.length == 1) return {1, true};
  if (info.length == 0) return {1, false};
  uint32_t n = 1;
  while (n < info.length && pos + n < text.size()) {
    const auto b = static_cast<uint8_t>(text[pos + n]);
    const uint8_t lo = n == 1 ? info.second_lo : 0x80;
    const uint8_t hi = n == 1 ? info.second_hi : 0xBF;
    if (b < lo || b > hi) break;
    ++n;
  }
  return {n, n == info.length};
}

}  // namespace

Decoded decode(std::string_view text, size_t pos) {
  const Prefix p = valid_prefix(text, pos);
  if (!p.complete) return {kInvalid, 1};
  const auto* s = reinterpret_cast<const uint8_t*>(text.data() + pos);
  switch (p.valid) {
    case 1: return {s[0], 1};
    case 2: return {(uint32_t(s[0] & 0x1F) << 6) | (s[1] & 0x3F), 2};
    case 3: return {(uint32_t(s[0] & 0x0F) << 12) | (uint32_t(s[1] & 0x3F) << 6) | (s[2] & 0x3F), 3};
    default:
      return {(uint32_t(s[0] & 0x07) << 18) | (uint32_t(s[1] & 0x3F) << 12) |
                  (uint32_t(s[2] & 0x3F) << 6) | (s[3] & 0x3F),
              4};
  }
}

void append(uint32_t cp, std::string& out) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

size_t append_replacing_invalid(std::string_view in, bool final, std::string& out) {
  static constexpr std::string_view kReplacement = "\xEF\xBF\xBD";  // U+FFFD
  size_t pos = 0;
  while (pos < in.size()) {
    // Copy a run of ASCII at once: the common case.
    size_t ascii_end = pos;
    while (ascii_end < in.size() && static_cast<uint8_t>(in[ascii_end]) < 0x80) ++ascii_end;
    out.append(in.substr(pos, ascii_end - pos));
    pos = ascii_end;
    if (pos == in.size()) break;

    const Prefix p = valid_prefix(in, pos);
    if (p.complete) {
      out.append(in.substr(pos, p.valid));
    } else if (!final && pos + p.valid == in.size() && lead_info(static_cast<uint8_t>(in[pos])).length > 1) {
      break;  // a character cut short by the end of the input: wait for its remaining bytes
    } else {
      out.append(kReplacement);
    }
    pos += p.valid;
  }
  return pos;
}

bool is_valid(std::string_view text) {
  for (size_t pos = 0; pos < text.size();) {
    const Prefix p = valid_prefix(text, pos);
    if (!p.complete) return false;
    pos += p.valid;
  }
  return true;
}

}  // namespace fineserve::utf8
