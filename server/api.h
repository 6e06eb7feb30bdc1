// The HTTP API's requests: parsing and validation of the JSON bodies of every generation route,
// and the errors they map to. Pure functions (no sockets, no model), so they can be tested and
// fuzzed on their own.
//
// Routes and their shapes (docs/api.md has the full reference):
//   POST /generate, /generate_stream   TGI: {"inputs", "parameters": {...}} (and POST /)
//   POST /v1/completions               OpenAI: {"model", "prompt", "max_tokens", ...}
//   POST /v1/chat/completions          OpenAI: {"model", "messages", "max_tokens", ...}
//
// Status codes: a body that is not JSON or not an object, or a field of the wrong JSON type -> 400;
// a value out of range, an unsupported option -> 422; a model name the server does not serve ->
// 404. Unknown fields are ignored (logged once per name).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "engine/engine.h"
#include "engine/sampler.h"
#include "engine/stop.h"
#include "server/chat_template.h"
#include "server/structured_output.h"

namespace fineserve {

// An error that becomes an HTTP response: status, a machine-readable type and a message.
class ApiError : public std::runtime_error {
 public:
  ApiError(int status, std::string type, const std::string& message)
      : std::runtime_error(message), status_(status), type_(std::move(type)) {}
  int status() const { return status_; }
  const std::string& type() const { return type_; }

 private:
  int status_;
  std::string type_;
};

// The error types the API uses (TGI's names where TGI has one).
namespace error_type {
inline constexpr const char* kBadRequest = "bad_request";        // 400
inline constexpr const char* kNotFound = "not_found";            // 404
inline constexpr const char* kPayloadTooLarge = "payload_too_large";  // 413
inline constexpr const char* kValidation = "validation";         // 422
inline constexpr const char* kOverloaded = "overloaded";         // 429
inline constexpr const char* kInternal = "internal";             // 500
inline constexpr const char* kUnavailable = "unavailable";       // 503
inline constexpr const char* kTimeout = "timeout";               // request ran past its deadline
}  // namespace error_type

enum class Endpoint { Generate, GenerateStream, Completions, ChatCompletions };
std::string_view endpoint_name(Endpoint e);  // "generate", "generate_stream", "completions", "chat_completions"
bool is_openai(Endpoint e);

// What the parsers need to know about the served model.
struct ApiLimits {
  std::string model_name;       // the id /v1/models lists; OpenAI requests must name it
  int64_t max_context = 2048;   // positions the model attends to (prompt + generated)
  int64_t vocab_size = 0;       // token ids a request may name are in [0, vocab_size)
  int default_max_new_tokens = 100;  // TGI routes when max_new_tokens is absent
  int max_stop_sequences = 4;
  int max_stop_length = 256;    // bytes per stop string
  int max_n = 16;               // n and best_of
  int max_logprobs = 20;        // logprobs / top_logprobs / top_n_tokens
  // How chat requests are rendered; nullptr or a built-in format: render_chat_template (ChatML).
  std::shared_ptr<const ChatFormat> chat;
};

// One chat message after validation (content parts joined).
struct ChatMessage {
  std::string role;  // system, user, assistant, tool
  std::string content;
};

// A parsed generation request, before tokenization. Values are checked for type and range here;
// what depends on the prompt's length or the vocabulary is checked by resolve_request.
struct ApiRequest {
  Endpoint endpoint = Endpoint::Generate;
  bool stream = false;
  std::string prompt;                 // text to tokenize (chat: the rendered template)
  std::vector<TextRange> prompt_literal;  // chat: where message content lies in `prompt`; tokenized
                                          // without special tokens (ContentMarkers)
  std::vector<int64_t> prompt_ids;    // /v1/completions with a token-id prompt; then prompt is ""
  bool add_special_tokens = true;     // false for a prompt from a checkpoint's chat template (it
                                      // writes its own BOS, as in transformers' apply_chat_template)
  SamplingParams sampling;            // seed and logit_bias are set by resolve_request
  std::optional<uint64_t> seed;       // absent: a random one
  std::vector<std::pair<int64_t, float>> logit_bias;
  std::vector<std::string> stop;      // stop strings
  std::vector<int64_t> stop_token_ids;
  std::optional<int> max_new_tokens;  // absent: the route's default (see resolve_request)
  bool ignore_eos = false;            // extension (vLLM): keep generating past EOS
  int n = 1;                          // choices returned
  int best_of = 1;                    // sequences generated (>= n); the n of highest cumulative
                                      // logprob are returned
  bool logprobs = false;              // report each generated token's logprob
  int top_logprobs = 0;               // and this many alternatives per position
  bool prompt_logprobs = false;       // report the prompt tokens' logprobs (echo / decoder_input_details)
  bool details = false;               // TGI: return details
  bool decoder_input_details = false; // TGI: details.prefill
  bool return_full_text = false;      // TGI: prepend the prompt to generated_text
  bool echo = false;                  // OpenAI completions: prepend the prompt to the text
  bool include_usage = false;         // OpenAI streams: a final chunk with usage
  std::string model;                  // OpenAI: the model named by the request
  StructuredOutput structured;        // response_format / grammar / tools (server/structured_output.h)
};

// Parses and validates one request body for `endpoint` (/generate and /generate_stream differ only
// in `stream`). Throws ApiError (400, 404 or 422). Unknown fields are ignored, with one warning
// log line per field name for the life of the process (as vLLM does).
ApiRequest parse_request(Endpoint endpoint, std::string_view body, const ApiLimits& limits);

// The one place a request's limits are resolved: checks the tokenized prompt and every token id
// against the model, picks max_new_tokens (given: must fit the context; absent: the route's
// default — TGI ApiLimits::default_max_new_tokens, completions 16, chat the rest of the context —
// lowered to what the context leaves) and the seed (`random_seed` when the request gives none).
// The result satisfies GenerationRequest's invariants. Throws ApiError 422.
GenerationRequest resolve_request(const ApiRequest& request, std::vector<int32_t> prompt, const ApiLimits& limits,
                                  uint64_t random_seed);

// /tokenize and /detokenize (vLLM's shapes).
struct TokenizeRequest {
  std::string prompt;          // "prompt", or "messages" rendered with the chat template
  std::vector<TextRange> prompt_literal;  // messages: where their content lies in `prompt`
  bool add_special_tokens = true;
};
TokenizeRequest parse_tokenize(std::string_view body, const ApiLimits& limits);
std::vector<int32_t> parse_detokenize(std::string_view body, const ApiLimits& limits);

// The default chat template, ChatML-style (documented in docs/api.md):
//   <|im_start|>{role}\n{content}<|im_end|>\n   for every message, then
//   <|im_start|>assistant\n                      when add_generation_prompt.
std::string render_chat_template(const std::vector<ChatMessage>& messages, bool add_generation_prompt);
// The stop string chat requests get by default: the template's end of turn.
inline constexpr const char* kChatEndOfTurn = "<|im_end|>";

// OpenAI's finish_reason for an engine finish: "stop" (EOS token or stop string) or "length".
std::string_view openai_finish_reason(FinishReason reason);

}  // namespace fineserve
