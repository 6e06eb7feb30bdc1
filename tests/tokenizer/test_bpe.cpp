// Properties of the byte-level BPE tokenizer beyond the reference strings: round trips on random
// text and random bytes, the pre-tokenizer, Unicode classes, UTF-8 repair, the vocabulary API,
// concurrent use.
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "models/tokenizer/bpe.h"
#include "models/tokenizer/pretokenize.h"
#include "models/tokenizer/unicode.h"
#include "models/tokenizer/utf8.h"
#include "tests/tokenizer/tokenizer_test_util.h"

namespace fineserve {
namespace {

using namespace tokenizer_testing;

// Random valid UTF-8 mixing ASCII, whitespace of every kind, Latin, marks, CJK, emoji, ZWJ and
// arbitrary code points.
std::string random_unicode(std::mt19937& rng, size_t n_chars) {
  static const std::vector<std::pair<uint32_t, uint32_t>> pools = {
      {0x20, 0x7E}, {0x20, 0x7E}, {0x09, 0x0D}, {0x1C, 0x20}, {0x85, 0x85}, {0xA0, 0xA0},
      {0x2000, 0x200D}, {0x2028, 0x2029}, {0x3000, 0x3000}, {0xC0, 0x24F}, {0x300, 0x36F},
      {0x4E00, 0x9FFF}, {0x600, 0x6FF}, {0x1F300, 0x1FAFF}, {0x1F3FB, 0x1F3FF}, {0xFE0F, 0xFE0F},
      {0x0, 0x10FFFF}};
  std::string s;
  for (size_t i = 0; i < n_chars; ++i) {
    const auto& [lo, hi] = pools[std::uniform_int_distribution<size_t>(0, pools.size() - 1)(rng)];
    uint32_t cp = std::uniform_int_distribution<uint32_t>(lo, hi)(rng);
    if (cp >= 0xD800 && cp < 0xE000) cp = 'x';  // surrogates are not characters
    if (std::uniform_int_distribution<int>(0, 40)(rng) == 0) {
      s += "<|endoftext|>";
    } else if (std::uniform_int_distribution<int>(0, 30)(rng) == 0) {
      s += "'s";
    } else {
      utf8::append(cp, s);
    }
  }
  return s;
}

TEST(Bpe, RoundTripsRandomUnicode) {
  std::mt19937 rng(1234);
  for (int i = 0; i < 400; ++i) {
    const std::string s = random_unicode(rng, std::uniform_int_distribution<size_t>(0, 60)(rng));
    ASSERT_TRUE(utf8::is_valid(s));
    const auto ids = gpt2().encode(s, false);
    ASSERT_EQ(gpt2().decode(ids, false), s) << "case " << i;
  }
}

TEST(Bpe, RoundTripsRandomBytes) {
  // Any bytes at all: the tokens carry them exactly; decoding shows ill-formed UTF-8 as U+FFFD.
  std::mt19937 rng(99);
  for (int i = 0; i < 400; ++i) {
    std::string bytes(std::uniform_int_distribution<size_t>(0, 80)(rng), '\0');
    const bool high = i % 2 == 0;  // half the cases mostly UTF-8 lead and continuation bytes
    for (char& c : bytes) {
      c = static_cast<char>(std::uniform_int_distribution<int>(high ? 0x70 : 0, 255)(rng));
    }
    const auto ids = gpt2().encode(bytes, false);
    std::string raw;
    for (int32_t id : ids) gpt2().append_token_bytes(id, false, raw.empty(), raw);
    ASSERT_EQ(raw, bytes) << "case " << i;
    ASSERT_EQ(gpt2().decode(ids, false), utf8::replace_invalid(bytes)) << "case " << i;
  }
}

TEST(Bpe, LongAndRepetitiveInput) {
  // One 20,000-byte word (one merge run over it) and many repeats of the same words (the cache).
  // HF: 20,001 'a' are 5,000 "aaaa" (24794) and one "a" (64).
  const std::string word(20001, 'a');
  std::vector<int32_t> expected(5000, 24794);
  expected.push_back(64);
  EXPECT_EQ(gpt2().encode(word, false), expected);
  EXPECT_EQ(gpt2().decode(expected), word);
  std::string text;
  for (int i = 0; i < 2000; ++i) text += " the quick brown fox";
  const auto once = gpt2().encode(" the quick brown fox", false);
  const auto all = gpt2().encode(text, false);
  ASSERT_EQ(all.size(), once.size() * 2000);
  for (size_t i = 0; i < all.size(); ++i) ASSERT_EQ(all[i], once[i % once.size()]);
}

TEST(Bpe, ConcurrentEncodeMatchesSerial) {
  std::mt19937 rng(5);
  std::vector<std::string> texts;
  for (int i = 0; i < 64; ++i) texts.push_back(random_unicode(rng, 200));
  std::vector<std::vector<int32_t>> expected;
  for (const auto& t : texts) expected.push_back(gpt2().encode(t));
  std::vector<int> mismatches(4, 0);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int rep = 0; rep < 3; ++rep) {
        for (size_t i = 0; i < texts.size(); ++i) {
          if (gpt2().encode(texts[(i + static_cast<size_t>(t) * 7) % texts.size()]) !=
              expected[(i + static_cast<size_t>(t) * 7) % texts.size()]) {
            ++mismatches[static_cast<size_t>(t)];
          }
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(mismatches, std::vector<int>(4, 0));
}

TEST(Bpe, VocabularyApi) {
  const Tokenizer& tok = gpt2();
  EXPECT_EQ(tok.vocab_size(), 50257);
  EXPECT_EQ(tok.token_to_id("\xC4\xA0the"), 262);  // "Ġthe"
  EXPECT_EQ(tok.id_to_token(262), "\xC4\xA0the");
  EXPECT_EQ(tok.token_to_id("<|endoftext|>"), 50256);
  EXPECT_EQ(tok.id_to_token(50256), "<|endoftext|>");
  EXPECT_FALSE(tok.token_to_id("not a token").has_value());
  EXPECT_FALSE(tok.id_to_token(-1).has_value());
  EXPECT_FALSE(tok.id_to_token(50257).has_value());
  EXPECT_TRUE(tok.is_special(50256));
  EXPECT_FALSE(tok.is_special(262));
  EXPECT_FALSE(tok.is_special(-3));
  EXPECT_EQ(tok.bos_id(), 50256);
  EXPECT_EQ(tok.eos_id(), 50256);
  // Ids that name no token are skipped, as HF does.
  EXPECT_EQ(tok.decode(std::vector<int32_t>{-1, 15496, 99999999, 995}), "Hello world");
  EXPECT_EQ(tok.decode(std::vector<int32_t>{50256, 15496}, true), "Hello");
  EXPECT_EQ(tok.decode(std::vector<int32_t>{50256, 15496}, false), "<|endoftext|>Hello");
  EXPECT_EQ(tok.decode(std::vector<int32_t>{}), "");
}

TEST(Bpe, ByteAlphabet) {
  const auto& chars = gpt2_byte_chars();
  EXPECT_EQ(chars[' '], "\xC4\xA0");   // Ġ
  EXPECT_EQ(chars['\n'], "\xC4\x8A");  // Ċ
  EXPECT_EQ(chars['A'], "A");
  EXPECT_EQ(chars[0xAD], "\xC5\x83");  // soft hyphen -> U+0143, the last stand-in
  std::vector<std::string> sorted(chars.begin(), chars.end());
  std::sort(sorted.begin(), sorted.end());
  EXPECT_EQ(std::unique(sorted.begin(), sorted.end()), sorted.end());  // reversible
  for (int b = 0; b < 256; ++b) EXPECT_TRUE(gpt2().token_to_id(chars[static_cast<size_t>(b)]).has_value()) << b;
}

TEST(Bpe, IgnoreMergesAndPrefixSpaceOptions) {
  // A tiny vocabulary: every byte, plus "ab" and "abc"; no merge builds "abc".
  BpeSpec spec;
  for (size_t b = 0; b < 256; ++b) spec.vocab.emplace(gpt2_byte_chars()[b], static_cast<int32_t>(b));
  spec.vocab.emplace("ab", 256);
  spec.vocab.emplace("abc", 257);
  spec.vocab.emplace("\xC4\xA0" "ab", 258);  // "Ġab"
  spec.merges = {{"a", "b"}, {"\xC4\xA0", "ab"}};
  {
    const BpeTokenizer tok(spec);
    EXPECT_EQ(tok.encode("abc"), (std::vector<int32_t>{256, 'c'}));
    EXPECT_EQ(tok.encode(" ab"), (std::vector<int32_t>{258}));
  }
  spec.ignore_merges = true;
  EXPECT_EQ(BpeTokenizer(spec).encode("abc"), (std::vector<int32_t>{257}));
  spec.add_prefix_space = true;
  EXPECT_EQ(BpeTokenizer(spec).encode("ab"), (std::vector<int32_t>{258}));
  EXPECT_EQ(BpeTokenizer(spec).encode(""), (std::vector<int32_t>{}));
}

TEST(Bpe, MissingBytesBecomeUnkOrVanish) {
  BpeSpec spec;
  spec.vocab = {{"a", 0}, {"b", 1}, {"<unk>", 2}};
  EXPECT_EQ(BpeTokenizer(spec).encode("a\xFF\xFE" "b"), (std::vector<int32_t>{0, 1}));
  spec.unk_token = "<unk>";
  EXPECT_EQ(BpeTokenizer(spec).encode("a\xFF\xFE" "b"), (std::vector<int32_t>{0, 2, 2, 1}));
  spec.fuse_unk = true;
  EXPECT_EQ(BpeTokenizer(spec).encode("a\xFF\xFE" "b"), (std::vector<int32_t>{0, 2, 1}));
  spec.unk_token = "<nope>";
  EXPECT_NE(error_of([&] { BpeTokenizer t(spec); }).find("<nope>"), std::string::npos);
}

// ---- pre-tokenizer, Unicode classes, UTF-8 ---------------------------------------------------

std::vector<std::string> pretokens(std::string_view text) {
  std::vector<std::string_view> views;
  split_gpt2_pretokens(text, views);
  return {views.begin(), views.end()};
}

using Pieces = std::vector<std::string>;

TEST(Pretokenize, MatchesTheGpt2Regex) {
  EXPECT_EQ(pretokens(""), Pieces{});
  EXPECT_EQ(pretokens("Hello world"), (Pieces{"Hello", " world"}));
  EXPECT_EQ(pretokens("it's I'LL"), (Pieces{"it", "'s", " I", "'", "LL"}));
  EXPECT_EQ(pretokens("'sup"), (Pieces{"'s", "up"}));
  EXPECT_EQ(pretokens("a  b"), (Pieces{"a", " ", " b"}));
  EXPECT_EQ(pretokens("a   "), (Pieces{"a", "   "}));
  EXPECT_EQ(pretokens("a\n\n \nb"), (Pieces{"a", "\n\n ", "\n", "b"}));
  EXPECT_EQ(pretokens("a\n\n \n"), (Pieces{"a", "\n\n \n"}));
  EXPECT_EQ(pretokens("a\nb"), (Pieces{"a", "\n", "b"}));
  EXPECT_EQ(pretokens("x2024 ab12"), (Pieces{"x", "2024", " ab", "12"}));
  EXPECT_EQ(pretokens(" !!?a"), (Pieces{" !!?", "a"}));
  EXPECT_EQ(pretokens("\t x"), (Pieces{"\t", " x"}));
  EXPECT_EQ(pretokens("caf\xC3\xA9 \xE4\xBD\xA0\xE5\xA5\xBD"), (Pieces{"caf\xC3\xA9", " \xE4\xBD\xA0\xE5\xA5\xBD"}));
  // U+3000 is whitespace, U+00A0 too; a space before it does not join a word.
  EXPECT_EQ(pretokens("a\xE3\x80\x80" "b"), (Pieces{"a", "\xE3\x80\x80", "b"}));
  // Ill-formed bytes are punctuation-like characters of their own.
  EXPECT_EQ(pretokens("\xFF\xFE abc\x80"), (Pieces{"\xFF\xFE", " abc", "\x80"}));
  EXPECT_EQ(pretokens("ab\xE2\x82"), (Pieces{"ab", "\xE2\x82"}));
}

TEST(Unicode, ClassesMatchOniguruma) {
  using unicode::CharClass;
  EXPECT_EQ(unicode::char_class('a'), CharClass::kLetter);
  EXPECT_EQ(unicode::char_class('7'), CharClass::kNumber);
  EXPECT_EQ(unicode::char_class('!'), CharClass::kOther);
  EXPECT_EQ(unicode::char_class('\t'), CharClass::kSpace);
  EXPECT_EQ(unicode::char_class(0x1C), CharClass::kOther);  // isspace() in Python, not White_Space
  EXPECT_EQ(unicode::char_class(0x85), CharClass::kSpace);
  EXPECT_EQ(unicode::char_class(0x3000), CharClass::kSpace);
  EXPECT_EQ(unicode::char_class(0x200B), CharClass::kOther);  // zero width space is not \s
  EXPECT_EQ(unicode::char_class(0x0301), CharClass::kOther);  // combining mark
  EXPECT_EQ(unicode::char_class(0x4E2D), CharClass::kLetter);
  EXPECT_EQ(unicode::char_class(0x1C89), CharClass::kLetter);  // new in Unicode 16
  EXPECT_EQ(unicode::char_class(0x10D40), CharClass::kNumber);  // new in Unicode 16
  EXPECT_EQ(unicode::char_class(0x2160), CharClass::kNumber);   // Roman numeral (Nl)
  EXPECT_EQ(unicode::char_class(0x10FFFF), CharClass::kOther);
  EXPECT_EQ(unicode::char_class(utf8::kInvalid), CharClass::kOther);
  EXPECT_TRUE(unicode::is_word_char('_'));
  EXPECT_TRUE(unicode::is_word_char(0x0301));
  EXPECT_TRUE(unicode::is_word_char(0x24B6));  // Ⓐ: Other_Alphabetic
  EXPECT_FALSE(unicode::is_word_char('-'));
}

TEST(Utf8, ReplacesMaximalSubpartsLikePython) {
  // Expected values from Python's bytes.decode("utf-8", "replace").
  const std::string r = "\xEF\xBF\xBD";
  EXPECT_EQ(utf8::replace_invalid("\x80"), r);
  EXPECT_EQ(utf8::replace_invalid("\xE2\x82"), r);
  EXPECT_EQ(utf8::replace_invalid("\xE2\x82" "A"), r + "A");
  EXPECT_EQ(utf8::replace_invalid("\xF0\x9F\x98"), r);
  EXPECT_EQ(utf8::replace_invalid("\xED\xA0\x80"), r + r + r);  // a surrogate
  EXPECT_EQ(utf8::replace_invalid("\xC0\xAF"), r + r);          // overlong
  EXPECT_EQ(utf8::replace_invalid("\xF4\x90\x80\x80"), r + r + r + r);  // above U+10FFFF
  EXPECT_EQ(utf8::replace_invalid("\xE0\x80\x80"), r + r + r);
  EXPECT_EQ(utf8::replace_invalid("a\xF0\x9F\x98\x80" "b\xF0\x9F"), "a\xF0\x9F\x98\x80" "b" + r);
  EXPECT_EQ(utf8::replace_invalid("\xF1\x80\x80\xC2\xA9"), r + "\xC2\xA9");
  EXPECT_EQ(utf8::replace_invalid(std::string("a\0b", 3)), std::string("a\0b", 3));
}

TEST(Utf8, KeepsAnUnfinishedCharacterWhenNotFinal) {
  std::string out;
  EXPECT_EQ(utf8::append_replacing_invalid("ab\xF0\x9F\x98", false, out), 2u);
  EXPECT_EQ(out, "ab");
  out.clear();
  EXPECT_EQ(utf8::append_replacing_invalid("ab\xF0\x41", false, out), 4u);  // can never finish
  EXPECT_EQ(out, "ab\xEF\xBF\xBD" "A");
  out.clear();
  EXPECT_EQ(utf8::append_replacing_invalid("\xFF", false, out), 1u);
  EXPECT_EQ(out, "\xEF\xBF\xBD");
}

TEST(Utf8, DecodeAndAppendAgree) {
  for (uint32_t cp : {0x0u, 0x7Fu, 0x80u, 0x7FFu, 0x800u, 0xFFFFu, 0x10000u, 0x10FFFFu}) {
    std::string s;
    utf8::append(cp, s);
    const utf8::Decoded d = utf8::decode(s, 0);
    EXPECT_EQ(d.code_point, cp);
    EXPECT_EQ(d.length, s.size());
    EXPECT_TRUE(utf8::is_valid(s));
  }
  EXPECT_FALSE(utf8::is_valid("\xC3"));
  EXPECT_EQ(utf8::decode("\xC3", 0).code_point, utf8::kInvalid);
}

}  // namespace
}  // namespace fineserve
