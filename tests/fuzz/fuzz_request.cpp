// libFuzzer target: the HTTP API's request parsers and response writers, and the SSE parser.
// Input: one byte choosing the route, then the request body. Checked on every input:
//   - parse_request either accepts the body or throws ApiError with a 4xx status (400, 404, 422);
//   - an accepted request is internally valid (sampling and stop conditions validate, stop
//     strings within the limits, a chat prompt ends with the assistant's turn);
//   - the response writer turns tokens with arbitrary bytes as text (invalid UTF-8 included) into
//     valid JSON bodies or SSE events whose data is valid JSON (or [DONE]);
//   - the SSE parser survives the raw bytes.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "kernels/base.h"
#include "server/api.h"
#include "server/responses.h"
#include "server/sse.h"

namespace {

using fineserve::ApiError;
using fineserve::Endpoint;

void check(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "fuzz_request: %s\n", what);
    std::abort();
  }
}

void check_json(const std::string& s) {
  check(nlohmann::json::accept(s), "the response is not valid JSON");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const Endpoint endpoints[] = {Endpoint::Generate, Endpoint::GenerateStream, Endpoint::Completions, Endpoint::ChatCompletions};
  const Endpoint endpoint = endpoints[data[0] % 4];
  const std::string_view body(reinterpret_cast<const char*>(data + 1), size - 1);

  fineserve::SseParser sse;
  sse.feed(body);

  fineserve::ApiLimits limits;
  limits.model_name = "fuzz";
  limits.max_context = 64;
  limits.vocab_size = 1000;
  fineserve::ApiRequest r;
  fineserve::GenerationRequest g;
  try {
    r = fineserve::parse_request(endpoint, body, limits);
    g = fineserve::resolve_request(r, std::vector<int32_t>(3, 1), limits, 0);
  } catch (const ApiError& e) {
    check(e.status() == 400 || e.status() == 404 || e.status() == 422, "unexpected status");
    return 0;
  }
  // The resolved request holds GenerationRequest's invariants (the engine asserts them).
  g.sampling.validate();
  g.stop.validate();
  check(static_cast<int>(r.stop.size()) <= limits.max_stop_sequences + (endpoint == Endpoint::ChatCompletions ? 1 : 0),
        "too many stop strings");
  check(!g.prompt.empty(), "empty prompt accepted");
  for (int32_t t : g.prompt) check(t >= 0 && t < limits.vocab_size, "prompt token outside the vocabulary");
  for (const auto& b : g.sampling.logit_bias) check(b.first >= 0 && b.first < limits.vocab_size, "logit_bias outside the vocabulary");
  check(g.stop.max_new_tokens >= 0 && static_cast<int64_t>(g.prompt.size()) + g.stop.max_new_tokens <= limits.max_context,
        "max_new_tokens out of range");
  check(g.n >= 1 && g.n <= limits.max_n && r.n <= g.n, "n out of range");
  if (endpoint == Endpoint::ChatCompletions) {
    const std::string tail = "<|im_start|>assistant\n";
    check(r.prompt.size() >= tail.size() && r.prompt.compare(r.prompt.size() - tail.size(), tail.size(), tail) == 0,
          "chat prompt does not end with the assistant turn");
  }

  // Responses: three tokens whose texts are slices of the input (any bytes), the last finishing.
  fineserve::ResponseContext ctx;
  ctx.request = r;
  ctx.prompt_text = std::string(body.substr(0, body.size() / 3));
  ctx.prompt_tokens = 3;
  ctx.model_name = "fuzz";
  ctx.id = "cmpl-fuzz";
  ctx.prompt_ids = g.prompt;
  fineserve::ResponseWriter writer(ctx);
  std::vector<fineserve::TokenEvent> events;
  for (int choice = 0; choice < g.n; ++choice)
    for (size_t i = 0; i < 3; ++i) {
      fineserve::TokenEvent e;
      e.request_id = 1;
      e.choice = choice;
      e.token = static_cast<int32_t>(i);
      e.text = std::string(body.substr(i * body.size() / 3, body.size() / 3));
      if (i == 2) e.finish = static_cast<fineserve::FinishReason>(data[0] / 4 % 3);
      events.push_back(std::move(e));
    }
  const std::string out = writer.on_events(events);
  check(writer.finished(), "the finishing token did not finish the response");
  if (!writer.streaming()) {
    check_json(out);
  } else {
    fineserve::SseParser parser;
    const auto parsed = parser.feed(out);
    check(!parsed.empty(), "a stream without events");
    for (const auto& e : parsed)
      if (e.data != "[DONE]") check_json(e.data);
  }
  fineserve::ResponseWriter failing(ctx);
  const std::string err = failing.on_failure(ApiError(504, "timeout", std::string(body.substr(0, 16))));
  if (!failing.streaming()) check_json(err);
  return 0;
}
