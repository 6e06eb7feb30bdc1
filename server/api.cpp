#include "server/api.h"

#include <cmath>
#include <limits>
#include <set>

#include <nlohmann/json.hpp>

#include "kernels/base.h"
#include "server/chat_template.h"  // ChatML

namespace fineserve {
namespace {

using json = nlohmann::json;

[[noreturn]] void bad_request(const std::string& msg) { throw ApiError(400, error_type::kBadRequest, msg); }
[[noreturn]] void invalid(const std::string& msg) { throw ApiError(422, error_type::kValidation, msg); }

// Reads the fields of one JSON object, checking their types, and rejects fields nobody asked for.
// `where` prefixes messages ("parameters.top_k").
class Fields {
 public:
  Fields(const json& object, std::string where) : obj_(object), where_(std::move(where)) {
    if (!obj_.is_object()) bad_request(where_.empty() ? "the body must be a JSON object" : "'" + where_ + "' must be a JSON object");
  }

  std::string name(const std::string& key) const { return where_.empty() ? key : where_ + "." + key; }

  // The value of `key` when present and not null.
  const json* get(const std::string& key) {
    seen_.insert(key);
    auto it = obj_.find(key);
    if (it == obj_.end() || it->is_null()) return nullptr;
    return &*it;
  }

  std::optional<bool> boolean(const std::string& key) {
    const json* v = get(key);
    if (!v) return std::nullopt;
    if (!v->is_boolean()) bad_request("'" + name(key) + "' must be a boolean");
    return v->get<bool>();
  }

  std::optional<double> number(const std::string& key) {
    const json* v = get(key);
    if (!v) return std::nullopt;
    if (!v->is_number()) bad_request("'" + name(key) + "' must be a number");
    const double d = v->get<double>();
    if (!std::isfinite(d)) invalid("'" + name(key) + "' must be finite");
    return d;
  }

