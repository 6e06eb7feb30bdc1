#include "models/tokenizer/pretokenize.h"

#include <cstdint>

#include "models/tokenizer/unicode.h"
#include "models/tokenizer/utf8.h"

namespace fineserve {
namespace {

using unicode::CharClass;

struct Char {
  CharClass cls;
  uint32_t length;  // bytes
};

Char char_at(std::string_view text, size_t pos) {
  const auto b = static_cast<uint8_t>(text[pos]);
  if (b < 0x80) return {unicode::char_class(b), 1};
  const utf8::Decoded d = utf8::decode(text, pos);
  return {unicode::char_class(d.code_point), d.length};
}

// Length of the contraction 's 't 're 've 'm 'll 'd at text[pos] (lowercase only), or 0.
size_t contraction_length(std::string_view text, size_t pos) {
  if (text[pos] != '\'' || pos + 1 >= text.size()) return 0;
  const char c1 = text[pos + 1];
  if (c1 == 's' || c1 == 't' || c1 == 'm' || c1 == 'd') return 2;
  if (pos + 2 >= text.size()) return 0;
  const char c2 = text[pos + 2];
  if ((c1 == 'r' && c2 == 'e') || (c1 == 'v' && c2 == 'e') || (c1 == 'l' && c2 == 'l')) return 3;
  return 0;
}

// End of the run of characters of class `cls` that starts at `pos`.
size_t run_end(std::string_view text, size_t pos, CharClass cls) {
  while (pos < text.size()) {
    const Char c = char_at(text, pos);
    if (c.cls != cls) break;
    pos += c.length;
  }
  return pos;
}

}  // namespace

void split_gpt2_pretokens(std::string_view text, std::vector<std::string_view>& out) {
  out.clear();
  size_t pos = 0;
  while (pos < text.size()) {
    const size_t start = pos;
    // 's|'t|'re|'ve|'m|'ll|'d
    if (const size_t n = contraction_length(text, pos)) {
      out.push_back(text.substr(start, n));
      pos += n;
      continue;
    }
    // ' ?\p{L}+', ' ?\p{N}+', ' ?[^\s\p{L}\p{N}]+': an optional space (U+0020 only) then a run of
    // one class. The space is taken only when such a run follows it.
    size_t body = pos;
    if (text[pos] == ' ' && pos + 1 < text.size() && char_at(text, pos + 1).cls != CharClass::kSpace) {
      body = pos + 1;
    }
    const Char first = char_at(text, body);
    if (first.cls != CharClass::kSpace) {
      pos = run_end(text, body + first.length, first.cls);
      out.push_back(text.substr(start, pos - start));
      continue;
    }
    // '\s+(?!\S)': a whitespace run, given back one character when a non-space follows it, so
    // that the last space can join the next word; '\s+' takes a lone space before a non-space.
    size_t last_start = pos;  // start of the run's last character
    size_t end = pos;
    while (end < text.size()) {
      const Char c = char_at(text, end);
      if (c.cls != CharClass::kSpace) break;
      last_start = end;
      end += c.length;
    }
    pos = (end < text.size() && last_start > start) ? last_start : end;
    out.push_back(text.substr(start, pos - start));
  }
}

namespace {

// (?i:'s|'t|'re|'ve|'m|'ll|'d) at text[pos]: the match length, or 0.
size_t contraction_length_nocase(std::string_view text, size_t pos) {
  if (text[pos] != '\'' || pos + 1 >= text.size()) return 0;
  auto lower = [](char c) { return (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c; };
  const char c1 = lower(text[pos + 1]);
  if (c1 == 's' || c1 == 't' || c1 == 'm' || c1 == 'd') return 2;
  if (pos + 2 >= text.size()) return 0;
  const char c2 = lower(text[pos + 2]);
  if ((c1 == 'r' && c2 == 'e') || (c1 == 'v' && c2 == 'e') || (c1 == 'l' && c2 == 'l')) return 3;
  return 0;
}

bool is_newline(char c) { return c == '\r' || c == '\n'; }

}  // namespace

void split_llama3_pretokens(std::string_view text, int max_digits, std::vector<std::string_view>& out) {
  out.clear();
  size_t pos = 0;
  auto emit = [&](size_t end) {
    out.push_back(text.substr(pos, end - pos));
    pos = end;
  };
  while (pos < text.size()) {
    // (?i:'s|'t|'re|'ve|'m|'ll|'d)
    if (const size_t n = contraction_length_nocase(text, pos)) {
      emit(pos + n);
      continue;
    }
    const Char first = char_at(text, pos);
    // [^\r\n\p{L}\p{N}]?\p{L}+: one optional character that is neither a newline, a letter nor a
    // number (a space, punctuation, a mark...) taken only when letters follow it.
    if (first.cls == CharClass::kLetter) {
      emit(run_end(text, pos, CharClass::kLetter));
      continue;
    }
    if (first.cls != CharClass::kNumber && !is_newline(text[pos]) && pos + first.length < text.size() &&
        char_at(text, pos + first.length).cls == CharClass::kLetter) {
      emit(run_end(text, pos + first.length, CharClass::kLetter));
      continue;
    }
    // \p{N}{1,max_digits}
    if (first.cls == CharClass::kNumber) {
      size_t end = pos;
      for (int i = 0; i < max_digits && end < text.size(); ++i) {
        const Char c = char_at(text, end);
        if (c.cls != CharClass::kNumber) break;
        end += c.length;
      }
      emit(end);
      continue;
    }
    //  ?[^\s\p{L}\p{N}]+[\r\n]*: an optional space (U+0020), a run of "other" characters, then
    // any newlines straight after it.
    size_t body = pos;
    if (text[pos] == ' ' && pos + 1 < text.size() && char_at(text, pos + 1).cls == CharClass::kOther) body = pos + 1;
    if (char_at(text, body).cls == CharClass::kOther) {
      size_t end = run_end(text, body, CharClass::kOther);
      while (end < text.size() && is_newline(text[end])) ++end;
      emit(end);
      continue;
    }
    // What is left starts with whitespace. Find the run and the end of its last newline.
    size_t run = pos, last_char = pos, after_newline = 0;
    while (run < text.size()) {
      const Char c = char_at(text, run);
      if (c.cls != CharClass::kSpace) break;
      if (is_newline(text[run])) after_newline = run + 1;
      last_char = run;
      run += c.length;
    }
    // \s*[\r\n]+: the greedy \s* backs off to the run's last newline, which [\r\n]+ takes.
    if (after_newline > 0) {
      emit(after_newline);
      continue;
    }
    // \s+(?!\S): the run, less its last character when a non-space follows (that character then
    // joins the next piece); \s+: the whole run, when that would leave nothing.
    emit(run < text.size() && last_char > pos ? last_char : run);
  }
}

void split_digits(std::string_view text, bool individual, std::vector<std::string_view>& out) {
  out.clear();
  size_t start = 0;
  size_t pos = 0;
  while (pos < text.size()) {
    const Char c = char_at(text, pos);
    if (c.cls != CharClass::kNumber) {
      pos += c.length;
      continue;
    }
    if (pos > start) out.push_back(text.substr(start, pos - start));
    const size_t end = individual ? pos + c.length : run_end(text, pos, CharClass::kNumber);
    out.push_back(text.substr(pos, end - pos));
    start = pos = end;
  }
  if (pos > start) out.push_back(text.substr(start, pos - start));
}

}  // namespace fineserve
