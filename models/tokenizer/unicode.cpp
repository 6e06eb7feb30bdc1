#include "models/tokenizer/unicode.h"

#include <algorithm>
#include <array>
#include <span>

namespace fineserve::unicode {
namespace {

struct ClassRange {
  uint32_t first, last;
  CharClass cls;
};

struct CodePointRange {
  uint32_t first, last;
};

#include "models/tokenizer/unicode_tables.inc"

template <class Range>
const Range* find_range(std::span<const Range> ranges, uint32_t cp) {
  // The first range whose last code point is >= cp; it holds cp when it starts at or before it.
  auto it = std::lower_bound(ranges.begin(), ranges.end(), cp,
                             [](const Range& r, uint32_t c) { return r.last < c; });
  return it != ranges.end() && it->first <= cp ? &*it : nullptr;
}

// ASCII is most of the text a tokenizer sees: answer it from a table instead of a search.
std::array<CharClass, 128> make_ascii_classes() {
  std::array<CharClass, 128> table{};
  for (uint32_t c = 0; c < 128; ++c) {
    const ClassRange* r = find_range(std::span<const ClassRange>(kClassRanges), c);
    table[c] = r ? r->cls : CharClass::kOther;
  }
  return table;
}

}  // namespace

CharClass char_class(uint32_t cp) {
  static const std::array<CharClass, 128> ascii = make_ascii_classes();
  if (cp < 128) return ascii[cp];
  const ClassRange* r = find_range(std::span<const ClassRange>(kClassRanges), cp);
  return r ? r->cls : CharClass::kOther;
}

bool is_word_char(uint32_t cp) {
  return find_range(std::span<const CodePointRange>(kWordRanges), cp) != nullptr;
}

}  // namespace fineserve::unicode
