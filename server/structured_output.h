// Structured output and tools: the request fields that constrain generation, translated into
// grammars of the engine (engine/grammar/) — the server only translates (DESIGN: Constrained
// decoding).
//
//   OpenAI (both routes)  response_format {"type": "text" | "json_object"}
//                         response_format {"type": "json_schema", "json_schema": {"name", "schema",
//                                          "strict", "description"}}
//   OpenAI chat           tools [{"type": "function", "function": {"name", "description",
//                                 "parameters", "strict"}}], tool_choice "none" | "auto" |
//                         "required" | {"type": "function", "function": {"name"}}
//   TGI                   parameters.grammar {"type": "json" | "regex", "value": schema | pattern}
//                         ("json_object" is accepted as an alias of "json" with a schema value)
//
// docs/structured_output.md describes the behaviour; this header is the code's map.
#pragma once

#include <cstdint>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include <nlohmann/json.hpp>

#include "engine/grammar/grammar.h"
#include "engine/grammar/json_schema.h"
#include "server/tool_calls.h"

namespace fineserve {

class Tokenizer;
struct ApiRequest;
struct ApiLimits;
struct ChatFormat;

// What a request asks for, before it is compiled for the model's vocabulary.
struct StructuredOutput {
  enum class Kind { None, JsonObject, JsonSchema, Regex, ToolCalls };
  Kind kind = Kind::None;
  nlohmann::ordered_json schema;  // JsonSchema
  std::string regex;              // Regex

  // Tools (chat only). tool_choice: "none", "auto", "required" or "function" (named).
  nlohmann::ordered_json tools = nlohmann::ordered_json::array();
  std::string tool_choice = "none";
  std::string tool_name;  // tool_choice "function"
  ToolCallFormat tool_format = ToolCallFormat::Hermes;
  int max_tool_calls = 8;  // per reply when a call is required; 1 with parallel_tool_calls false

  bool constrained() const { return kind != Kind::None; }
  // Whether the reply is searched for tool calls (tools given and tool_choice not "none").
  bool parses_tool_calls() const { return !tools.empty() && tool_choice != "none"; }
  // A key naming the grammar (equal keys: the same grammar), for the compile cache.
  std::string cache_key() const;
};

// Whether a chat request's prompt is rendered by read_structured_output rather than by the plain
// chat rendering of parse_request: it has tools, or tool messages / assistant tool_calls, which
// only this rendering passes to the template. The template is rendered once either way.
bool chat_renders_with_tools(const nlohmann::json& body);

// Reads response_format / parameters.grammar / tools / tool_choice from the raw body (again, as
// ordered JSON, so that schema properties keep the client's order) into request.structured; for
// chat requests that chat_renders_with_tools it renders the prompt with the tools (through the
// chat template's context, or for the built-in ChatML template a Hermes-style tool system
// prompt). Throws ApiError: 400 for a wrong JSON type, 422 for a bad value or a schema/regex the
// grammar engine does not support (the message names the keyword).
void read_structured_output(ApiRequest& request, std::string_view body, const ApiLimits& limits);

// The grammar tree of a request (also used to check it at parse time). Throws fineserve::Error.
grammar::NodePtr structured_output_grammar(const StructuredOutput& so);

// Compiles requests' grammars for one model's vocabulary. The vocabulary index is built on first
// use; compiled grammars (each with at most 16 MiB of cached masks) are kept in a small LRU
// cache keyed by the request's grammar, so
// repeated schemas (the usual case: one schema per application) skip compilation and reuse the
// token masks earlier requests computed. Thread-safe.
class GrammarCompiler {
 public:
  GrammarCompiler(const Tokenizer& tokenizer, int32_t vocab_width, std::vector<int32_t> eos_ids,
                  size_t cache_entries = 16);

  // nullptr when the request is unconstrained. Throws ApiError 422 when the grammar does not
  // compile (too large, or nothing matches).
  std::shared_ptr<const grammar::Grammar> compile(const StructuredOutput& so);

 private:
  const Tokenizer& tokenizer_;
  int32_t width_;
  std::vector<int32_t> eos_;
  size_t capacity_;
  std::once_flag vocab_once_;
  std::shared_ptr<const grammar::VocabIndex> vocab_;
  std::mutex mu_;
  std::list<std::pair<std::string, std::shared_ptr<const grammar::Grammar>>> lru_;  // most recent first
};

// Options every JSON grammar of the server uses (whitespace bound and nesting; see json_schema.h).
grammar::JsonGrammarOptions server_json_options();

}  // namespace fineserve
