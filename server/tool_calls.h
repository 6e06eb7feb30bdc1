// Tool calls in model output -> OpenAI's `tool_calls`, for the chat-template families FineServe
// knows:
//   Hermes / Qwen   <tool_call>\n{"name": "f", "arguments": {...}}\n</tool_call>   (one or more)
//   Llama 3.1       {"name": "f", "parameters": {...}}   (the whole reply; "<|python_tag|>" first
//                   is accepted; several calls separated by ';')
//   Mistral         [TOOL_CALLS][{"name": "f", "arguments": {...}}, ...]   ([TOOL_CALLS] is a
//                   special token that decoded text usually no longer shows: a reply that is just
//                   the JSON array counts too)
// The same family decides the grammar that enforces tool_choice "required" / a named function
// (server/structured_output.cpp).
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

namespace fineserve {

enum class ToolCallFormat { Hermes, Llama3, Mistral };

std::string_view tool_call_format_name(ToolCallFormat f);
// The family a chat template writes tool calls in, from its source text (Hermes when unknown,
// which is also what the built-in ChatML template uses).
ToolCallFormat detect_tool_call_format(std::string_view template_source);

struct ToolCall {
  std::string id;         // "call_..."
  std::string name;
  std::string arguments;  // a JSON object as text (OpenAI sends arguments as a string)
};

struct ParsedToolCalls {
  std::string content;  // the text outside the calls (trimmed)
  std::vector<ToolCall> calls;
};

// Finds the tool calls in a complete reply. Text that looks like a call but does not parse (the
// model stopped early, or wrote invalid JSON) stays in `content`. id_prefix + index names each
// call (e.g. "call_<request id>_0"), so a stream and a non-streaming reply name calls alike.
ParsedToolCalls parse_tool_calls(std::string_view text, ToolCallFormat format, const std::string& id_prefix);

// One call as OpenAI's message.tool_calls entry, and as a streaming delta {"tool_calls": [...]}.
nlohmann::json tool_call_json(const ToolCall& call);
nlohmann::json tool_call_delta(const ToolCall& call, int index);

// Non-streaming chat replies: when `text` holds tool calls, sets message.tool_calls (and
// message.content to the text outside them, null when none) and returns true (finish_reason is
// then "tool_calls").
bool apply_tool_calls(nlohmann::json& message, std::string_view text, ToolCallFormat format, const std::string& id_prefix);

// Streaming: passes content through and holds back text from the point where a tool call may
// begin (the format's opening marker, or for JSON-only formats a reply that starts with '{' or
// '['), so that no part of a call leaks out as content; and sends the calls as OpenAI streams
// them: for each call, once its name is complete, a delta with its index, id, type and
// function.name (arguments ""), then function.arguments fragments as the arguments object is
// generated. The fragments are the model's own bytes, so they add up to exactly the `arguments`
// of the whole reply (parse_tool_calls). A call that began but does not parse at the end (cut
// short, invalid JSON) is sent as content then, as a whole reply would have it; its deltas were
// already sent and stay (the finish reason is then still "tool_calls").
class ToolCallStream {
 public:
  ToolCallStream(ToolCallFormat format, std::string id_prefix);

  struct Update {
    std::string content;                 // text to send as content now
    std::vector<nlohmann::json> deltas;  // {"tool_calls": [...]} deltas to send after it
    bool has_calls = false;              // at the end: the reply held calls (finish_reason "tool_calls")
  };
  // The next piece of the reply; `last`: the reply ends with it.
  Update feed(std::string_view piece, bool last = false);

 private:
  std::string take_content(std::string_view piece);
  void stream_calls(Update& u);  // deltas for what the held text adds to the calls
  void finish(Update& u);
  static nlohmann::json arguments_delta(int index, const std::string& fragment);

  struct Streamed {
    std::string arguments;  // the arguments sent so far
  };
  ToolCallFormat format_;
  std::string id_prefix_;
  std::string all_;      // every piece so far
  size_t sent_ = 0;      // bytes of all_ sent as content
  bool holding_ = false;  // a call may have begun at held_from_
  size_t held_from_ = 0;
  std::vector<Streamed> streamed_;  // calls announced so far, by index
};

}  // namespace fineserve
