#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "engine/stop.h"
#include "kernels/base.h"

namespace fineserve {
namespace {

StopConditions with_stops(std::vector<std::string> stops, int max_new_tokens = 100) {
  StopConditions c;
  c.eos_token_ids = {2};
  c.max_new_tokens = max_new_tokens;
  c.stop = std::move(stops);
  return c;
}

// Whether `s` is well-formed UTF-8 (structure only; enough for these tests).
bool valid_utf8(const std::string& s) {
  size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    size_t len = c < 0x80 ? 1 : (c & 0xE0) == 0xC0 ? 2 : (c & 0xF0) == 0xE0 ? 3 : (c & 0xF8) == 0xF0 ? 4 : 0;
    if (len == 0 || i + len > s.size()) return false;
    for (size_t j = 1; j < len; ++j)
      if ((static_cast<unsigned char>(s[i + j]) & 0xC0) != 0x80) return false;
    i += len;
  }
  return true;
}

TEST(Stop, FinishReasonNamesAreTgis) {
  EXPECT_EQ(finish_reason_name(FinishReason::Length), "length");
  EXPECT_EQ(finish_reason_name(FinishReason::EosToken), "eos_token");
  EXPECT_EQ(finish_reason_name(FinishReason::StopSequence), "stop_sequence");
}

TEST(Stop, ValidateRejectsBadConditions) {
  EXPECT_NO_THROW(StopConditions{}.validate());
  StopConditions c;
  c.max_new_tokens = 0;  // a prompt-scoring request: allowed
  EXPECT_NO_THROW(c.validate());
  c.max_new_tokens = -1;
  EXPECT_THROW(c.validate(), Error);
  EXPECT_THROW(StopChecker{c}, Error);
  c = with_stops({"ok", ""});
  EXPECT_THROW(StopChecker{c}, Error);
}

TEST(Stop, TextWithoutStopStringsFlowsThrough) {
  StopChecker s(with_stops({}));
  EXPECT_EQ(s.push(10, "Hello").text, "Hello");
  const StopUpdate u = s.push(11, ", world");
  EXPECT_EQ(u.text, ", world");
  EXPECT_FALSE(u.finish);
  EXPECT_EQ(s.flush(), "");
  EXPECT_TRUE(s.finished());
}

TEST(Stop, StopStringAcrossTokens) {
  StopChecker s(with_stops({"###"}));
  EXPECT_EQ(s.push(5, "Hello").text, "Hello");
  EXPECT_EQ(s.push(6, " #").text, " ");  // "#" could start "###": held
  EXPECT_EQ(s.push(7, "#").text, "");    // "##" held
  const StopUpdate u = s.push(8, "# world");
  ASSERT_TRUE(u.finish);
  EXPECT_EQ(*u.finish, FinishReason::StopSequence);
  EXPECT_EQ(u.stop_index, 0);
  EXPECT_EQ(u.text, "");  // truncated before the stop string, the rest dropped
  EXPECT_TRUE(s.finished());
  EXPECT_EQ(s.flush(), "");
  EXPECT_EQ(s.num_tokens(), 4);
}

TEST(Stop, PartialPrefixIsReleasedWhenItFailsToMatch) {
  StopChecker s(with_stops({"STOP"}));
  EXPECT_EQ(s.push(5, "ab").text, "ab");
  EXPECT_EQ(s.push(5, "ST").text, "");
  EXPECT_EQ(s.push(5, "O").text, "");
  EXPECT_EQ(s.push(5, "x S").text, "STOx ");  // "S" held again
  EXPECT_EQ(s.push(5, "TOPPED").text, "");
}

TEST(Stop, OverlappingPrefixKeepsOnlyWhatCanStillMatch) {
  // Output "aaab" with stop "aab": the first "a" is safe once a third "a" arrives.
  StopChecker s(with_stops({"aab"}));
  EXPECT_EQ(s.push(5, "aa").text, "");
  EXPECT_EQ(s.push(5, "a").text, "a");
  const StopUpdate u = s.push(5, "b");
  EXPECT_EQ(u.text, "");
  EXPECT_EQ(u.finish, FinishReason::StopSequence);
}

TEST(Stop, TokenWithTextPastTheMatch) {
  StopChecker s(with_stops({"END"}));
  const StopUpdate u = s.push(5, "xxENDyyy");
  EXPECT_EQ(u.text, "xx");
  EXPECT_EQ(u.finish, FinishReason::StopSequence);
}

TEST(Stop, EarliestOfSeveralStopStringsWins) {
  StopChecker s(with_stops({"world", "lo w", "zzz"}));
  const StopUpdate u = s.push(5, "hello world");
  EXPECT_EQ(u.text, "hel");
  EXPECT_EQ(u.stop_index, 1);
}

TEST(Stop, EosTokenStopsAndReleasesHeldText) {
  StopConditions c = with_stops({"##"});
  c.eos_token_ids = {50256, 2, 7};
  StopChecker s(c);
  EXPECT_EQ(s.push(5, "a#").text, "a");
  const StopUpdate u = s.push(7, "</s>");
  ASSERT_TRUE(u.finish);
  EXPECT_EQ(*u.finish, FinishReason::EosToken);
  EXPECT_EQ(u.text, "#");  // the held text, not the EOS token's own text
}

TEST(Stop, LengthStopsAtMaxNewTokens) {
  StopChecker s(with_stops({"xyz"}, 3));
  EXPECT_FALSE(s.push(5, "a").finish);
  EXPECT_FALSE(s.push(5, "b").finish);
  const StopUpdate u = s.push(5, "cx");
  ASSERT_TRUE(u.finish);
  EXPECT_EQ(*u.finish, FinishReason::Length);
  EXPECT_EQ(u.text, "cx");  // "x" can no longer become "xyz"
  EXPECT_EQ(s.num_tokens(), 3);
}

TEST(Stop, PrecedenceEosThenStopStringThenLength) {
  {
    StopChecker s(with_stops({"b"}, 1));
    EXPECT_EQ(s.push(2, "b").finish, FinishReason::EosToken);
  }
  {
    StopChecker s(with_stops({"b"}, 1));
    const StopUpdate u = s.push(5, "abc");
    EXPECT_EQ(u.finish, FinishReason::StopSequence);
    EXPECT_EQ(u.text, "a");
  }
  {
    StopChecker s(with_stops({"b"}, 1));
    EXPECT_EQ(s.push(5, "ac").finish, FinishReason::Length);
  }
}

TEST(Stop, FlushReleasesHeldText) {
  StopChecker s(with_stops({"abc"}));
  EXPECT_EQ(s.push(5, "xab").text, "x");
  EXPECT_FALSE(s.finished());
  EXPECT_EQ(s.flush(), "ab");
  EXPECT_TRUE(s.finished());
  EXPECT_EQ(s.flush(), "");
}

TEST(StopDeathTest, PushAfterFinishAborts) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH(
      {
        StopChecker s(with_stops({}, 1));
        (void)s.push(5, "a");
        (void)s.push(5, "b");
      },
      "push after the request finished");
}

