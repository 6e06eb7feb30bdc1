#include "server/responses.h"

#include <algorithm>
#include <numeric>

#include "models/tokenizer/tokenizer.h"
#include "models/tokenizer/utf8.h"
#include "server/sse.h"

namespace fineserve {

using json = nlohmann::json;

namespace {

// nlohmann::json throws on invalid UTF-8 by default; generated text is valid UTF-8 (the stop
// checker never splits a character), but a prompt echoed back or one token's bytes may not be:
// replace, never throw.
std::string dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

}  // namespace

json error_body(Endpoint endpoint, const ApiError& error) {
  if (is_openai(endpoint))
    return {{"error", {{"message", error.what()}, {"type", error.type()}, {"param", nullptr}, {"code", error.status()}}}};
  return {{"error", error.what()}, {"error_type", error.type()}};
}

ResponseWriter::ResponseWriter(ResponseContext context) : ctx_(std::move(context)) {
  choices_.resize(static_cast<size_t>(std::max(1, ctx_.request.best_of)));
  unfinished_ = static_cast<int>(choices_.size());
}

std::string ResponseWriter::content_type() const {
  // Chunked JSON bodies are marked with a charset on purpose: cpp-httplib gzips "application/json"
  // exactly (when the client accepts gzip), and a gzip stream holds back the small whitespace
  // writes the server uses to notice a client that went away (see http_server.cpp).
  return streaming() ? "text/event-stream" : "application/json; charset=utf-8";
}

int ResponseWriter::generated_tokens() const {
  int n = 0;
  for (const Choice& c : choices_) n += static_cast<int>(c.tokens.size());
  return n;
}

json ResponseWriter::usage() const {
  // As OpenAI bills: the prompt once, the tokens of every sequence generated (best_of included).
  const int completion = generated_tokens();
  return {{"prompt_tokens", ctx_.prompt_tokens}, {"completion_tokens", completion},
          {"total_tokens", ctx_.prompt_tokens + completion},
          {"prompt_tokens_details", {{"cached_tokens", cached_tokens_}}}};
}

// The text of one token alone, as logprobs report it. Bytes that are not valid UTF-8 on their own
// (part of a character) are written "bytes:\xNN..." as OpenAI does.
std::string ResponseWriter::token_string(int32_t token) const {
  if (!ctx_.tokenizer) return std::to_string(token);
  std::string bytes;
  ctx_.tokenizer->append_token_bytes(token, /*skip_special_tokens=*/false, /*at_start=*/false, bytes);
  if (utf8::is_valid(bytes)) return bytes;
  std::string out = "bytes:";
  static const char* hex = "0123456789abcdef";
  for (unsigned char c : bytes) {
    out += "\\x";
    out += hex[c >> 4];
    out += hex[c & 15];
  }
  return out;
}

// ---- TGI ----------------------------------------------------------------------------------------

json ResponseWriter::tgi_token(const TokenEvent& e) const {
  const bool special = ctx_.tokenizer && ctx_.tokenizer->is_special(e.token);
  return {{"id", e.token}, {"text", e.text}, {"logprob", e.logprob}, {"special", special}};
}

json ResponseWriter::tgi_top_tokens(const std::vector<TokenLogprob>& top) const {
  json out = json::array();
  for (const TokenLogprob& t : top)
    out.push_back({{"id", t.token}, {"text", token_string(t.token)}, {"logprob", t.logprob},
                   {"special", ctx_.tokenizer && ctx_.tokenizer->is_special(t.token)}});
  return out;
}

json ResponseWriter::tgi_prefill() const {
  json prefill = json::array();
  if (!ctx_.request.decoder_input_details) return prefill;
  for (size_t i = 0; i < ctx_.prompt_ids.size(); ++i) {
    const int32_t id = ctx_.prompt_ids[i];
    json lp = i == 0 || i - 1 >= prompt_logprobs_.size() ? json(nullptr) : json(prompt_logprobs_[i - 1].logprob);
    prefill.push_back({{"id", id}, {"text", token_string(id)}, {"logprob", lp}});
  }
  return prefill;
}

json ResponseWriter::tgi_details(const Choice& c, bool with_tokens) const {
  const auto index = static_cast<uint64_t>(&c - choices_.data());
  json d = {{"finish_reason", finish_reason_name(c.finish.value_or(FinishReason::Length))},
            {"generated_tokens", c.tokens.size()},
            {"seed", ctx_.request.sampling.do_sample ? json(ctx_.seed + index) : json(nullptr)},
            {"input_length", ctx_.prompt_tokens}};
  if (with_tokens) {
    d["prefill"] = tgi_prefill();
    json toks = json::array();
    for (const TokenEvent& e : c.tokens) toks.push_back(tgi_token(e));
    d["tokens"] = std::move(toks);
    if (ctx_.request.top_logprobs > 0) {
      json top = json::array();
      for (const TokenEvent& e : c.tokens) top.push_back(tgi_top_tokens(e.top));
      d["top_tokens"] = std::move(top);
    }
  }
  return d;
}

// ---- OpenAI -------------------------------------------------------------------------------------

json ResponseWriter::completion_logprobs(const std::vector<TokenEvent>& tokens, bool with_prompt, size_t offset) const {
  json lp = {{"tokens", json::array()}, {"token_logprobs", json::array()}, {"top_logprobs", json::array()},
             {"text_offset", json::array()}};
  const auto add = [&](int32_t token, json logprob, const std::vector<TokenLogprob>* top) {
    std::string s = token_string(token);
    json alternatives = nullptr;
    if (top) {
      alternatives = json::object();
      // The chosen token is listed with the alternatives, as vLLM does (OpenAI: "up to logprobs+1").
      if (!logprob.is_null()) alternatives[s] = logprob;
      for (const TokenLogprob& t : *top) alternatives[token_string(t.token)] = t.logprob;
    }
    lp["text_offset"].push_back(offset);
    offset += s.size();
    lp["tokens"].push_back(std::move(s));
    lp["token_logprobs"].push_back(std::move(logprob));
    lp["top_logprobs"].push_back(std::move(alternatives));
  };
  if (with_prompt) {
    for (size_t i = 0; i < ctx_.prompt_ids.size(); ++i) {
      if (i == 0 || i - 1 >= prompt_logprobs_.size()) {
        add(ctx_.prompt_ids[i], nullptr, nullptr);  // the first token has no context: null, as OpenAI
      } else {
        const PositionLogprobs& p = prompt_logprobs_[i - 1];
        add(p.token, p.logprob, &p.top);
      }
    }
  }
  for (const TokenEvent& e : tokens) add(e.token, e.logprob, &e.top);
  return lp;
}

json ResponseWriter::chat_logprobs(const std::vector<TokenEvent>& tokens) const {
  const auto entry = [&](int32_t token, float logprob) {
    const std::string s = token_string(token);
    std::string raw;
    if (ctx_.tokenizer) ctx_.tokenizer->append_token_bytes(token, false, false, raw);
    json bytes = json::array();
    for (unsigned char c : raw) bytes.push_back(static_cast<int>(c));
    return json{{"token", s}, {"logprob", logprob}, {"bytes", std::move(bytes)}};
  };
  json content = json::array();
  for (const TokenEvent& e : tokens) {
    json item = entry(e.token, e.logprob);
    json top = json::array();
    for (const TokenLogprob& t : e.top) top.push_back(entry(t.token, t.logprob));
    item["top_logprobs"] = std::move(top);
    content.push_back(std::move(item));
  }
  return {{"content", std::move(content)}};
}

json ResponseWriter::openai_chunk(json choice) const {
  const bool chat = ctx_.request.endpoint == Endpoint::ChatCompletions;
  json c = {{"id", ctx_.id}, {"object", chat ? "chat.completion.chunk" : "text_completion"}, {"created", ctx_.created},
            {"model", ctx_.model_name}, {"choices", json::array({std::move(choice)})}};
  if (ctx_.request.include_usage) c["usage"] = nullptr;
  return c;
}

// ---- events -------------------------------------------------------------------------------------

std::string ResponseWriter::on_events(const std::vector<TokenEvent>& events) {
  std::string out;
  for (const TokenEvent& e : events) {
    if (finished_) break;
    if (!e.prompt_logprobs.empty()) prompt_logprobs_ = e.prompt_logprobs;
    // The prompt is counted once (choice 0 prefills it; the other choices reuse its blocks).
    if (e.choice == 0) cached_tokens_ = std::max(cached_tokens_, e.cached_tokens);
    Choice& c = choices_.at(static_cast<size_t>(e.choice));
    if (c.finish) continue;
    if (e.token >= 0) {
      c.tokens.push_back(e);
      c.cumulative_logprob += e.logprob;
    }
    c.text += e.text;
    if (e.finish) {
      c.finish = e.finish;
      finished_ = --unfinished_ == 0;
    }
    if (streaming()) out += on_event(e);
    else if (finished_) out += final_body();
  }
  return out;
}

std::string ResponseWriter::on_event(const TokenEvent& e) {
  const ApiRequest& r = ctx_.request;
  Choice& c = choices_.at(static_cast<size_t>(e.choice));
  std::string out;
  switch (r.endpoint) {
    case Endpoint::Generate:
    case Endpoint::GenerateStream: {
      // TGI: one event per token; the last one also carries generated_text and details.
      if (e.token < 0) break;
      json ev = {{"index", c.tokens.size()}, {"token", tgi_token(e)}, {"generated_text", nullptr},
                 {"details", nullptr}, {"top_tokens", r.top_logprobs > 0 ? tgi_top_tokens(e.top) : json(nullptr)}};
      if (e.finish) {
        ev["generated_text"] = r.return_full_text ? ctx_.prompt_text + c.text : c.text;
        ev["details"] = tgi_details(c, false);
      }
      out += sse_event(dump(ev));
      break;
    }
    case Endpoint::Completions: {
      std::string text = e.text;
      const bool first = r.echo && !c.echo_sent;
      if (first) {
        text = ctx_.prompt_text + text;
        c.echo_sent = true;
      }
      if (!text.empty() || e.finish || r.logprobs) {
        json lp = nullptr;
        if (r.logprobs) {
          std::vector<TokenEvent> one;
          if (e.token >= 0) one.push_back(e);
          const size_t offset = first ? 0 : ctx_.prompt_text.size() + c.text.size() - e.text.size();
          lp = completion_logprobs(one, first && r.prompt_logprobs, offset);
        }
        json choice = {{"index", e.choice}, {"text", text}, {"logprobs", std::move(lp)},
                       {"finish_reason", e.finish ? json(openai_finish_reason(*e.finish)) : json(nullptr)}};
        out += sse_event(dump(openai_chunk(std::move(choice))));
      }
      break;
    }
    case Endpoint::ChatCompletions: {
      if (!c.role_sent) {
        json choice = {{"index", e.choice}, {"delta", {{"role", "assistant"}, {"content", ""}}}, {"logprobs", nullptr}, {"finish_reason", nullptr}};
        out += sse_event(dump(openai_chunk(std::move(choice))));
        c.role_sent = true;
      }
      // Tool calls: text that may be a call is held back and sent as tool_calls deltas as it grows.
      if (r.structured.parses_tool_calls() && !c.tool_stream)
        c.tool_stream.emplace(r.structured.tool_format, "call_" + ctx_.id.substr(ctx_.id.find('-') + 1) + "_");
      ToolCallStream::Update calls = c.tool_stream ? c.tool_stream->feed(e.text, e.finish.has_value()) : ToolCallStream::Update{e.text, {}, false};
      std::string content = std::move(calls.content);
      if (!content.empty() || (r.logprobs && e.token >= 0)) {
        json lp = nullptr;
        if (r.logprobs && e.token >= 0) lp = chat_logprobs({e});
        json choice = {{"index", e.choice}, {"delta", {{"content", content}}}, {"logprobs", std::move(lp)}, {"finish_reason", nullptr}};
        out += sse_event(dump(openai_chunk(std::move(choice))));
      }
      for (json& d : calls.deltas)
        out += sse_event(dump(openai_chunk({{"index", e.choice}, {"delta", std::move(d)}, {"logprobs", nullptr}, {"finish_reason", nullptr}})));
      if (e.finish) {
        json choice = {{"index", e.choice}, {"delta", json::object()}, {"logprobs", nullptr},
                       {"finish_reason", calls.has_calls ? "tool_calls" : openai_finish_reason(*e.finish)}};
        out += sse_event(dump(openai_chunk(std::move(choice))));
      }
      break;
    }
  }
  if (finished_ && is_openai(r.endpoint)) {
    if (r.include_usage) {
      const bool chat = r.endpoint == Endpoint::ChatCompletions;
      json u = {{"id", ctx_.id}, {"object", chat ? "chat.completion.chunk" : "text_completion"}, {"created", ctx_.created},
                {"model", ctx_.model_name}, {"choices", json::array()}, {"usage", usage()}};
      out += sse_event(dump(u));
    }
    out += sse_event("[DONE]");
  }
  return out;
}

std::vector<int> ResponseWriter::returned_choices() const {
  std::vector<int> order(choices_.size());
  std::iota(order.begin(), order.end(), 0);
  if (ctx_.request.best_of > ctx_.request.n) {
    // Highest cumulative logprob first (ties: the lower index), as OpenAI's best_of and TGI's.
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
      return choices_[static_cast<size_t>(a)].cumulative_logprob > choices_[static_cast<size_t>(b)].cumulative_logprob;
    });
  }
  order.resize(static_cast<size_t>(std::min<int>(static_cast<int>(order.size()), std::max(1, ctx_.request.n))));
  return order;
}

