#include "server/api.h"

#include <cmath>
#include <limits>
#include <mutex>
#include <regex>
#include <set>

#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

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

  // Fields nobody read are ignored, as vLLM and TGI ignore them, with one warning per field name
  // for the life of the process (a typo shows in the log without flooding it).
  void warn_unknown() const {
    for (auto it = obj_.begin(); it != obj_.end(); ++it)
      if (!seen_.count(it.key())) warn_ignored_field(name(it.key()));
  }

  static void warn_ignored_field(const std::string& field) {
    static const std::regex index(R"(\[[0-9]+\])");
    const std::string key = std::regex_replace(field, index, "[]");  // messages[3].x -> messages[].x
    static std::mutex mu;
    static std::set<std::string> warned;
    std::lock_guard lk(mu);
    if (warned.size() < 1024 && warned.insert(key).second)
      spdlog::warn("ignoring the unknown request field '{}' (logged once)", key);
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

// A token id as JSON: a non-negative integer that fits int32 (the vocabulary is checked by
// resolve_request, which knows it).
int64_t token_id(const json& v, const std::string& what) {
  if (!v.is_number_integer()) bad_request("'" + what + "' must hold integer token ids");
  if (v.is_number_unsigned() ? v.get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int32_t>::max())
                             : (v.get<int64_t>() < 0 || v.get<int64_t>() > std::numeric_limits<int32_t>::max()))
    invalid("'" + what + "' has a token id out of range: " + v.dump());
  return v.get<int64_t>();
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

// max_new_tokens / max_tokens: 0 (prompt scoring, where `zero_ok`) or more; whether it fits the
// context is resolve_request's to check.
void read_max_new_tokens(Fields& f, const std::string& key, bool zero_ok, ApiRequest& r) {
  if (auto n = f.integer(key, zero_ok ? 0 : 1, std::numeric_limits<int32_t>::max())) r.max_new_tokens = static_cast<int>(*n);
}

// Extensions every route accepts (vLLM's names): penalties, logit_bias, min_tokens,
// stop_token_ids, ignore_eos.
void read_sampling_extensions(Fields& f, ApiRequest& r) {
  if (auto v = f.number("presence_penalty")) {
    if (*v < -2 || *v > 2) invalid("'" + f.name("presence_penalty") + "' must be in [-2, 2]");
    r.sampling.presence_penalty = static_cast<float>(*v);
  }
  if (auto v = f.number("frequency_penalty")) {
    if (*v < -2 || *v > 2) invalid("'" + f.name("frequency_penalty") + "' must be in [-2, 2]");
    r.sampling.frequency_penalty = static_cast<float>(*v);
  }
  if (const json* lb = f.get("logit_bias")) {
    const std::string what = f.name("logit_bias");
    if (!lb->is_object()) bad_request("'" + what + "' must be an object mapping token ids to biases");
    if (lb->size() > 1024) invalid("'" + what + "' has more than 1024 entries");
    for (auto it = lb->begin(); it != lb->end(); ++it) {
      int64_t id = -1;
      const std::string& key = it.key();
      if (key.empty() || key.size() > 10 || key.find_first_not_of("0123456789") != std::string::npos)
        invalid("'" + what + "' keys must be token ids (non-negative integers), got \"" + key + "\"");
      id = std::stoll(key);
      if (!it->is_number()) bad_request("'" + what + "." + key + "' must be a number");
      const double bias = it->get<double>();
      if (!std::isfinite(bias) || bias < -100 || bias > 100) invalid("'" + what + "." + key + "' must be in [-100, 100]");
      r.logit_bias.emplace_back(id, static_cast<float>(bias));
    }
  }
  if (auto m = f.integer("min_tokens", 0, std::numeric_limits<int32_t>::max())) r.sampling.min_tokens = static_cast<int>(*m);
  if (const json* ids = f.get("stop_token_ids")) {
    if (!ids->is_array()) bad_request("'" + f.name("stop_token_ids") + "' must be an array of token ids");
    for (const json& t : *ids) r.stop_token_ids.push_back(token_id(t, f.name("stop_token_ids")));
  }
  r.ignore_eos = f.boolean("ignore_eos").value_or(false);
}

// n and best_of (both in [1, max_n], best_of >= n).
void read_choices(Fields& f, const ApiLimits& limits, ApiRequest& r) {
  if (auto n = f.integer("n", 1, limits.max_n)) r.n = static_cast<int>(*n);
  r.best_of = r.n;
  if (auto b = f.integer("best_of", 1, limits.max_n)) {
    if (*b < r.n) invalid("'" + f.name("best_of") + "' must be >= n");
    r.best_of = static_cast<int>(*b);
  }
  if (r.best_of > r.n && r.stream) invalid("'best_of' > 'n' cannot be streamed (the best sequences are known only at the end)");
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
  top.warn_unknown();
  if (!params) return r;

  Fields p(*params, "parameters");
  read_max_new_tokens(p, "max_new_tokens", /*zero_ok=*/false, r);
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
  r.seed = p.seed("seed");
  if (const json* stop = p.get("stop")) read_stop_strings(*stop, "parameters.stop", limits, r.stop);
  r.details = p.boolean("details").value_or(false);
  r.decoder_input_details = p.boolean("decoder_input_details").value_or(false);
  r.return_full_text = p.boolean("return_full_text").value_or(false);
  read_sampling_extensions(p, r);
  // TGI's best_of: that many sampled sequences, the most likely one returned (details list the rest).
  if (auto b = p.integer("best_of", 1, limits.max_n)) {
    r.best_of = static_cast<int>(*b);
    if (r.best_of > 1 && !r.sampling.do_sample) invalid("'parameters.best_of' > 1 needs sampling (do_sample, temperature, top_k or top_p)");
    if (r.best_of > 1 && r.stream) invalid("'parameters.best_of' > 1 is not supported when streaming");
  }
  if (auto t = p.integer("top_n_tokens", 0, limits.max_logprobs)) r.top_logprobs = static_cast<int>(*t);
  r.logprobs = true;  // TGI's tokens always carry their logprob
  r.prompt_logprobs = r.decoder_input_details;
  p.unsupported("typical_p");
  p.unsupported("truncate");
  p.unsupported("watermark", false);
  p.ignored("grammar");  // read_structured_output
  p.unsupported("adapter_id");
  p.warn_unknown();
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
    s.warn_unknown();
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
  // vLLM's extensions: top_k (-1 or 0 = off), repetition_penalty, and those every route takes.
  if (auto top_k = f.integer("top_k", -1, std::numeric_limits<int32_t>::max())) r.sampling.top_k = static_cast<int>(std::max<int64_t>(0, *top_k));
  if (auto rp = f.number("repetition_penalty")) {
    if (*rp <= 0) invalid("'repetition_penalty' must be > 0");
    r.sampling.repetition_penalty = static_cast<float>(*rp);
  }
  read_sampling_extensions(f, r);
  r.seed = f.seed("seed");
  if (const json* stop = f.get("stop")) read_stop_strings(*stop, "stop", limits, r.stop);
  f.ignored("user");
}

// A completions prompt: a string, an array of one string, an array of token ids, or an array of
// one array of token ids (batches of prompts are not supported: send one request per prompt).
void read_completion_prompt(const json& v, ApiRequest& r) {
  auto ids_from = [&](const json& arr) {
    for (const json& t : arr) {
      if (!t.is_number_integer()) bad_request("'prompt' must be a string or an array of token ids");
      r.prompt_ids.push_back(token_id(t, "prompt"));
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
  r.echo = f.boolean("echo").value_or(false);
  // max_tokens 0 scores the prompt without generating: only meaningful with echo (as OpenAI).
  read_max_new_tokens(f, "max_tokens", /*zero_ok=*/r.echo, r);
  if (auto k = f.integer("logprobs", 0, limits.max_logprobs)) {  // OpenAI's legacy shape: top-k per position
    r.logprobs = true;
    r.top_logprobs = static_cast<int>(*k);
    r.prompt_logprobs = r.echo;
  }
  read_choices(f, limits, r);
  f.unsupported("suffix");
  f.ignored("response_format");  // read_structured_output
  f.warn_unknown();
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
        part.warn_unknown();
        msg.content += *text;
      }
    } else {
      bad_request("'" + where + ".content' must be a string or an array of text parts");
    }
  } else if (msg.role != "assistant") {
    invalid("'" + where + ".content' is required");
  }
  f.string("name");
  f.string("tool_call_id");
  if (const json* calls = f.get("tool_calls")) {  // rendered by read_structured_output; checked here
    if (!calls->is_array()) bad_request("'" + where + ".tool_calls' must be an array");
    for (size_t i = 0; i < calls->size(); ++i) {
      const std::string at = where + ".tool_calls[" + std::to_string(i) + "]";
      const json& call = (*calls)[i];
      const auto fn = call.is_object() ? call.find("function") : call.end();
      if (!call.is_object() || fn == call.end() || !fn->is_object()) bad_request("'" + at + ".function' must be an object");
      const auto name = fn->find("name");
      if (name == fn->end() || !name->is_string()) bad_request("'" + at + ".function.name' must be a string");
      const auto args = fn->find("arguments");
      if (args != fn->end() && !args->is_string() && !args->is_object())
        bad_request("'" + at + ".function.arguments' must be a JSON string or an object");
    }
  }
  f.warn_unknown();
  return msg;
}