TEST(Stop, MultiByteUtf8Pieces) {
  // "你" = E4 BD A0 arriving one byte per token (byte-fallback tokens): held until complete.
  StopChecker s(with_stops({}));
  EXPECT_EQ(s.push(5, "\xE4").text, "");
  EXPECT_EQ(s.push(5, "\xBD").text, "");
  EXPECT_EQ(s.push(5, "\xA0!").text, "\xE4\xBD\xA0!");
  // "é" = C3 A9 split across tokens, then a 4-byte emoji split 2 + 2.
  EXPECT_EQ(s.push(5, "caf\xC3").text, "caf");
  EXPECT_EQ(s.push(5, "\xA9 \xF0\x9F").text, "\xC3\xA9 ");
  EXPECT_EQ(s.push(5, "\x98\x80").text, "\xF0\x9F\x98\x80");
}

TEST(Stop, MultiByteStopStringSplitInsideCharacters) {
  // Stop "你好" (E4 BD A0 E5 A5 BD) whose bytes arrive split inside both characters.
  StopChecker s(with_stops({"\xE4\xBD\xA0\xE5\xA5\xBD"}));
  EXPECT_EQ(s.push(5, "a\xE4\xBD").text, "a");
  EXPECT_EQ(s.push(5, "\xA0\xE5\xA5").text, "");
  const StopUpdate u = s.push(5, "\xBD\xE5\x90\x97");
  EXPECT_EQ(u.finish, FinishReason::StopSequence);
  EXPECT_EQ(u.text, "");
  // The same prefix that then diverges is released whole.
  StopChecker t(with_stops({"\xE4\xBD\xA0\xE5\xA5\xBD"}));
  EXPECT_EQ(t.push(5, "\xE4\xBD\xA0").text, "");
  EXPECT_EQ(t.push(5, "\xE4\xBB\xAC").text, "\xE4\xBD\xA0\xE4\xBB\xAC");  // "你们"
}

