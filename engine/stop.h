// Stop conditions of one request, and the text that is safe to stream.
//
// A StopChecker sees each generated token with its decoded text piece and says whether generation
// ends there and why (EOS token, stop string, max_new_tokens), and which text may be sent to the
// client now. Text that could still be the start of a stop string is held back until it cannot
// be; when a stop string completes, the output is cut just before it (TGI / OpenAI behaviour) and
// the rest is dropped. A stop string may span many tokens, and a token may carry text past it.
//
// Emitted text never ends inside a UTF-8 sequence: a piece that ends with the first bytes of a
// multi-byte character (byte-fallback tokens) is held until the character completes. When
// generation ends with an incomplete character, it is released as U+FFFD, as HF decode does.
//
// Use:
//   StopChecker stop(conditions);                    // conditions validated (fineserve::Error)
//   for each generated token:
//     StopUpdate u = stop.push(token, piece);        // piece = detokenized text of the token
//     send(u.text);
//     if (u.finish) { report(finish_reason_name(*u.finish)); break; }
//   if generation ends another way (client gone, server shutting down): send(stop.flush());
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace fineserve {

enum class FinishReason {
  Length,        // max_new_tokens generated
  EosToken,      // an end-of-sequence token was generated
  StopSequence,  // a stop string appeared in the output
  GrammarEnd,    // constrained decoding: the grammar allows no further token
};

// TGI's names: "length", "eos_token", "stop_sequence"; and "grammar_end".
std::string_view finish_reason_name(FinishReason reason);

struct StopConditions {
  std::vector<int32_t> eos_token_ids;  // a set: generating any of them ends the request (the
                                       // model's EOS and a request's stop_token_ids)
  int max_new_tokens = 100;            // >= 0; counts every generated token, EOS included. 0: the
                                       // request only scores its prompt (no token is generated)
  std::vector<std::string> stop;       // stop strings, each non-empty

  // Throws fineserve::Error naming the field when max_new_tokens < 0 or a stop string is empty.
  void validate() const;
};

// What to do after one token.
struct StopUpdate {
  std::optional<FinishReason> finish;  // set when generation ends with this token
  std::string text;                    // text to emit now (possibly empty)
  int stop_index = -1;                 // for StopSequence: index in StopConditions::stop
};

class StopChecker {
 public:
  explicit StopChecker(StopConditions conditions);  // validates

  // One generated token and its decoded text. Precedence when several hold at once, as vLLM:
  // EOS token (its piece is not emitted), then stop string, then length. On every finish all
  // releasable text is in the returned `text`. FS_ASSERT: not finished yet.
  StopUpdate push(int32_t token, std::string_view piece);

  // Releases the held-back text when generation ends without a finish from push (e.g. the
  // request was cancelled). Returns "" after a finish. Ends the checker.
  std::string flush();

  bool finished() const { return finished_; }
  int num_tokens() const { return num_tokens_; }

 private:
  // Bytes at the end of held_ to keep back: a proper prefix of a stop string or an incomplete
  // UTF-8 character, whichever is longer.
  size_t hold_back_len() const;
  // Ends the checker and returns `text` with an incomplete trailing character replaced by U+FFFD.
  std::string finish_with(std::string text);

  StopConditions cond_;
  std::string held_;  // generated text not yet emitted
  int num_tokens_ = 0;
  bool finished_ = false;
};

}  // namespace fineserve