// The chat prompt: the model's template (or the built-in ChatML) over the messages. Also adds
// the template's end-of-turn stop strings to `stop` when given. With render false, only checks
// the messages and sets add_special_tokens and `stop`, and returns "" (a request with tools is
// rendered once, by read_structured_output, with the tools in the template's context).
std::string render_chat(const json& messages, const ApiLimits& limits, bool& add_special_tokens,
                        std::vector<std::string>* stop, bool render = true) {
  if (!messages.is_array()) bad_request("'messages' must be an array");
  if (messages.empty()) invalid("'messages' is empty");
  std::vector<ChatMessage> msgs;
  for (size_t i = 0; i < messages.size(); ++i) msgs.push_back(read_message(messages[i], i));
  if (limits.chat && !limits.chat->builtin()) {
    nlohmann::ordered_json conversation = nlohmann::ordered_json::array();
    for (const ChatMessage& m : msgs) conversation.push_back({{"role", m.role}, {"content", m.content}});
    add_special_tokens = false;
    if (stop)
      for (const std::string& s : limits.chat->stop) stop->push_back(s);
    if (!render) return {};
    try {
      return limits.chat->render(conversation, /*add_generation_prompt=*/true);
    } catch (const ChatTemplateError& e) {  // raise_exception, or a conversation the template cannot take
      invalid(std::string("the model's chat template rejected the conversation: ") + e.what());
    }
  }
  if (stop) stop->push_back(kChatEndOfTurn);
  if (!render) return {};
  return render_chat_template(msgs, /*add_generation_prompt=*/true);
}