TEST(Stop, IncompleteCharacterAtTheEndBecomesReplacementChar) {
  StopChecker s(with_stops({}, 2));
  EXPECT_EQ(s.push(5, "ok").text, "ok");
  const StopUpdate u = s.push(5, "\xF0\x9F");
  EXPECT_EQ(u.finish, FinishReason::Length);
  EXPECT_EQ(u.text, "\xEF\xBF\xBD");
  StopChecker f(with_stops({}));
  EXPECT_EQ(f.push(5, "x\xE4\xBD").text, "x");
  EXPECT_EQ(f.flush(), "\xEF\xBF\xBD");
  // Stray continuation bytes are not UTF-8 anyway: passed on, not held forever.
  StopChecker g(with_stops({}));
  EXPECT_EQ(g.push(5, "a\x80\x80\x80\x80").text, "a\x80\x80\x80\x80");
}

// Random token streams against a direct model: after token t the generated text is the
// concatenation of pieces 0..t; the request stops at the first t whose text contains a stop
// string, and the output is that text cut at the earliest match.
TEST(Stop, RandomStreamsMatchADirectModel) {
  std::mt19937 rng(42);
  const std::vector<std::string> stops = {"##a", "ba#", "bbbb", "\xC3\xA9#"};
  const std::vector<std::string> alphabet = {"a", "b", "#", "\xC3\xA9"};
  size_t longest = 0;
  for (const auto& st : stops) longest = std::max(longest, st.size());
  for (int trial = 0; trial < 3000; ++trial) {
    const int max_new = 1 + static_cast<int>(rng() % 30);
    StopChecker s(with_stops(stops, max_new));
    std::string generated, emitted, want;
    bool done = false;
    for (int t = 0; t < max_new && !done; ++t) {
      std::string piece;
      for (int n = static_cast<int>(rng() % 4); n > 0; --n) piece += alphabet[rng() % alphabet.size()];
      generated += piece;
      size_t cut = std::string::npos;
      for (const auto& st : stops) cut = std::min(cut, generated.find(st));
      const StopUpdate u = s.push(5, piece);
      emitted += u.text;
      if (cut != std::string::npos) {
        want = generated.substr(0, cut);
        ASSERT_EQ(u.finish, FinishReason::StopSequence) << "trial " << trial;
        done = true;
      } else if (t + 1 == max_new) {
        want = generated;
        ASSERT_EQ(u.finish, FinishReason::Length) << "trial " << trial;
        done = true;
      } else {
        ASSERT_FALSE(u.finish) << "trial " << trial;
        // Nothing is held longer than a stop string could still need.
        ASSERT_EQ(generated.compare(0, emitted.size(), emitted), 0);
        ASSERT_LT(generated.size() - emitted.size(), longest) << "trial " << trial;
      }
    }
    ASSERT_TRUE(done);
    ASSERT_TRUE(s.finished());
    ASSERT_EQ(emitted, want) << "trial " << trial;
  }
}

// Whole characters split at random byte positions: every emitted chunk is valid UTF-8.
TEST(Stop, RandomByteSplitsEmitOnlyWholeCharacters) {
  std::mt19937 rng(7);
  const std::vector<std::string> chars = {"a", "#", "\xC3\xA9", "\xE4\xBD\xA0", "\xF0\x9F\x98\x80"};
  const std::vector<std::string> stops = {"\xE4\xBD\xA0#", "\xF0\x9F\x98\x80\xF0\x9F\x98\x80"};
  for (int trial = 0; trial < 2000; ++trial) {
    std::string text;
    for (int n = 1 + static_cast<int>(rng() % 12); n > 0; --n) text += chars[rng() % chars.size()];
    size_t cut = std::string::npos;
    for (const auto& st : stops) cut = std::min(cut, text.find(st));
    StopChecker s(with_stops(stops, 1000));
    std::string emitted;
    size_t at = 0;
    while (at < text.size() && !s.finished()) {
      const size_t len = std::min(text.size() - at, 1 + static_cast<size_t>(rng() % 5));
      const StopUpdate u = s.push(5, std::string_view(text).substr(at, len));
      ASSERT_TRUE(valid_utf8(u.text)) << "trial " << trial;
      emitted += u.text;
      at += len;
    }
    const std::string rest = s.flush();
    ASSERT_TRUE(valid_utf8(rest));
    emitted += rest;
    EXPECT_EQ(emitted, cut == std::string::npos ? text : text.substr(0, cut)) << "trial " << trial;
  }
}

}  // namespace
}  // namespace fineserve
