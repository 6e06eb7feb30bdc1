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
  fineserve::ApiRequest r;
  try {
    r = fineserve::parse_request(endpoint, body, limits);
  } catch (const ApiError& e) {
    check(e.status() == 400 || e.status() == 404 || e.status() == 422, "unexpected status");
    return 0;
  }
  r.sampling.validate();
  fineserve::StopConditions stop = r.stop;
  if (stop.max_new_tokens < 1) stop.max_new_tokens = 1;
  stop.validate();
  check(static_cast<int>(r.stop.stop.size()) <= limits.max_stop_sequences + (endpoint == Endpoint::ChatCompletions ? 1 : 0),
        "too many stop strings");
  check(!r.prompt.empty() || !r.prompt_ids.empty(), "empty prompt accepted");
  check(r.stop.max_new_tokens >= 0, "negative max_new_tokens");
  check(!r.max_new_tokens_given || (r.stop.max_new_tokens >= 1 && r.stop.max_new_tokens < limits.max_context),
        "max_new_tokens out of range");
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
  fineserve::ResponseWriter writer(ctx);
  std::vector<fineserve::TokenEvent> events(3);
  for (size_t i = 0; i < events.size(); ++i) {
    events[i].request_id = 1;
    events[i].token = static_cast<int32_t>(i);
    events[i].text = std::string(body.substr(i * body.size() / 3, body.size() / 3));
  }
  events.back().finish = static_cast<fineserve::FinishReason>(data[0] / 4 % 3);
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
