#include "engine/stop.h"

#include <algorithm>
#include <utility>

#include "kernels/base.h"

namespace fineserve {

namespace {

// Length of a trailing UTF-8 character that has not received all its bytes yet (0 when the text
// ends on a character boundary, or with bytes that are not valid UTF-8 anyway: those are not held).
size_t incomplete_utf8_tail(std::string_view s) {
  for (size_t k = 1; k <= std::min<size_t>(3, s.size()); ++k) {
    const auto c = static_cast<unsigned char>(s[s.size() - k]);
    if ((c & 0xC0u) == 0x80u) continue;  // continuation byte: look further back for the lead
    size_t len = 1;
    if ((c & 0xE0u) == 0xC0u) len = 2;
    else if ((c & 0xF0u) == 0xE0u) len = 3;
    else if ((c & 0xF8u) == 0xF0u) len = 4;
    return len > k ? k : 0;
  }
  return 0;
}

// Longest proper prefix of `stop` that `text` ends with.
size_t suffix_prefix_len(std::string_view text, std::string_view stop) {
  for (size_t len = std::min(text.size(), stop.size() - 1); len > 0; --len)
    if (text.substr(text.size() - len) == stop.substr(0, len)) return len;
  return 0;
}

}  // namespace

std::string_view finish_reason_name(FinishReason reason) {
  switch (reason) {
    case FinishReason::Length: return "length";
    case FinishReason::EosToken: return "eos_token";
    case FinishReason::StopSequence: return "stop_sequence";
    case FinishReason::GrammarEnd: return "grammar_end";
  }
  return "?";
}

void StopConditions::validate() const {
  if (max_new_tokens < 0)
    throw Error("stop conditions: max_new_tokens must be >= 0, got " + std::to_string(max_new_tokens));
  for (size_t i = 0; i < stop.size(); ++i)
    if (stop[i].empty()) throw Error("stop conditions: stop string " + std::to_string(i) + " is empty");
}

StopChecker::StopChecker(StopConditions conditions) : cond_(std::move(conditions)) {
  cond_.validate();
  std::sort(cond_.eos_token_ids.begin(), cond_.eos_token_ids.end());
}

size_t StopChecker::hold_back_len() const {
  size_t hold = incomplete_utf8_tail(held_);
  for (const std::string& s : cond_.stop) hold = std::max(hold, suffix_prefix_len(held_, s));
  return hold;
}

std::string StopChecker::finish_with(std::string text) {
  finished_ = true;
  held_.clear();
  if (const size_t tail = incomplete_utf8_tail(text); tail > 0) {
    // (erase + append rather than resize: GCC 12 -Wrestrict misfires on string::resize here)
    text.erase(text.size() - tail);
    text.append("\xEF\xBF\xBD");  // U+FFFD REPLACEMENT CHARACTER
  }
  return text;
}

StopUpdate StopChecker::push(int32_t token, std::string_view piece) {
  FS_ASSERT(!finished_, "push after the request finished");
  ++num_tokens_;
  StopUpdate update;

  if (std::binary_search(cond_.eos_token_ids.begin(), cond_.eos_token_ids.end(), token)) {
    update.finish = FinishReason::EosToken;
    update.text = finish_with(std::move(held_));
    return update;
  }

  // Everything emitted so far was released because no stop string could start in it, so a match
  // can only start inside held_ + piece.
  held_ += piece;
  size_t match_at = std::string::npos;
  for (size_t i = 0; i < cond_.stop.size(); ++i) {
    const size_t at = held_.find(cond_.stop[i]);
    if (at < match_at) {  // earliest match wins; on a tie the first listed string
      match_at = at;
      update.stop_index = static_cast<int>(i);
    }
  }
  if (match_at != std::string::npos) {
    update.finish = FinishReason::StopSequence;
    held_.erase(match_at);
    update.text = finish_with(std::move(held_));
    return update;
  }

  if (num_tokens_ >= cond_.max_new_tokens) {
    update.finish = FinishReason::Length;
    update.text = finish_with(std::move(held_));
    return update;
  }

  const size_t emit = held_.size() - hold_back_len();
  update.text = held_.substr(0, emit);
  held_.erase(0, emit);
  return update;
}

std::string StopChecker::flush() {
  if (finished_) return {};
  return finish_with(std::move(held_));
}

}  // namespace fineserve