ApiRequest parse_chat(const json& body, const ApiLimits& limits) {
  ApiRequest r;
  r.endpoint = Endpoint::ChatCompletions;
  Fields f(body, "");
  const json* messages = f.get("messages");
  if (!messages) invalid("'messages' is required");
  read_openai_common(f, limits, r);
  read_max_new_tokens(f, "max_tokens", /*zero_ok=*/false, r);
  if (!r.max_new_tokens) read_max_new_tokens(f, "max_completion_tokens", /*zero_ok=*/false, r);
  else f.ignored("max_completion_tokens");
  r.logprobs = f.boolean("logprobs").value_or(false);
  if (auto k = f.integer("top_logprobs", 0, limits.max_logprobs)) {
    if (!r.logprobs && *k > 0) invalid("'top_logprobs' needs 'logprobs': true");
    r.top_logprobs = static_cast<int>(*k);
  }
  read_choices(f, limits, r);
  if (r.best_of != r.n) invalid("'best_of' is not a chat completions field");
  for (const char* k : {"response_format", "tools", "tool_choice"}) f.ignored(k);  // read_structured_output
  f.ignored("parallel_tool_calls");
  // Before warn_unknown: message fields are read (and warned about) in order.
  r.prompt = render_chat(*messages, limits, r.add_special_tokens, &r.stop, !chat_renders_with_tools(body));
  f.warn_unknown();
  return r;
}

