#include "server/responses.h"

#include "models/tokenizer/tokenizer.h"
#include "server/sse.h"

namespace fineserve {

using json = nlohmann::json;

namespace {

// nlohmann::json throws on invalid UTF-8 by default; generated text is valid UTF-8 (the stop
// checker never splits a character), but a prompt echoed back may not be: replace, never throw.
std::string dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

}  // namespace

json error_body(Endpoint endpoint, const ApiError& error) {
  if (is_openai(endpoint))
    return {{"error", {{"message", error.what()}, {"type", error.type()}, {"param", nullptr}, {"code", error.status()}}}};
  return {{"error", error.what()}, {"error_type", error.type()}};
}

ResponseWriter::ResponseWriter(ResponseContext context) : ctx_(std::move(context)) {}

std::string ResponseWriter::content_type() const {
  // Chunked JSON bodies are marked with a charset on purpose: cpp-httplib gzips "application/json"
  // exactly (when the client accepts gzip), and a gzip stream holds back the small whitespace
  // writes the server uses to notice a client that went away (see http_server.cpp).
  return streaming() ? "text/event-stream" : "application/json; charset=utf-8";
}

json ResponseWriter::usage() const {
  const int completion = generated_tokens();
  return {{"prompt_tokens", ctx_.prompt_tokens}, {"completion_tokens", completion},
          {"total_tokens", ctx_.prompt_tokens + completion}};
}

json ResponseWriter::token_json(const TokenEvent& e) const {
  const bool special = ctx_.tokenizer && ctx_.tokenizer->is_special(e.token);
  return {{"id", e.token}, {"text", e.text}, {"logprob", e.logprob}, {"special", special}};
}

json ResponseWriter::tgi_details(FinishReason reason, bool with_tokens) const {
  json d = {{"finish_reason", finish_reason_name(reason)},
            {"generated_tokens", generated_tokens()},
            {"seed", ctx_.request.sampling.do_sample ? json(ctx_.seed) : json(nullptr)},
            {"input_length", ctx_.prompt_tokens}};
  if (with_tokens) {
    d["prefill"] = json::array();
    json toks = json::array();
    for (const TokenEvent& e : tokens_) toks.push_back(token_json(e));
    d["tokens"] = std::move(toks);
  }
  return d;
}

json ResponseWriter::openai_chunk(json choice) const {
  const bool chat = ctx_.request.endpoint == Endpoint::ChatCompletions;
  json c = {{"id", ctx_.id}, {"object", chat ? "chat.completion.chunk" : "text_completion"}, {"created", ctx_.created},
            {"model", ctx_.model_name}, {"choices", json::array({std::move(choice)})}};
  if (ctx_.request.include_usage) c["usage"] = nullptr;
  return c;
}

std::string ResponseWriter::on_events(const std::vector<TokenEvent>& events) {
  std::string out;
  for (const TokenEvent& e : events) {
    if (finished_) break;
    tokens_.push_back(e);
    text_ += e.text;
    if (e.finish) finished_ = true;
    if (streaming()) {
      out += on_event(e);
    } else if (e.finish) {
      out += final_body(*e.finish);
    }
  }
  return out;
}

std::string ResponseWriter::on_event(const TokenEvent& e) {
  const ApiRequest& r = ctx_.request;
  std::string out;
  switch (r.endpoint) {
    case Endpoint::Generate:
    case Endpoint::GenerateStream: {
      // TGI: one event per token; the last one also carries generated_text and details.
      json ev = {{"index", generated_tokens()}, {"token", token_json(e)}, {"generated_text", nullptr},
                 {"details", nullptr}, {"top_tokens", nullptr}};
      if (e.finish) {
        ev["generated_text"] = r.return_full_text ? ctx_.prompt_text + text_ : text_;
        ev["details"] = tgi_details(*e.finish, false);
      }
      out += sse_event(dump(ev));
      break;
    }
    case Endpoint::Completions: {
      std::string text = e.text;
      if (r.echo && !echo_sent_) {
        text = ctx_.prompt_text + text;
        echo_sent_ = true;
      }
      if (!text.empty() || e.finish) {
        json choice = {{"index", 0}, {"text", text}, {"logprobs", nullptr},
                       {"finish_reason", e.finish ? json(openai_finish_reason(*e.finish)) : json(nullptr)}};
        out += sse_event(dump(openai_chunk(std::move(choice))));
      }
      break;
    }
    case Endpoint::ChatCompletions: {
      if (!role_sent_) {
        json choice = {{"index", 0}, {"delta", {{"role", "assistant"}, {"content", ""}}}, {"logprobs", nullptr}, {"finish_reason", nullptr}};
        out += sse_event(dump(openai_chunk(std::move(choice))));
        role_sent_ = true;
      }
      // Tool calls: text that may be a call is held back and sent as tool_calls deltas at the end.
      if (r.structured.parses_tool_calls() && !tool_stream_) tool_stream_.emplace(r.structured.tool_format, "call_" + ctx_.id.substr(ctx_.id.find('-') + 1) + "_");
      ToolCallStream::End calls;
      std::string content = tool_stream_ ? tool_stream_->feed(e.text) : e.text;
      if (e.finish && tool_stream_) calls = tool_stream_->finish(), content += calls.content;
      if (!content.empty()) {
        json choice = {{"index", 0}, {"delta", {{"content", content}}}, {"logprobs", nullptr}, {"finish_reason", nullptr}};
        out += sse_event(dump(openai_chunk(std::move(choice))));
      }
      for (json& d : calls.deltas) out += sse_event(dump(openai_chunk({{"index", 0}, {"delta", std::move(d)}, {"logprobs", nullptr}, {"finish_reason", nullptr}})));
      if (e.finish) {
        json choice = {{"index", 0}, {"delta", json::object()}, {"logprobs", nullptr},
                       {"finish_reason", calls.has_calls ? "tool_calls" : openai_finish_reason(*e.finish)}};
        out += sse_event(dump(openai_chunk(std::move(choice))));
      }
      break;
    }
  }
  if (e.finish && is_openai(r.endpoint)) {
    if (r.include_usage) {
      const bool chat = r.endpoint == Endpoint::ChatCompletions;
      json c = {{"id", ctx_.id}, {"object", chat ? "chat.completion.chunk" : "text_completion"}, {"created", ctx_.created},
                {"model", ctx_.model_name}, {"choices", json::array()}, {"usage", usage()}};
      out += sse_event(dump(c));
    }
    out += sse_event("[DONE]");
  }
  return out;
}

std::string ResponseWriter::final_body(FinishReason reason) const {
  const ApiRequest& r = ctx_.request;
  json body;
  switch (r.endpoint) {
    case Endpoint::Generate:
    case Endpoint::GenerateStream:
      body = {{"generated_text", r.return_full_text ? ctx_.prompt_text + text_ : text_}};
      if (r.details) body["details"] = tgi_details(reason, true);
      break;
    case Endpoint::Completions:
      body = {{"id", ctx_.id}, {"object", "text_completion"}, {"created", ctx_.created}, {"model", ctx_.model_name},
              {"choices", json::array({{{"index", 0}, {"text", r.echo ? ctx_.prompt_text + text_ : text_},
                                        {"logprobs", nullptr}, {"finish_reason", openai_finish_reason(reason)}}})},
              {"usage", usage()}};
      break;
    case Endpoint::ChatCompletions: {
      json message = {{"role", "assistant"}, {"content", text_}};
      const bool calls = r.structured.parses_tool_calls() &&  // server/tool_calls.h
                         apply_tool_calls(message, text_, r.structured.tool_format, "call_" + ctx_.id.substr(ctx_.id.find('-') + 1) + "_");
      body = {{"id", ctx_.id}, {"object", "chat.completion"}, {"created", ctx_.created}, {"model", ctx_.model_name},
              {"choices", json::array({{{"index", 0}, {"message", message},
                                        {"logprobs", nullptr}, {"finish_reason", calls ? "tool_calls" : openai_finish_reason(reason)}}})},
              {"usage", usage()}};
      break;
    }
  }
  return dump(body);
}

std::string ResponseWriter::on_failure(const ApiError& error) {
  finished_ = true;
  const json body = error_body(ctx_.request.endpoint, error);
  if (!streaming()) return dump(body);
  std::string out = sse_event(dump(body));
  if (is_openai(ctx_.request.endpoint)) out += sse_event("[DONE]");
  return out;
}

}  // namespace fineserve