std::string ResponseWriter::final_body() const {
  const ApiRequest& r = ctx_.request;
  json body;
  switch (r.endpoint) {
    case Endpoint::Generate:
    case Endpoint::GenerateStream: {
      // TGI's best_of: the most likely sequence, the others in details.best_of_sequences.
      std::vector<int> order(choices_.size());
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
        return choices_[static_cast<size_t>(a)].cumulative_logprob > choices_[static_cast<size_t>(b)].cumulative_logprob;
      });
      const auto full = [&](const Choice& c) { return r.return_full_text ? ctx_.prompt_text + c.text : c.text; };
      const Choice& best = choices_[static_cast<size_t>(order[0])];
      body = {{"generated_text", full(best)}};
      if (r.details) {
        body["details"] = tgi_details(best, true);
        if (choices_.size() > 1) {
          json others = json::array();
          for (size_t i = 1; i < order.size(); ++i) {
            const Choice& c = choices_[static_cast<size_t>(order[i])];
            json d = tgi_details(c, true);
            d["generated_text"] = full(c);
            others.push_back(std::move(d));
          }
          body["details"]["best_of_sequences"] = std::move(others);
        }
      }
      if (ctx_.tgi_root) body = json::array({std::move(body)});
      break;
    }
    case Endpoint::Completions: {
      json choices = json::array();
      int index = 0;
      for (int i : returned_choices()) {
        const Choice& c = choices_[static_cast<size_t>(i)];
        json lp = r.logprobs ? completion_logprobs(c.tokens, r.prompt_logprobs, r.echo ? 0 : ctx_.prompt_text.size()) : json(nullptr);
        choices.push_back({{"index", index++}, {"text", r.echo ? ctx_.prompt_text + c.text : c.text}, {"logprobs", std::move(lp)},
                           {"finish_reason", openai_finish_reason(c.finish.value_or(FinishReason::Length))}});
      }
      body = {{"id", ctx_.id}, {"object", "text_completion"}, {"created", ctx_.created}, {"model", ctx_.model_name},
              {"choices", std::move(choices)}, {"usage", usage()}};
      break;
    }
    case Endpoint::ChatCompletions: {
      json choices = json::array();
      int index = 0;
      for (int i : returned_choices()) {
        const Choice& c = choices_[static_cast<size_t>(i)];
        json message = {{"role", "assistant"}, {"content", c.text}};
        const bool calls = r.structured.parses_tool_calls() &&  // server/tool_calls.h
                           apply_tool_calls(message, c.text, r.structured.tool_format, "call_" + ctx_.id.substr(ctx_.id.find('-') + 1) + "_");
        choices.push_back({{"index", index++}, {"message", std::move(message)},
                           {"logprobs", r.logprobs ? chat_logprobs(c.tokens) : json(nullptr)},
                           {"finish_reason", calls ? "tool_calls" : openai_finish_reason(c.finish.value_or(FinishReason::Length))}});
      }
      body = {{"id", ctx_.id}, {"object", "chat.completion"}, {"created", ctx_.created}, {"model", ctx_.model_name},
              {"choices", std::move(choices)}, {"usage", usage()}};
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
