// Response bodies: turns one request's token events into the bytes its client receives, in the
// shape of its route (TGI JSON or SSE; OpenAI completion / chat completion, JSON or SSE). Pure (no
// sockets), so the shapes are unit-tested on their own.
//
// Streams: the body is a sequence of SSE events, written as they are produced by on_events(); the
// final event(s) come with the token that finishes the request. Non-streaming routes: on_events()
// accumulates and returns the whole JSON body with the finishing token.
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
  ApiRequest request;           // the parsed request (route, stream, details, echo, ...)
  std::string prompt_text;      // for return_full_text / echo
  int prompt_tokens = 0;
  uint64_t seed = 0;            // reported by TGI details when the request samples
  std::string model_name;
  std::string id;               // OpenAI: "cmpl-..." / "chatcmpl-..."
  int64_t created = 0;          // OpenAI: unix seconds
  const Tokenizer* tokenizer = nullptr;  // for TGI's "special" flag; may be null
};

class ResponseWriter {
 public:
  explicit ResponseWriter(ResponseContext context);

  bool streaming() const { return ctx_.request.stream; }
  // Content type of the body: SSE for streams, JSON otherwise.
  std::string content_type() const;

  // New tokens (the last one may finish the request). Returns the bytes to send now: SSE events
  // for streams; for non-streaming routes "" until the finishing token, then the whole body.
  std::string on_events(const std::vector<TokenEvent>& events);
  // The request failed after the response started (timeout, shutdown, engine fault): an error
  // event for streams (then the stream ends), the error object for non-streaming routes.
  std::string on_failure(const ApiError& error);

  bool finished() const { return finished_; }
  const std::string& text() const { return text_; }
  int generated_tokens() const { return static_cast<int>(tokens_.size()); }

 private:
  std::string on_event(const TokenEvent& e);  // one event, streaming
  nlohmann::json usage() const;
  nlohmann::json tgi_details(FinishReason reason, bool with_tokens) const;
  nlohmann::json token_json(const TokenEvent& e) const;
  nlohmann::json openai_chunk(nlohmann::json choice) const;
  std::string final_body(FinishReason reason) const;

  ResponseContext ctx_;
  std::vector<TokenEvent> tokens_;  // every event so far (text as released)
  std::string text_;                // generated text so far
  bool role_sent_ = false;          // chat streams: the first chunk carries the role
  bool echo_sent_ = false;          // completion streams with echo
  bool finished_ = false;
  std::optional<ToolCallStream> tool_stream_;  // chat streams with tools (server/tool_calls.h)
};

// Error bodies: TGI routes {"error": message, "error_type": type}; OpenAI routes OpenAI's shape
// {"error": {"message", "type", "param": null, "code": status}}.
nlohmann::json error_body(Endpoint endpoint, const ApiError& error);

}  // namespace fineserve
