// Response bodies: turns one request's token events into the bytes its client receives, in the
// shape of its route (TGI JSON or SSE; OpenAI completion / chat completion, JSON or SSE). Pure (no
// sockets), so the shapes are unit-tested on their own.
//
// A request has ApiRequest::best_of sequences (choices); events name theirs. Streams: SSE events
// written as they are produced by on_events(), each choice's chunks carrying its index; the final
// event(s) come when the last choice finishes. Non-streaming routes: on_events() accumulates and
// returns the whole JSON body when the last choice finishes; with best_of > n, the n sequences of
// highest cumulative logprob are returned (TGI: the best one, the others in best_of_sequences).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "engine/engine.h"
#include "server/api.h"
#include "server/tool_calls.h"

namespace fineserve {

struct ResponseContext {
  ApiRequest request;           // the parsed request (route, stream, details, echo, n, ...)
  std::string prompt_text;      // for return_full_text / echo
  int prompt_tokens = 0;
  uint64_t seed = 0;            // reported by TGI details when the request samples
  std::string model_name;
  std::string id;               // OpenAI: "cmpl-..." / "chatcmpl-..."
  int64_t created = 0;          // OpenAI: unix seconds
  const Tokenizer* tokenizer = nullptr;  // token strings of logprobs, TGI's "special" flag; may be null
  std::vector<int32_t> prompt_ids;       // the tokenized prompt (echo / prefill logprobs)
  bool tgi_root = false;  // TGI's POST /: the non-streaming body is an array of one response, as TGI's
};

class ResponseWriter {
 public:
  explicit ResponseWriter(ResponseContext context);

  bool streaming() const { return ctx_.request.stream; }
  // Content type of the body: SSE for streams, JSON otherwise.
  std::string content_type() const;

  // New events (a choice's last one finishes it). Returns the bytes to send now: SSE events for
  // streams; for non-streaming routes "" until every choice finished, then the whole body.
  std::string on_events(const std::vector<TokenEvent>& events);
  // The request failed after the response started (timeout, shutdown, engine fault): an error
  // event for streams (then the stream ends), the error object for non-streaming routes.
  std::string on_failure(const ApiError& error);

  bool finished() const { return finished_; }
  const std::string& text(int choice = 0) const { return choices_.at(static_cast<size_t>(choice)).text; }
  int generated_tokens() const;  // over every choice

 private:
  struct Choice {
    std::vector<TokenEvent> tokens;  // generated tokens (events without a token are not kept)
    std::string text;                // generated text so far
    std::optional<FinishReason> finish;
    double cumulative_logprob = 0;
    bool role_sent = false;  // chat streams: the first chunk carries the role
    bool echo_sent = false;  // completion streams with echo
    std::optional<ToolCallStream> tool_stream;  // chat streams with tools (server/tool_calls.h)
  };

  std::string on_event(const TokenEvent& e);  // one event, streaming
  nlohmann::json usage() const;
  std::string token_string(int32_t token) const;
  nlohmann::json tgi_token(const TokenEvent& e) const;
  nlohmann::json tgi_top_tokens(const std::vector<TokenLogprob>& top) const;
  nlohmann::json tgi_details(const Choice& c, bool with_tokens) const;
  nlohmann::json tgi_prefill() const;
  // OpenAI completions' legacy logprobs object over the prompt (when echoed) and `tokens`.
  nlohmann::json completion_logprobs(const std::vector<TokenEvent>& tokens, bool with_prompt, size_t offset) const;
  nlohmann::json chat_logprobs(const std::vector<TokenEvent>& tokens) const;
  nlohmann::json openai_chunk(nlohmann::json choice) const;
  std::vector<int> returned_choices() const;  // indices into choices_, best first when best_of > n
  std::string final_body() const;

  ResponseContext ctx_;
  std::vector<Choice> choices_;                 // best_of of them
  std::vector<PositionLogprobs> prompt_logprobs_;  // from the engine, when asked for
  int unfinished_ = 0;
  bool finished_ = false;
  int cached_tokens_ = 0;  // prompt tokens served from the prefix cache (usage)
};

// Error bodies: TGI routes {"error": message, "error_type": type}; OpenAI routes OpenAI's shape
// {"error": {"message", "type", "param": null, "code": status}}.
nlohmann::json error_body(Endpoint endpoint, const ApiError& error);

}  // namespace fineserve
