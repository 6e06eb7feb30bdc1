// StreamDecoder: the pieces it returns are whole UTF-8 characters and add up to decode().
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "models/tokenizer/bpe.h"
#include "models/tokenizer/tokenizer.h"
#include "models/tokenizer/utf8.h"
#include "tests/tokenizer/tokenizer_test_util.h"

namespace fineserve {
namespace {

using namespace tokenizer_testing;

// Feeds ids one by one; checks every piece is valid UTF-8 and returns the concatenation.
std::string stream_all(const Tokenizer& tok, const std::vector<int32_t>& ids, bool skip_special,
                       std::vector<std::string>* pieces = nullptr) {
  StreamDecoder stream(tok, skip_special);
  std::string all;
  for (int32_t id : ids) {
    std::string piece = stream.feed(id);
    EXPECT_TRUE(utf8::is_valid(piece));
    if (pieces != nullptr) pieces->push_back(piece);
    all += piece;
  }
  const std::string rest = stream.flush();
  EXPECT_TRUE(utf8::is_valid(rest));
  return all + rest;
}

TEST(StreamDecoder, MultiByteCharactersWaitForTheirLastByte) {
  // "😀" is four bytes; GPT-2 spends more than one token on it.
  const auto ids = gpt2().encode("a\xF0\x9F\x98\x80" "b", false);
  ASSERT_GT(ids.size(), 3u);
  std::vector<std::string> pieces;
  EXPECT_EQ(stream_all(gpt2(), ids, true, &pieces), "a\xF0\x9F\x98\x80" "b");
  // No piece holds part of the emoji: the emoji arrives whole in exactly one piece.
  int holding = 0;
  for (const auto& p : pieces) holding += p.find("\xF0\x9F\x98\x80") != std::string::npos;
  EXPECT_EQ(holding, 1);
}

TEST(StreamDecoder, EqualsDecodeOnEncodedText) {
  for (const auto& c : reference().at("gpt2").at("cases")) {
    const auto ids = c.at("ids").get<std::vector<int32_t>>();
    const std::string expected = gpt2().decode(ids, true);
    ASSERT_EQ(stream_all(gpt2(), ids, true), expected) << c.at("text");
    ASSERT_EQ(stream_all(gpt2(), ids, false), gpt2().decode(ids, false)) << c.at("text");
  }
}

TEST(StreamDecoder, EqualsDecodeOnRandomIds) {
  // Random ids, half of them single bytes >= 0x80 (ill-formed and cut-off UTF-8), some special,
  // some naming nothing.
  std::mt19937 rng(77);
  std::vector<int32_t> high_bytes;
  for (size_t b = 0x80; b < 0x100; ++b) high_bytes.push_back(*gpt2().token_to_id(gpt2_byte_chars()[b]));
  for (int i = 0; i < 500; ++i) {
    std::vector<int32_t> ids(std::uniform_int_distribution<size_t>(0, 24)(rng));
    for (int32_t& id : ids) {
      const int kind = std::uniform_int_distribution<int>(0, 9)(rng);
      if (kind < 5) {
        id = high_bytes[std::uniform_int_distribution<size_t>(0, high_bytes.size() - 1)(rng)];
      } else if (kind == 5) {
        id = 50256;
      } else if (kind == 6) {
        id = std::uniform_int_distribution<int32_t>(-5, 60000)(rng);
      } else {
        id = std::uniform_int_distribution<int32_t>(0, 50255)(rng);
      }
    }
    for (const bool skip : {true, false}) {
      ASSERT_EQ(stream_all(gpt2(), ids, skip), gpt2().decode(ids, skip)) << "case " << i;
    }
  }
}

TEST(StreamDecoder, FlushStartsOver) {
  StreamDecoder stream(gpt2());
  const auto ids = gpt2().encode("\xE4\xBD\xA0", false);  // 你: split over tokens
  ASSERT_GT(ids.size(), 1u);
  EXPECT_EQ(stream.feed(ids[0]), "");
  EXPECT_EQ(stream.flush(), "\xEF\xBF\xBD");  // cut short: U+FFFD, as decode() of the prefix
  EXPECT_EQ(stream.flush(), "");
  std::string all;
  for (int32_t id : ids) all += stream.feed(id);
  EXPECT_EQ(all, "\xE4\xBD\xA0");
  EXPECT_EQ(stream.flush(), "");
}

}  // namespace
}  // namespace fineserve
