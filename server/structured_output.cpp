#include "server/structured_output.h"

#include "engine/grammar/regex.h"
#include "kernels/base.h"
#include "server/api.h"
#include "server/chat_template.h"

namespace fineserve {

namespace {

using ojson = nlohmann::ordered_json;

[[noreturn]] void bad_request(const std::string& msg) { throw ApiError(400, error_type::kBadRequest, msg); }
[[noreturn]] void invalid(const std::string& msg) { throw ApiError(422, error_type::kValidation, msg); }

// The keys of `obj` must all be in `allowed`.
void only_keys(const ojson& obj, std::initializer_list<std::string_view> allowed, const std::string& where) {
  for (auto it = obj.begin(); it != obj.end(); ++it)
    if (std::find(allowed.begin(), allowed.end(), it.key()) == allowed.end()) invalid("unknown field '" + where + "." + it.key() + "'");
}

const ojson* field(const ojson& obj, const char* key) {
  auto it = obj.find(key);
  return it == obj.end() || it->is_null() ? nullptr : &*it;
}

std::string string_field(const ojson& obj, const char* key, const std::string& where, bool required) {
  const ojson* v = field(obj, key);
  if (!v) {
    if (required) invalid("'" + where + "." + key + "' is required");
    return {};
  }
  if (!v->is_string()) bad_request("'" + where + "." + key + "' must be a string");
  return v->get<std::string>();
}

void read_response_format(const ojson& rf, StructuredOutput& so) {
  if (!rf.is_object()) bad_request("'response_format' must be a JSON object");
  const std::string type = string_field(rf, "type", "response_format", true);
  if (type == "text") {
    only_keys(rf, {"type"}, "response_format");
  } else if (type == "json_object") {
    only_keys(rf, {"type"}, "response_format");
    so.kind = StructuredOutput::Kind::JsonObject;
  } else if (type == "json_schema") {
    only_keys(rf, {"type", "json_schema"}, "response_format");
    const ojson* js = field(rf, "json_schema");
    if (!js) invalid("'response_format.json_schema' is required when 'response_format.type' is \"json_schema\"");
    if (!js->is_object()) bad_request("'response_format.json_schema' must be a JSON object");
    only_keys(*js, {"name", "description", "schema", "strict"}, "response_format.json_schema");
    string_field(*js, "name", "response_format.json_schema", false);
    string_field(*js, "description", "response_format.json_schema", false);
    if (const ojson* strict = field(*js, "strict"); strict && !strict->is_boolean())
      bad_request("'response_format.json_schema.strict' must be a boolean");
    const ojson* schema = field(*js, "schema");
    if (!schema) {
      so.kind = StructuredOutput::Kind::JsonObject;  // no schema: any JSON object
    } else {
      if (!schema->is_object() && !schema->is_boolean()) bad_request("'response_format.json_schema.schema' must be a JSON object");
      so.kind = StructuredOutput::Kind::JsonSchema;
      so.schema = *schema;
    }
  } else {
    invalid("'response_format.type' must be \"text\", \"json_object\" or \"json_schema\", got \"" + type + "\"");
  }
}

void read_tgi_grammar(const ojson& g, StructuredOutput& so) {
  if (!g.is_object()) bad_request("'parameters.grammar' must be a JSON object");
  only_keys(g, {"type", "value"}, "parameters.grammar");
  const std::string type = string_field(g, "type", "parameters.grammar", true);
  const ojson* value = field(g, "value");
  if (!value) invalid("'parameters.grammar.value' is required");
  if (type == "json" || type == "json_object") {
    ojson schema = *value;
    if (schema.is_string()) {  // TGI also takes the schema as a JSON string
      schema = ojson::parse(value->get<std::string>(), nullptr, false);
      if (schema.is_discarded()) invalid("'parameters.grammar.value' is not valid JSON");
    }
    if (!schema.is_object() && !schema.is_boolean()) bad_request("'parameters.grammar.value' must be a JSON schema object");
    so.kind = StructuredOutput::Kind::JsonSchema;
    so.schema = std::move(schema);
  } else if (type == "regex") {
    if (!value->is_string()) bad_request("'parameters.grammar.value' must be a string for type \"regex\"");
    so.kind = StructuredOutput::Kind::Regex;
    so.regex = value->get<std::string>();
  } else {
    invalid("'parameters.grammar.type' must be \"json\" or \"regex\", got \"" + type + "\"");
  }
}

void read_tools(const ojson& body, StructuredOutput& so) {
  if (const ojson* tools = field(body, "tools")) {
    if (!tools->is_array()) bad_request("'tools' must be an array");
    for (size_t i = 0; i < tools->size(); ++i) {
      const std::string where = "tools[" + std::to_string(i) + "]";
      const ojson& t = (*tools)[i];
      if (!t.is_object()) bad_request("'" + where + "' must be a JSON object");
      only_keys(t, {"type", "function"}, where);
      if (string_field(t, "type", where, true) != "function") invalid("'" + where + ".type' must be \"function\"");
      const ojson* fn = field(t, "function");
      if (!fn || !fn->is_object()) invalid("'" + where + ".function' is required and must be an object");
      only_keys(*fn, {"name", "description", "parameters", "strict"}, where + ".function");
      const std::string name = string_field(*fn, "name", where + ".function", true);
      if (name.empty()) invalid("'" + where + ".function.name' is empty");
      string_field(*fn, "description", where + ".function", false);
      if (const ojson* p = field(*fn, "parameters"); p && !p->is_object()) bad_request("'" + where + ".function.parameters' must be a JSON object");
      so.tools.push_back(t);
    }
  }
  so.tool_choice = so.tools.empty() ? "none" : "auto";
  if (const ojson* p = field(body, "parallel_tool_calls")) {
    if (!p->is_boolean()) bad_request("'parallel_tool_calls' must be a boolean");
    if (!p->get<bool>()) so.max_tool_calls = 1;
  }
  if (const ojson* tc = field(body, "tool_choice")) {
    if (tc->is_string()) {
      const std::string c = tc->get<std::string>();
      if (c != "none" && c != "auto" && c != "required") invalid("'tool_choice' must be \"none\", \"auto\", \"required\" or a function");
      so.tool_choice = c;
    } else if (tc->is_object()) {
      only_keys(*tc, {"type", "function"}, "tool_choice");
      if (string_field(*tc, "type", "tool_choice", true) != "function") invalid("'tool_choice.type' must be \"function\"");
      const ojson* fn = field(*tc, "function");
      if (!fn || !fn->is_object()) invalid("'tool_choice.function' is required");
      so.tool_name = string_field(*fn, "name", "tool_choice.function", true);
      so.tool_choice = "function";
    } else {
      bad_request("'tool_choice' must be a string or an object");
    }
    if (so.tools.empty() && so.tool_choice != "none") invalid("'tool_choice' is \"" + so.tool_choice + "\" but no 'tools' are given");
    if (so.tool_choice == "function") {
      bool found = false;
      for (const ojson& t : so.tools) found = found || t["function"]["name"] == so.tool_name;
      if (!found) invalid("'tool_choice' names the function '" + so.tool_name + "', which is not in 'tools'");
    }
  }
}

std::string content_text(const ojson& m) {
  const ojson* c = field(m, "content");
  if (!c) return {};
  if (c->is_string()) return c->get<std::string>();
  std::string out;
  if (c->is_array())
    for (const ojson& part : *c)
      if (part.is_object() && part.contains("text") && part["text"].is_string()) out += part["text"].get<std::string>();
  return out;
}

// The conversation as a chat template expects it with tools: roles (developer -> system),
// content as text, assistant tool_calls with their arguments as objects (as transformers'
// templates read them), tool messages with their tool_call_id / name.
ojson template_messages(const ojson& messages) {
  ojson out = ojson::array();
  for (const ojson& m : messages) {
    ojson msg = ojson::object();
    const std::string role = m.value("role", std::string());
    msg["role"] = role == "developer" ? "system" : role;
    const ojson* c = field(m, "content");
    msg["content"] = c ? ojson(content_text(m)) : ojson(nullptr);
    if (const ojson* tc = field(m, "tool_calls"); tc && tc->is_array()) {
      ojson calls = ojson::array();
      for (const ojson& call : *tc) {
        ojson copy = call;
        if (copy.contains("function") && copy["function"].is_object() && copy["function"].contains("arguments") &&
            copy["function"]["arguments"].is_string()) {
          ojson args = ojson::parse(copy["function"]["arguments"].get<std::string>(), nullptr, false);
          if (!args.is_discarded()) copy["function"]["arguments"] = args;
        }
        calls.push_back(copy);
      }
      msg["tool_calls"] = calls;
    }
    for (const char* k : {"tool_call_id", "name"})
      if (const ojson* v = field(m, k)) msg[k] = *v;
    out.push_back(msg);
  }
  return out;
}

// The built-in ChatML template with tools, in the Hermes style Qwen2.5 uses: the tools go in the
// system turn, calls in <tool_call> tags, tool results in <tool_response> tags of a user turn.
std::string render_chatml_with_tools(const ojson& messages, const ojson& tools) {
  std::string system, out;
  size_t first = 0;
  if (!messages.empty() && messages[0]["role"] == "system") {
    system = messages[0]["content"].is_string() ? messages[0]["content"].get<std::string>() : "";
    first = 1;
  }
  if (!tools.empty()) {
    if (!system.empty()) system += "\n\n";
    system += "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
              "You are provided with function signatures within <tools></tools> XML tags:\n<tools>";
    for (const ojson& t : tools) system += "\n" + t.dump();
    system += "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
              "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>";
  }
  if (!system.empty() || first == 1) out += "<|im_start|>system\n" + system + "<|im_end|>\n";
  for (size_t i = first; i < messages.size(); ++i) {
    const ojson& m = messages[i];
    const std::string role = m["role"].get<std::string>();
    const std::string content = m["content"].is_string() ? m["content"].get<std::string>() : "";
    if (role == "tool") {
      out += "<|im_start|>user\n<tool_response>\n" + content + "\n</tool_response><|im_end|>\n";
      continue;
    }
    out += "<|im_start|>" + role + "\n" + content;
    if (m.contains("tool_calls")) {
      for (const ojson& call : m["tool_calls"]) {
        const ojson fn = call.value("function", ojson::object());
        ojson c = {{"name", fn.value("name", std::string())}, {"arguments", fn.value("arguments", ojson::object())}};
        out += (content.empty() ? "" : "\n") + std::string("<tool_call>\n") + c.dump() + "\n</tool_call>";
      }
    }
    out += "<|im_end|>\n";
  }
  out += "<|im_start|>assistant\n";
  return out;
}

// See chat_renders_with_tools; for json and ojson bodies alike.
template <typename Json>
bool renders_with_tools(const Json& body) {
  const auto present = [](const Json& obj, const char* key) {
    const auto it = obj.find(key);
    return it != obj.end() && !it->is_null();
  };
  if (const auto tools = body.find("tools"); tools != body.end() && tools->is_array() && !tools->empty()) return true;
  const auto messages = body.find("messages");
  if (messages == body.end() || !messages->is_array()) return false;
  for (const Json& m : *messages)
    if (m.is_object() && ((present(m, "role") && m["role"] == "tool") || present(m, "tool_calls"))) return true;
  return false;
}

// {"name": "<name>", "<args key>": <parameters>} in the compact spacing models write.
grammar::NodePtr call_object(const ojson& fn, const char* args_key) {
  using namespace grammar;
  const ojson params = fn.contains("parameters") ? fn["parameters"] : ojson({{"type", "object"}});
  NodePtr args;
  try {
    args = json_schema_grammar(params, server_json_options());
  } catch (const Error& e) {
    throw Error("tool '" + fn["name"].get<std::string>() + "' parameters: " + e.what());
  }
  return seq({literal("{\"name\": " + fn["name"].dump() + ", \"" + args_key + "\": "), args, literal("}")});
}

}  // namespace

std::string StructuredOutput::cache_key() const {
  switch (kind) {
    case Kind::None: return "";
    case Kind::JsonObject: return "object";
    case Kind::JsonSchema: return "schema\x1f" + schema.dump();
    case Kind::Regex: return "regex\x1f" + regex;
    case Kind::ToolCalls:
      return "tools\x1f" + std::string(tool_call_format_name(tool_format)) + "\x1f" + std::to_string(max_tool_calls) + "\x1f" + tool_choice + "\x1f" + tool_name + "\x1f" + tools.dump();
  }
  return "";
}

grammar::JsonGrammarOptions server_json_options() {
  return grammar::JsonGrammarOptions{};  // at most 2 whitespace bytes per place (docs/structured_output.md)
}

grammar::NodePtr structured_output_grammar(const StructuredOutput& so) {
  using namespace grammar;
  switch (so.kind) {
    case StructuredOutput::Kind::None: return nullptr;
    case StructuredOutput::Kind::JsonObject: return any_json_object(server_json_options());
    case StructuredOutput::Kind::JsonSchema: return json_schema_grammar(so.schema, server_json_options());
    case StructuredOutput::Kind::Regex: return parse_regex(so.regex);
    case StructuredOutput::Kind::ToolCalls: {
      const char* args_key = so.tool_format == ToolCallFormat::Llama3 ? "parameters" : "arguments";
      std::vector<NodePtr> options;
      for (const ojson& t : so.tools)
        if (so.tool_choice != "function" || t["function"]["name"] == so.tool_name) options.push_back(call_object(t["function"], args_key));
      NodePtr call = alt(std::move(options));
      switch (so.tool_format) {
        case ToolCallFormat::Hermes: {
          NodePtr tagged = seq({literal("<tool_call>\n"), call, literal("\n</tool_call>")});
          return seq({tagged, repeat(seq({literal("\n"), tagged}), 0, so.max_tool_calls - 1)});
        }
        case ToolCallFormat::Llama3: return call;
        case ToolCallFormat::Mistral: return seq({literal("["), call, repeat(seq({literal(", "), call}), 0, so.max_tool_calls - 1), literal("]")});
      }
    }
  }
  return nullptr;
}

bool chat_renders_with_tools(const nlohmann::json& body) { return body.is_object() && renders_with_tools(body); }

void read_structured_output(ApiRequest& r, std::string_view body, const ApiLimits& limits) {
  const ojson j = ojson::parse(body.begin(), body.end(), nullptr, /*allow_exceptions=*/false);
  if (!j.is_object()) return;  // parse_request has rejected it already
  StructuredOutput& so = r.structured;
  switch (r.endpoint) {
    case Endpoint::Generate:
    case Endpoint::GenerateStream:
      if (const ojson* p = field(j, "parameters"); p && p->is_object())
        if (const ojson* g = field(*p, "grammar")) read_tgi_grammar(*g, so);
      break;
    case Endpoint::Completions:
      if (const ojson* rf = field(j, "response_format")) read_response_format(*rf, so);
      break;
    case Endpoint::ChatCompletions: {
      if (const ojson* rf = field(j, "response_format")) read_response_format(*rf, so);
      read_tools(j, so);
      const bool chat_template = limits.chat && !limits.chat->builtin();
      so.tool_format = chat_template ? detect_tool_call_format(limits.chat->tmpl->source()) : ToolCallFormat::Hermes;
      if (so.tool_choice == "required" || so.tool_choice == "function") {
        if (so.kind != StructuredOutput::Kind::None)
          invalid("'response_format' cannot be combined with 'tool_choice' \"" + so.tool_choice + "\"");
        so.kind = StructuredOutput::Kind::ToolCalls;
      }
      // The only rendering of such a request: parse_chat left its prompt to this.
      if (const ojson* messages = field(j, "messages"); messages && messages->is_array() && renders_with_tools(j)) {
        const ojson conv = template_messages(*messages);
        try {
          if (chat_template) {
            ojson ctx = limits.chat->special_tokens.is_object() ? limits.chat->special_tokens : ojson::object();
            ctx["messages"] = conv;
            ctx["add_generation_prompt"] = true;
            ctx["tools"] = so.tools.empty() ? ojson(nullptr) : so.tools;
            ctx["documents"] = nullptr;
            r.prompt = limits.chat->tmpl->render(ctx);
          } else {
            r.prompt = render_chatml_with_tools(conv, so.tools);
          }
        } catch (const ChatTemplateError& e) {
          invalid(std::string("the model's chat template rejected the conversation with tools: ") + e.what());
        }
      }
      break;
    }
  }
  // Reject what the grammar engine cannot take now, with its message (it names the keyword).
  try {
    structured_output_grammar(so);
  } catch (const Error& e) {
    invalid(std::string("unsupported grammar: ") + e.what());
  }
}

// ---- GrammarCompiler ----------------------------------------------------------------------------

GrammarCompiler::GrammarCompiler(const Tokenizer& tokenizer, int32_t vocab_width, std::vector<int32_t> eos_ids,
                                 size_t cache_entries)
    : tokenizer_(tokenizer), width_(vocab_width), eos_(std::move(eos_ids)), capacity_(std::max<size_t>(cache_entries, 1)) {}

std::shared_ptr<const grammar::Grammar> GrammarCompiler::compile(const StructuredOutput& so) {
  if (!so.constrained()) return nullptr;
  const std::string key = so.cache_key();
  {
    std::lock_guard lock(mu_);
    for (auto it = lru_.begin(); it != lru_.end(); ++it) {
      if (it->first != key) continue;
      lru_.splice(lru_.begin(), lru_, it);
      return lru_.front().second;
    }
  }
  std::call_once(vocab_once_, [&] { vocab_ = grammar::VocabIndex::from_tokenizer(tokenizer_, width_, eos_); });
  std::shared_ptr<const grammar::Grammar> g;
  try {
    g = grammar::compile_grammar(structured_output_grammar(so), vocab_);
  } catch (const Error& e) {
    throw ApiError(422, error_type::kValidation, std::string("unsupported grammar: ") + e.what());
  }
  std::lock_guard lock(mu_);
  lru_.emplace_front(key, g);
  while (lru_.size() > capacity_) lru_.pop_back();
  return g;
}

}  // namespace fineserve