  // An integer in [lo, hi].
  std::optional<int64_t> integer(const std::string& key, int64_t lo, int64_t hi) {
    const json* v = get(key);
    if (!v) return std::nullopt;
    if (!v->is_number_integer()) bad_request("'" + name(key) + "' must be an integer");
    if (v->is_number_unsigned() && v->get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
      invalid("'" + name(key) + "' must be at most " + std::to_string(hi));
    const int64_t i = v->get<int64_t>();
    if (i < lo || i > hi)
      invalid("'" + name(key) + "' must be in [" + std::to_string(lo) + ", " + std::to_string(hi) + "], got " + std::to_string(i));
    return i;
  }

  std::optional<uint64_t> seed(const std::string& key) {
    const json* v = get(key);
    if (!v) return std::nullopt;
    if (!v->is_number_integer()) bad_request("'" + name(key) + "' must be an integer");
    if (!v->is_number_unsigned() && v->get<int64_t>() < 0) invalid("'" + name(key) + "' must be >= 0");
    return v->get<uint64_t>();
  }

  std::optional<std::string> string(const std::string& key) {
    const json* v = get(key);
    if (!v) return std::nullopt;
    if (!v->is_string()) bad_request("'" + name(key) + "' must be a string");
    return v->get<std::string>();
  }

  // A field FineServe does not implement: accepted only when absent, null or `neutral`.
  void unsupported(const std::string& key, const json& neutral = json()) {
    const json* v = get(key);
    if (v && *v != neutral) invalid("'" + name(key) + "' is not supported" + (neutral.is_null() ? "" : " (only " + neutral.dump() + ")"));
  }
  // Accepted and ignored (informational fields such as OpenAI's "user").
  void ignored(const std::string& key) { get(key); }

  // Every field must have been read: an unknown one is an error (typos must not pass silently).
  void reject_unknown() const {
    for (auto it = obj_.begin(); it != obj_.end(); ++it)
      if (!seen_.count(it.key())) invalid("unknown field '" + name(it.key()) + "'");
  }

 private:
  const json& obj_;
  std::string where_;
  std::set<std::string> seen_;
};

json parse_body(std::string_view body) {
  if (body.empty()) bad_request("the request body is empty; expected a JSON object");
  json j = json::parse(body.begin(), body.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) bad_request("the request body is not valid JSON");
  if (!j.is_object()) bad_request("the request body must be a JSON object");
  return j;
}

void read_stop_strings(const json& v, const std::string& name, const ApiLimits& limits, std::vector<std::string>& out) {
  auto add = [&](const json& s) {
    if (!s.is_string()) bad_request("'" + name + "' must be a string or an array of strings");
    std::string str = s.get<std::string>();
    if (str.empty()) invalid("'" + name + "' contains an empty stop string");
    if (static_cast<int>(str.size()) > limits.max_stop_length)
      invalid("'" + name + "': a stop string is longer than " + std::to_string(limits.max_stop_length) + " bytes");
    out.push_back(std::move(str));
  };
  if (v.is_string()) {
    add(v);
  } else if (v.is_array()) {
    for (const json& s : v) add(s);
  } else {
    bad_request("'" + name + "' must be a string or an array of strings");
  }
  if (static_cast<int>(out.size()) > limits.max_stop_sequences)
    invalid("'" + name + "' has " + std::to_string(out.size()) + " stop strings; at most " +
            std::to_string(limits.max_stop_sequences) + " are allowed");
}

// max_new_tokens / max_tokens: at least 1, and room for at least one prompt token.
void read_max_new_tokens(Fields& f, const std::string& key, const ApiLimits& limits, ApiRequest& r) {
  if (auto n = f.integer(key, 1, std::max<int64_t>(1, limits.max_context - 1))) {
    r.stop.max_new_tokens = static_cast<int>(*n);
    r.max_new_tokens_given = true;
  }
}

void finish_validation(ApiRequest& r) {
  try {
    r.sampling.validate();
    StopConditions probe = r.stop;
    if (!r.max_new_tokens_given) probe.max_new_tokens = 1;
    probe.validate();
  } catch (const Error& e) {
    invalid(e.what());
  }
}

// ---- TGI ----------------------------------------------------------------------------------------

ApiRequest parse_tgi(Endpoint endpoint, const json& body, const ApiLimits& limits) {
  ApiRequest r;
  r.endpoint = endpoint;
  r.stream = endpoint == Endpoint::GenerateStream;
  Fields top(body, "");
  const json* inputs = top.get("inputs");
  if (!inputs) invalid("'inputs' is required");
  if (!inputs->is_string()) bad_request("'inputs' must be a string");
  r.prompt = inputs->get<std::string>();
  if (r.prompt.empty()) invalid("'inputs' is empty");
  if (auto s = top.boolean("stream"); s && *s != r.stream)
    invalid(std::string("'stream' must be ") + (r.stream ? "true" : "false") + " on this route (use /" +
            (*s ? "generate_stream" : "generate") + ")");
  const json* params = top.get("parameters");
  top.reject_unknown();
  if (!params) {
    r.stop.max_new_tokens = limits.default_max_new_tokens;
    finish_validation(r);
    return r;
  }

  Fields p(*params, "parameters");
  read_max_new_tokens(p, "max_new_tokens", limits, r);
  if (!r.max_new_tokens_given) r.stop.max_new_tokens = limits.default_max_new_tokens;
  const auto temperature = p.number("temperature");
  const auto top_k = p.integer("top_k", 1, std::numeric_limits<int32_t>::max());
  const auto top_p = p.number("top_p");
  const auto do_sample = p.boolean("do_sample");
  if (temperature && *temperature <= 0) invalid("'parameters.temperature' must be > 0");
  if (top_p && (*top_p <= 0 || *top_p > 1)) invalid("'parameters.top_p' must be in (0, 1]");
  if (auto rp = p.number("repetition_penalty")) {
    if (*rp <= 0) invalid("'parameters.repetition_penalty' must be > 0");
    r.sampling.repetition_penalty = static_cast<float>(*rp);
  }
  // TGI samples when asked to, or when any sampling parameter moves away from its neutral value.
  r.sampling.do_sample = do_sample.value_or(false) || (temperature && *temperature != 1.0) || top_k ||
                         (top_p && *top_p < 1.0);
  if (temperature) r.sampling.temperature = static_cast<float>(*temperature);
  if (top_k) r.sampling.top_k = static_cast<int>(*top_k);
  if (top_p) r.sampling.top_p = static_cast<float>(*top_p);
  if (auto s = p.seed("seed")) {
    r.sampling.seed = *s;
    r.seed_given = true;
  }
  if (const json* stop = p.get("stop")) read_stop_strings(*stop, "parameters.stop", limits, r.stop.stop);
  r.details = p.boolean("details").value_or(false);
  r.decoder_input_details = p.boolean("decoder_input_details").value_or(false);
  r.return_full_text = p.boolean("return_full_text").value_or(false);
  r.ignore_eos = p.boolean("ignore_eos").value_or(false);
  p.unsupported("best_of", 1);
  p.unsupported("typical_p");
  p.unsupported("truncate");
  p.unsupported("watermark", false);
  p.unsupported("top_n_tokens", 0);
  p.unsupported("frequency_penalty", 0);
  p.ignored("grammar");  // read_structured_output
  p.unsupported("adapter_id");
  p.reject_unknown();
  finish_validation(r);
  return r;
}

// ---- OpenAI -------------------------------------------------------------------------------------

// The fields /v1/completions and /v1/chat/completions share.
void read_openai_common(Fields& f, const ApiLimits& limits, ApiRequest& r) {
  if (auto m = f.string("model")) {
    r.model = *m;
    if (r.model != limits.model_name)
      throw ApiError(404, error_type::kNotFound, "the model '" + r.model + "' does not exist; this server serves '" + limits.model_name + "'");
  }
  r.stream = f.boolean("stream").value_or(false);
  if (const json* so = f.get("stream_options")) {
    Fields s(*so, "stream_options");
    r.include_usage = s.boolean("include_usage").value_or(false);
    s.ignored("continuous_usage_stats");
    s.reject_unknown();
    if (!r.stream) invalid("'stream_options' is only allowed when 'stream' is true");
  }
  const auto temperature = f.number("temperature");
  if (temperature && (*temperature < 0 || *temperature > 2)) invalid("'temperature' must be in [0, 2]");
  // OpenAI samples unless the temperature is 0.
  r.sampling.temperature = static_cast<float>(temperature.value_or(1.0));
  r.sampling.do_sample = r.sampling.temperature > 0;
  if (auto top_p = f.number("top_p")) {
    if (*top_p <= 0 || *top_p > 1) invalid("'top_p' must be in (0, 1]");
    r.sampling.top_p = static_cast<float>(*top_p);
  }
  // vLLM's extensions: top_k (-1 or 0 = off), repetition_penalty, ignore_eos.
  if (auto top_k = f.integer("top_k", -1, std::numeric_limits<int32_t>::max())) r.sampling.top_k = static_cast<int>(std::max<int64_t>(0, *top_k));
  if (auto rp = f.number("repetition_penalty")) {
    if (*rp <= 0) invalid("'repetition_penalty' must be > 0");
    r.sampling.repetition_penalty = static_cast<float>(*rp);
  }
  r.ignore_eos = f.boolean("ignore_eos").value_or(false);
  if (auto s = f.seed("seed")) {
    r.sampling.seed = *s;
    r.seed_given = true;
  }
  if (const json* stop = f.get("stop")) read_stop_strings(*stop, "stop", limits, r.stop.stop);
  f.integer("n", 1, 1);
  f.unsupported("presence_penalty", 0);
  f.unsupported("frequency_penalty", 0);
  if (const json* lb = f.get("logit_bias"); lb && !(lb->is_object() && lb->empty())) invalid("'logit_bias' is not supported");
  f.ignored("user");
}

// A completions prompt: a string, an array of one string, an array of token ids, or an array of
// one array of token ids (batches of prompts are not supported: send one request per prompt).
void read_completion_prompt(const json& v, ApiRequest& r) {
  auto ids_from = [&](const json& arr) {
    for (const json& t : arr) {
      if (!t.is_number_integer()) bad_request("'prompt' must be a string or an array of token ids");
      if (t.is_number_unsigned() ? t.get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int32_t>::max())
                                 : (t.get<int64_t>() < 0 || t.get<int64_t>() > std::numeric_limits<int32_t>::max()))
        invalid("'prompt' has a token id out of range");
      r.prompt_ids.push_back(static_cast<int32_t>(t.get<int64_t>()));
    }
  };
  if (v.is_string()) {
    r.prompt = v.get<std::string>();
  } else if (v.is_array() && !v.empty() && v[0].is_string()) {
    if (v.size() != 1) invalid("'prompt': batches of prompts are not supported; send one request per prompt");
    r.prompt = v[0].get<std::string>();
  } else if (v.is_array() && !v.empty() && v[0].is_array()) {
    if (v.size() != 1) invalid("'prompt': batches of prompts are not supported; send one request per prompt");
    ids_from(v[0]);
    if (r.prompt_ids.empty()) invalid("'prompt' is empty");
  } else if (v.is_array()) {
    ids_from(v);
  } else {
    bad_request("'prompt' must be a string, an array of one string, or an array of token ids");
  }
  if (r.prompt.empty() && r.prompt_ids.empty()) invalid("'prompt' is empty");
}

ApiRequest parse_completions(const json& body, const ApiLimits& limits) {
  ApiRequest r;
  r.endpoint = Endpoint::Completions;
  Fields f(body, "");
  const json* prompt = f.get("prompt");
  if (!prompt) invalid("'prompt' is required");
  read_completion_prompt(*prompt, r);
  read_openai_common(f, limits, r);
  read_max_new_tokens(f, "max_tokens", limits, r);
  if (!r.max_new_tokens_given) r.stop.max_new_tokens = 16;  // OpenAI's default for completions
  r.echo = f.boolean("echo").value_or(false);
  f.unsupported("logprobs");
  f.unsupported("best_of", 1);
  f.unsupported("suffix");
  f.ignored("response_format");  // read_structured_output
  f.reject_unknown();
  finish_validation(r);
  return r;
}

ChatMessage read_message(const json& m, size_t index) {
  const std::string where = "messages[" + std::to_string(index) + "]";
  Fields f(m, where);
  ChatMessage msg;
  auto role = f.string("role");
  if (!role) invalid("'" + where + ".role' is required");
  static const std::set<std::string> roles = {"system", "developer", "user", "assistant", "tool"};
  if (!roles.count(*role)) invalid("'" + where + ".role' must be one of system, developer, user, assistant, tool");
  msg.role = *role == "developer" ? "system" : *role;
  if (const json* c = f.get("content")) {
    if (c->is_string()) {
      msg.content = c->get<std::string>();
    } else if (c->is_array()) {
      for (size_t i = 0; i < c->size(); ++i) {
        Fields part((*c)[i], where + ".content[" + std::to_string(i) + "]");
        auto type = part.string("type");
        if (!type || *type != "text") invalid("'" + where + ".content[" + std::to_string(i) + "].type' must be \"text\" (only text is supported)");
        auto text = part.string("text");
        if (!text) invalid("'" + where + ".content[" + std::to_string(i) + "].text' is required");
        part.reject_unknown();
        msg.content += *text;
      }
    } else {
      bad_request("'" + where + ".content' must be a string or an array of text parts");
    }
  } else if (msg.role != "assistant") {
    invalid("'" + where + ".content' is required");
  }
  f.ignored("name");
  f.ignored("tool_call_id");
  f.ignored("tool_calls");  // rendered by read_structured_output
  f.reject_unknown();
  return msg;
}

ApiRequest parse_chat(const json& body, const ApiLimits& limits) {
  ApiRequest r;
  r.endpoint = Endpoint::ChatCompletions;
  Fields f(body, "");
  const json* messages = f.get("messages");
  if (!messages) invalid("'messages' is required");
  if (!messages->is_array()) bad_request("'messages' must be an array");
  if (messages->empty()) invalid("'messages' is empty");
  std::vector<ChatMessage> msgs;
  for (size_t i = 0; i < messages->size(); ++i) msgs.push_back(read_message((*messages)[i], i));
  read_openai_common(f, limits, r);
  read_max_new_tokens(f, "max_tokens", limits, r);
  if (!r.max_new_tokens_given) read_max_new_tokens(f, "max_completion_tokens", limits, r);
  else f.ignored("max_completion_tokens");
  if (!r.max_new_tokens_given) r.stop.max_new_tokens = 0;  // the rest of the context (vLLM's default)
  if (f.boolean("logprobs").value_or(false)) invalid("'logprobs' is not supported");
  f.unsupported("top_logprobs", 0);
  for (const char* k : {"response_format", "tools", "tool_choice"}) f.ignored(k);  // read_structured_output
  f.ignored("parallel_tool_calls");
  f.reject_unknown();
  if (limits.chat && !limits.chat->builtin()) {
    nlohmann::ordered_json conversation = nlohmann::ordered_json::array();
    for (const ChatMessage& m : msgs) conversation.push_back({{"role", m.role}, {"content", m.content}});
    try {
      r.prompt = limits.chat->render(conversation, /*add_generation_prompt=*/true);
    } catch (const ChatTemplateError& e) {  // raise_exception, or a conversation the template cannot take
      invalid(std::string("the model's chat template rejected the conversation: ") + e.what());
    }
    for (const std::string& s : limits.chat->stop) r.stop.stop.push_back(s);
    r.add_special_tokens = false;
  } else {
    r.prompt = render_chat_template(msgs, /*add_generation_prompt=*/true);
    r.stop.stop.push_back(kChatEndOfTurn);
  }
  finish_validation(r);
  return r;
}

}  // namespace

std::string_view endpoint_name(Endpoint e) {
  switch (e) {
    case Endpoint::Generate: return "generate";
    case Endpoint::GenerateStream: return "generate_stream";
    case Endpoint::Completions: return "completions";
    case Endpoint::ChatCompletions: return "chat_completions";
  }
  return "unknown";
}

bool is_openai(Endpoint e) { return e == Endpoint::Completions || e == Endpoint::ChatCompletions; }

ApiRequest parse_request(Endpoint endpoint, std::string_view body, const ApiLimits& limits) {
  const json j = parse_body(body);
  ApiRequest r = endpoint == Endpoint::Completions       ? parse_completions(j, limits)
                 : endpoint == Endpoint::ChatCompletions ? parse_chat(j, limits)
                                                         : parse_tgi(endpoint, j, limits);
  read_structured_output(r, body, limits);  // response_format, grammar, tools (server/structured_output.h)
  return r;
}

std::string render_chat_template(const std::vector<ChatMessage>& messages, bool add_generation_prompt) {
  std::string out;
  for (const ChatMessage& m : messages) out += chatml_turn(m.role, m.content);
  if (add_generation_prompt) out += kChatmlGenerationPrompt;
  return out;
}

std::string_view openai_finish_reason(FinishReason reason) {
  return reason == FinishReason::Length ? "length" : "stop";
}

}  // namespace fineserve