// The route's max_new_tokens when the request gives none, for a prompt leaving `room` positions.
int64_t default_max_new_tokens(Endpoint endpoint, const ApiLimits& limits, int64_t room) {
  switch (endpoint) {
    case Endpoint::Generate:
    case Endpoint::GenerateStream: return std::min<int64_t>(limits.default_max_new_tokens, room);
    case Endpoint::Completions: return std::min<int64_t>(16, room);  // OpenAI's default
    case Endpoint::ChatCompletions: return room;                     // vLLM's: the rest of the context
  }
  return room;
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

namespace {

// Wraps every message's content in the markers (server/chat_template.h: ContentMarkers), so that
// whichever renderer formats the chat, the content's place in the prompt is known.
void mark_chat_content(json& body, const ContentMarkers& markers) {
  if (!body.is_object() || !body.contains("messages") || !body["messages"].is_array()) return;
  for (json& m : body["messages"]) {
    if (!m.is_object() || !m.contains("content")) continue;
    json& c = m["content"];
    if (c.is_string()) c = markers.wrap(c.get<std::string>());
    if (c.is_array())
      for (json& part : c)
        if (part.is_object() && part.contains("text") && part["text"].is_string()) part["text"] = markers.wrap(part["text"].get<std::string>());
  }
}

}  // namespace

ApiRequest parse_request(Endpoint endpoint, std::string_view body, const ApiLimits& limits) {
  json j = parse_body(body);
  if (endpoint == Endpoint::ChatCompletions) {
    const ContentMarkers markers;
    mark_chat_content(j, markers);
    ApiRequest r = parse_chat(j, limits);
    read_structured_output(r, j.dump(), limits);  // tools render the (marked) messages again
    r.prompt_literal = markers.strip(r.prompt);
    return r;
  }
  ApiRequest r = endpoint == Endpoint::Completions ? parse_completions(j, limits) : parse_tgi(endpoint, j, limits);
  read_structured_output(r, body, limits);  // response_format, grammar, tools (server/structured_output.h)
  return r;
}

GenerationRequest resolve_request(const ApiRequest& api, std::vector<int32_t> prompt, const ApiLimits& limits,
                                  uint64_t random_seed) {
  const auto in_vocab = [&](int64_t id, const char* field) {
    if (id < 0 || id >= limits.vocab_size)
      invalid(std::string("'") + field + "' has token id " + std::to_string(id) + "; the vocabulary has " +
              std::to_string(limits.vocab_size) + " tokens");
    return static_cast<int32_t>(id);
  };
  GenerationRequest g;
  if (api.prompt_ids.empty()) {
    g.prompt = std::move(prompt);
  } else {
    for (int64_t id : api.prompt_ids) g.prompt.push_back(in_vocab(id, "prompt"));
  }
  const auto n_prompt = static_cast<int64_t>(g.prompt.size());
  if (n_prompt == 0) invalid("the prompt is empty after tokenization");
  const bool scoring_only = api.max_new_tokens == 0;
  if (n_prompt > limits.max_context || (n_prompt == limits.max_context && !scoring_only))
    invalid("the prompt has " + std::to_string(n_prompt) + " tokens; the model's context is " +
            std::to_string(limits.max_context) + " tokens, which leaves no room to generate");
  const int64_t room = limits.max_context - n_prompt;
  if (api.max_new_tokens) {
    if (*api.max_new_tokens > room)
      invalid("the prompt has " + std::to_string(n_prompt) + " tokens and " + std::to_string(*api.max_new_tokens) +
              " new tokens were asked for; the model's context is " + std::to_string(limits.max_context) + " tokens");
    g.stop.max_new_tokens = *api.max_new_tokens;
  } else {
    g.stop.max_new_tokens = static_cast<int>(default_max_new_tokens(api.endpoint, limits, room));
  }
  if (api.sampling.min_tokens > g.stop.max_new_tokens)
    invalid("'min_tokens' (" + std::to_string(api.sampling.min_tokens) + ") is larger than the tokens to generate (" +
            std::to_string(g.stop.max_new_tokens) + ")");
  g.stop.stop = api.stop;
  for (int64_t id : api.stop_token_ids) g.stop.eos_token_ids.push_back(in_vocab(id, "stop_token_ids"));
  g.sampling = api.sampling;
  g.sampling.seed = api.seed.value_or(random_seed);
  for (const auto& [id, bias] : api.logit_bias) g.sampling.logit_bias.emplace_back(in_vocab(id, "logit_bias"), bias);
  g.ignore_eos = api.ignore_eos;
  g.n = api.best_of;
  g.top_logprobs = api.top_logprobs;
  g.prompt_logprobs = api.prompt_logprobs;
  try {  // the parsers checked every field; this only catches a disagreement between the two layers
    g.sampling.validate();
    g.stop.validate();
  } catch (const Error& e) {
    invalid(e.what());
  }
  return g;
}

TokenizeRequest parse_tokenize(std::string_view body, const ApiLimits& limits) {
  json j = parse_body(body);
  const ContentMarkers markers;
  mark_chat_content(j, markers);
  Fields f(j, "");
  TokenizeRequest r;
  const json* prompt = f.get("prompt");
  const json* messages = f.get("messages");
  if (auto m = f.string("model"); m && *m != limits.model_name)
    throw ApiError(404, error_type::kNotFound, "the model '" + *m + "' does not exist; this server serves '" + limits.model_name + "'");
  if ((prompt != nullptr) == (messages != nullptr)) invalid("give exactly one of 'prompt' and 'messages'");
  if (prompt) {
    if (!prompt->is_string()) bad_request("'prompt' must be a string");
    r.prompt = prompt->get<std::string>();
    r.add_special_tokens = f.boolean("add_special_tokens").value_or(true);
  } else {
    r.prompt = render_chat(*messages, limits, r.add_special_tokens, nullptr);
    r.prompt_literal = markers.strip(r.prompt);
    // vLLM's default for messages: the template writes the special tokens.
    if (auto a = f.boolean("add_special_tokens")) r.add_special_tokens = *a;
    f.ignored("add_generation_prompt");
  }
  f.warn_unknown();
  return r;
}

std::vector<int32_t> parse_detokenize(std::string_view body, const ApiLimits& limits) {
  const json j = parse_body(body);
  Fields f(j, "");
  const json* tokens = f.get("tokens");
  f.string("model");
  if (!tokens) invalid("'tokens' is required");
  if (!tokens->is_array()) bad_request("'tokens' must be an array of token ids");
  std::vector<int32_t> ids;
  for (const json& t : *tokens) {
    const int64_t id = token_id(t, "tokens");
    if (id >= limits.vocab_size)
      invalid("'tokens' has token id " + std::to_string(id) + "; the vocabulary has " + std::to_string(limits.vocab_size) + " tokens");
    ids.push_back(static_cast<int32_t>(id));
  }
  f.warn_unknown();
  return ids;
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
