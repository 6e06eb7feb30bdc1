// Chat templates: the Jinja2 template a Hugging Face checkpoint ships for turning a conversation
// into the prompt text its model was trained on, and the small interpreter that renders it.
//
//   ChatFormat chat = load_chat_format(checkpoint_dir);        // or ChatFormat::chatml()
//   std::string prompt = chat.render(messages, /*add_generation_prompt=*/true);
//
// The interpreter (server/jinja/: lexer, parser, values, renderer, built-ins) implements the subset
// of Jinja2 that chat templates use, with the settings transformers' apply_chat_template uses
// (trim_blocks, lstrip_blocks, loop controls, no trailing newline kept, tojson without HTML
// escaping, raise_exception, strftime_now): text, {{ }}, {% if %},
// {% for %} (loop.*, an `if` filter, {% else %}, break/continue), {% set %} (also namespace
// attributes and block captures), {% generation %}, comments and whitespace control; literals,
// lists, dicts, attribute/subscript/slice access, arithmetic, comparisons, and/or/not, in, tests,
// conditional expressions, the common filters and string/dict methods. docs/api.md lists them.
// Macros, {% raw %}, {% include %} and template inheritance are not supported (a load-time error).
//
// Errors: a template that does not parse, or names an unknown filter or test, throws
// fineserve::Error at construction naming the line and column. Rendering throws
// ChatTemplateError (raise_exception, a type error, an undefined variable used as a value, or a
// template over its step / size limits), which the API turns into HTTP 422.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "kernels/base.h"
#include "models/tokenizer/tokenizer.h"  // TextRange

namespace fineserve {

// An error raised while rendering a template: the request's fault (its conversation does not fit
// the template) or the template's, never the server's.
class ChatTemplateError : public Error {
 public:
  using Error::Error;
};

// Bounds on one render, so that a hostile template cannot hang or exhaust the server.
struct ChatTemplateLimits {
  int64_t max_steps = 20'000'000;        // expression/statement evaluations + bytes built / 16
  size_t max_output_bytes = 16u << 20;   // the rendered text, and any one string or list built
  int max_depth = 200;                   // nesting of blocks and expressions (parse) and of values
};

class ChatTemplate {
 public:
  // Parses `source`; throws Error("<name>:<line>:<col>: ...") when it is not a template this
  // interpreter can run.
  explicit ChatTemplate(const std::string& source, std::string name = "chat template",
                        ChatTemplateLimits limits = {});
  ~ChatTemplate();
  ChatTemplate(ChatTemplate&&) noexcept;
  ChatTemplate& operator=(ChatTemplate&&) noexcept;

  // Renders with the variables of `context` (a JSON object; its key order is kept, as Python's
  // dicts keep theirs). Throws ChatTemplateError. Thread-safe: a render has no shared state.
  std::string render(const nlohmann::ordered_json& context) const;

  const std::string& source() const;

  struct Impl;  // the parsed template (chat_template.cpp)

 private:
  std::unique_ptr<Impl> impl_;
};

// ChatML, the built-in chat format (docs/api.md), spelled here and only here:
//   <|im_start|>{role}\n{content}<|im_end|>\n   for every message (chatml_turn), then
//   <|im_start|>assistant\n                      when add_generation_prompt.
inline constexpr const char* kChatmlEndOfTurn = "<|im_end|>";
inline constexpr const char* kChatmlGenerationPrompt = "<|im_start|>assistant\n";
inline std::string chatml_turn(const std::string& role, const std::string& content) {
  return "<|im_start|>" + role + "\n" + content + kChatmlEndOfTurn + "\n";
}

// How a served model formats chats: the template, the special tokens it is rendered with, and
// the strings chat requests stop at by default.
struct ChatFormat {
  std::shared_ptr<const ChatTemplate> tmpl;  // nullptr: the built-in ChatML template
  std::string origin;                        // where the template came from (/info reports it)
  nlohmann::ordered_json special_tokens = nlohmann::ordered_json::object();  // bos_token, eos_token, ...
  std::vector<std::string> stop;             // end-of-turn strings added to every chat request

  // The built-in default: ChatML (chatml_turn above).
  static ChatFormat chatml();
  bool builtin() const { return tmpl == nullptr; }

  // `messages` is a JSON array of {"role", "content"} objects. The template sees messages,
  // add_generation_prompt, tools = none, documents = none and the special tokens, as
  // transformers' apply_chat_template passes them. Throws ChatTemplateError.
  std::string render(const nlohmann::ordered_json& messages, bool add_generation_prompt) const;

};

// Keeps track of where chat message content lands in a rendered prompt, whatever renders it
// (a checkpoint's template, the built-in ChatML, the tool-calling renders), so that the server
// tokenizes that text without special-token matching and only the template's own markup can
// produce control tokens. Before rendering, each content string is wrapped in two markers made of
// private-use characters and a random nonce (a client cannot forge them); after rendering,
// strip() cuts them out and returns the ranges they enclosed. Leading and trailing whitespace is
// left outside the markers, so templates that trim content render exactly as without them.
//
//   ContentMarkers markers;
//   message["content"] = markers.wrap(content);     // for every message
//   std::string prompt = chat.render(messages, true);
//   std::vector<TextRange> content = markers.strip(prompt);
class ContentMarkers {
 public:
  ContentMarkers();
  std::string wrap(const std::string& content) const;
  // Removes every marker from `text` and returns the byte ranges (of the result) they enclosed.
  // Throws ChatTemplateError when they do not pair up (a template that cut a message's content
  // apart or dropped part of it): that content could not be kept apart from control tokens.
  std::vector<TextRange> strip(std::string& text) const;

 private:
  std::string open_, close_;
};

// A template from its source text; `origin` names it in errors and in /info.
ChatFormat make_chat_format(const std::string& source, const std::string& origin,
                            nlohmann::ordered_json special_tokens = nlohmann::ordered_json::object());

// The chat format of a checkpoint directory, in transformers' order of precedence:
// `override_file` (serve --chat-template) when given, else chat_template.jinja, else
// tokenizer_config.json's "chat_template" (a string, or a list of {name, template} from which the
// one named "default" is used), else the built-in ChatML. Special tokens come from
// tokenizer_config.json (strings or {"content": ...} objects), else special_tokens_map.json.
// Throws Error for an unreadable or invalid template.
ChatFormat load_chat_format(const std::filesystem::path& checkpoint_dir, const std::string& override_file = "");

}  // namespace fineserve
