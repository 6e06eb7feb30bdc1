// Structured output and tools in the API: request fields -> grammars, tool-call parsing (whole
// replies and streams), response bodies, and over HTTP against the golden OPT model.
#include <gtest/gtest.h>

#include <regex>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "engine/grammar/automaton.h"
#include "server/api.h"
#include "server/responses.h"
#include "server/sse.h"
#include "server/structured_output.h"
#include "server/tool_calls.h"
#include "server_util.h"

namespace fineserve {
namespace {

// A generated token event of choice 0 carrying `text`.
TokenEvent text_event(std::string text, std::optional<FinishReason> finish) {
  TokenEvent e;
  e.request_id = 1;
  e.token = 5;
  e.text = std::move(text);
  e.finish = finish;
  return e;
}

using json = nlohmann::json;

ApiLimits limits() {
  ApiLimits l;
  l.model_name = "m";
  return l;
}

ApiRequest parse(Endpoint e, const json& body) { return parse_request(e, body.dump(), limits()); }

int status_of(Endpoint e, const std::string& body) {
  try {
    parse_request(e, body, limits());
    return 200;
  } catch (const ApiError& err) {
    return err.status();
  }
}

std::string error_of(Endpoint e, const std::string& body) {
  try {
    parse_request(e, body, limits());
    return "";
  } catch (const ApiError& err) {
    return err.what();
  }
}

grammar::Dfa dfa_of(const StructuredOutput& so) { return grammar::compile_dfa(*structured_output_grammar(so)); }

const json kWeatherTool = json::parse(R"({"type":"function","function":{"name":"get_weather","description":"Weather in a city",
  "parameters":{"type":"object","properties":{"city":{"type":"string","maxLength":12},"unit":{"enum":["c","f"]}},"required":["city"]}}})");
const json kTimeTool = json::parse(R"({"type":"function","function":{"name":"get_time","parameters":{"type":"object","properties":{}}}})");

json chat_body() { return {{"messages", {{{"role", "user"}, {"content", "hi"}}}}}; }

TEST(StructuredOutputApi, ResponseFormatOnBothOpenAiRoutes) {
  json chat = chat_body();
  chat["response_format"] = {{"type", "json_object"}};
  EXPECT_EQ(parse(Endpoint::ChatCompletions, chat).structured.kind, StructuredOutput::Kind::JsonObject);
  chat["response_format"] = {{"type", "text"}};
  EXPECT_EQ(parse(Endpoint::ChatCompletions, chat).structured.kind, StructuredOutput::Kind::None);

  // Property order is the client's (not alphabetical) in the compiled grammar.
  const std::string body = R"({"prompt":"x","response_format":{"type":"json_schema","json_schema":{"name":"p","strict":true,
      "schema":{"type":"object","properties":{"zeta":{"type":"integer"},"alpha":{"type":"boolean"}},"required":["zeta","alpha"],"additionalProperties":false}}}})";
  const ApiRequest r = parse_request(Endpoint::Completions, body, limits());
  ASSERT_EQ(r.structured.kind, StructuredOutput::Kind::JsonSchema);
  const grammar::Dfa d = dfa_of(r.structured);
  EXPECT_TRUE(d.matches(R"({"zeta": 3, "alpha": true})"));
  EXPECT_FALSE(d.matches(R"({"alpha": true, "zeta": 3})"));
}

TEST(StructuredOutputApi, TgiGrammar) {
  ApiRequest r = parse(Endpoint::Generate, {{"inputs", "x"}, {"parameters", {{"grammar", {{"type", "regex"}, {"value", "[0-9]{3}"}}}}}});
  ASSERT_EQ(r.structured.kind, StructuredOutput::Kind::Regex);
  EXPECT_TRUE(dfa_of(r.structured).matches("123"));
  r = parse(Endpoint::GenerateStream, {{"inputs", "x"}, {"parameters", {{"grammar", {{"type", "json"}, {"value", {{"type", "boolean"}}}}}}}});
  ASSERT_EQ(r.structured.kind, StructuredOutput::Kind::JsonSchema);
  EXPECT_TRUE(dfa_of(r.structured).matches("false"));
  // The schema as a JSON string, as some TGI clients send it.
  r = parse(Endpoint::Generate, {{"inputs", "x"}, {"parameters", {{"grammar", {{"type", "json"}, {"value", R"({"type":"null"})"}}}}}});
  EXPECT_TRUE(dfa_of(r.structured).matches("null"));
}

TEST(StructuredOutputApi, BadValuesAre4xxNamingTheProblem) {
  EXPECT_EQ(status_of(Endpoint::ChatCompletions, R"({"messages":[{"role":"user","content":"x"}],"response_format":{"type":"xml"}})"), 422);
  EXPECT_EQ(status_of(Endpoint::ChatCompletions, R"({"messages":[{"role":"user","content":"x"}],"response_format":"json"})"), 400);
  EXPECT_EQ(status_of(Endpoint::ChatCompletions, R"({"messages":[{"role":"user","content":"x"}],"response_format":{"type":"json_schema"}})"), 422);
  EXPECT_EQ(status_of(Endpoint::Generate, R"({"inputs":"x","parameters":{"grammar":{"type":"ebnf","value":"x"}}})"), 422);
  EXPECT_EQ(status_of(Endpoint::Generate, R"({"inputs":"x","parameters":{"grammar":{"type":"regex","value":"(a)\\1"}}})"), 422);
  const std::string e = error_of(Endpoint::ChatCompletions,
      R"({"messages":[{"role":"user","content":"x"}],"response_format":{"type":"json_schema","json_schema":{"name":"n","schema":{"type":"object","properties":{"a":{"type":"string","not":{"const":"x"}}}}}}})");
  EXPECT_NE(e.find("'not'"), std::string::npos) << e;
  EXPECT_NE(e.find("#/properties/a"), std::string::npos) << e;
  EXPECT_EQ(status_of(Endpoint::ChatCompletions, R"({"messages":[{"role":"user","content":"x"}],"tool_choice":"required"})"), 422);
  json c = chat_body();
  c["tools"] = {kWeatherTool};
  c["tool_choice"] = {{"type", "function"}, {"function", {{"name", "nope"}}}};
  EXPECT_EQ(status_of(Endpoint::ChatCompletions, c.dump()), 422);
  c["tool_choice"] = "required";
  c["response_format"] = {{"type", "json_object"}};
  EXPECT_EQ(status_of(Endpoint::ChatCompletions, c.dump()), 422);
}

TEST(StructuredOutputApi, ToolChoiceModes) {
  json c = chat_body();
  c["tools"] = {kWeatherTool, kTimeTool};
  ApiRequest r = parse(Endpoint::ChatCompletions, c);
  EXPECT_EQ(r.structured.tool_choice, "auto");
  EXPECT_EQ(r.structured.kind, StructuredOutput::Kind::None);  // auto: free text or a call
  EXPECT_TRUE(r.structured.parses_tool_calls());
  // The built-in template lists the tools in a system turn (Hermes style).
  EXPECT_NE(r.prompt.find("<tools>"), std::string::npos) << r.prompt;
  EXPECT_NE(r.prompt.find("\"get_weather\""), std::string::npos);
  EXPECT_TRUE(r.prompt.ends_with("<|im_start|>assistant\n"));

  c["tool_choice"] = "none";
  EXPECT_FALSE(parse(Endpoint::ChatCompletions, c).structured.parses_tool_calls());

  c["tool_choice"] = "required";
  r = parse(Endpoint::ChatCompletions, c);
  ASSERT_EQ(r.structured.kind, StructuredOutput::Kind::ToolCalls);
  grammar::Dfa d = dfa_of(r.structured);
  EXPECT_TRUE(d.matches("<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>"));
  EXPECT_TRUE(d.matches("<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>\n"
                        "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\", \"unit\": \"c\"}}\n</tool_call>"));
  EXPECT_FALSE(d.matches("Sure!"));
  EXPECT_FALSE(d.matches("<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {}}\n</tool_call>"));  // city required

  c["tool_choice"] = {{"type", "function"}, {"function", {{"name", "get_time"}}}};
  d = dfa_of(parse(Endpoint::ChatCompletions, c).structured);
  EXPECT_TRUE(d.matches("<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>"));
  EXPECT_FALSE(d.matches("<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"x\"}}\n</tool_call>"));
}

TEST(StructuredOutputApi, ToolMessagesRenderBackThroughTheTemplate) {
  const json body = json::parse(R"({"messages":[
      {"role":"user","content":"Weather in Paris?"},
      {"role":"assistant","content":null,"tool_calls":[{"id":"call_1","type":"function","function":{"name":"get_weather","arguments":"{\"city\": \"Paris\"}"}}]},
      {"role":"tool","tool_call_id":"call_1","content":"18 C"}]})");
  json b = body;
  b["tools"] = {kWeatherTool};
  const ApiRequest r = parse(Endpoint::ChatCompletions, b);
  EXPECT_NE(r.prompt.find("<tool_call>\n{\"name\":\"get_weather\",\"arguments\":{\"city\":\"Paris\"}}\n</tool_call>"), std::string::npos) << r.prompt;
  EXPECT_NE(r.prompt.find("<tool_response>\n18 C\n</tool_response>"), std::string::npos) << r.prompt;

  // A checkpoint template sees tools and the calls (arguments as objects) in its context.
  const std::string src =
      "{% if tools %}{% for t in tools %}[T:{{ t.function.name }}]{% endfor %}{% endif %}"
      "{% for m in messages %}<{{ m.role }}>{% if m.tool_calls %}{% for c in m.tool_calls %}CALL {{ c.function.name }} "
      "{{ c.function.arguments.city }}{% endfor %}{% else %}{{ m.content }}{% endif %}{% endfor %}"
      "{% if add_generation_prompt %}<assistant>{% endif %}";
  ApiLimits l = limits();
  l.chat = std::make_shared<const ChatFormat>(make_chat_format(src, "test"));
  const ApiRequest t = parse_request(Endpoint::ChatCompletions, b.dump(), l);
  EXPECT_EQ(t.prompt, "[T:get_weather]<user>Weather in Paris?<assistant>CALL get_weather Paris<tool>18 C<assistant>");

  // The template renders once, with the tools: a template that refuses to render without them
  // (as some checkpoints' do when a conversation holds tool messages) accepts the request.
  l.chat = std::make_shared<const ChatFormat>(
      make_chat_format("{% if not tools %}{{ raise_exception('no tools') }}{% endif %}" + src, "test"));
  EXPECT_EQ(parse_request(Endpoint::ChatCompletions, b.dump(), l).prompt, t.prompt);
  EXPECT_THROW(parse_request(Endpoint::ChatCompletions, chat_body().dump(), l), ApiError) << "without tools it raises";
}

// Messages of the wrong shape are 400s naming the field, never an exception from the JSON
// library (libFuzzer found a "role" array reaching the tool-message check).
TEST(StructuredOutputApi, MalformedMessagesAre400s) {
  const auto chat = [](const std::string& messages) { return R"({"messages":)" + messages + "}"; };
  EXPECT_EQ(status_of(Endpoint::ChatCompletions, chat(R"([{"role": [{"type": "text", "text": "Hi"}]}])")), 400);
  EXPECT_EQ(status_of(Endpoint::ChatCompletions, chat(R"([{"role": 7, "content": "Hi"}])")), 400);
  for (const char* calls : {R"("x")", R"([1])", R"([{"function": 2}])", R"([{"function": {"name": 3}}])",
                            R"([{"function": {"name": "f", "arguments": 4}}])"}) {
    const std::string m = std::string(R"([{"role":"assistant","content":null,"tool_calls":)") + calls + "}]";
    EXPECT_EQ(status_of(Endpoint::ChatCompletions, chat(m)), 400) << calls;
    EXPECT_NE(error_of(Endpoint::ChatCompletions, chat(m)).find("messages[0].tool_calls"), std::string::npos) << calls;
  }
  EXPECT_EQ(status_of(Endpoint::ChatCompletions, chat(R"([{"role":"tool","content":"x","tool_call_id":5}])")), 400);
}

// ---- Tool-call parsing --------------------------------------------------------------------------

TEST(ToolCalls, ParsesEachFamily) {
  ParsedToolCalls p = parse_tool_calls(
      "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n"
      "<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>",
      ToolCallFormat::Hermes, "call_x_");
  ASSERT_EQ(p.calls.size(), 2u);
  EXPECT_EQ(p.content, "Let me check.");
  EXPECT_EQ(p.calls[0].id, "call_x_0");
  EXPECT_EQ(p.calls[0].name, "get_weather");
  EXPECT_EQ(json::parse(p.calls[0].arguments), json({{"city", "Paris"}}));
  EXPECT_EQ(p.calls[1].name, "get_time");

  p = parse_tool_calls("<|python_tag|>{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Oslo\"}}", ToolCallFormat::Llama3, "c");
  ASSERT_EQ(p.calls.size(), 1u);
  EXPECT_EQ(json::parse(p.calls[0].arguments)["city"], "Oslo");
  p = parse_tool_calls("{\"name\": \"a\", \"parameters\": {\"s\": \"x;y\"}}; {\"name\": \"b\", \"parameters\": {}}", ToolCallFormat::Llama3, "c");
  ASSERT_EQ(p.calls.size(), 2u);
  EXPECT_EQ(p.calls[1].name, "b");

  p = parse_tool_calls("[TOOL_CALLS][{\"name\": \"get_time\", \"arguments\": {}}, {\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\"}}]",
                       ToolCallFormat::Mistral, "c");
  ASSERT_EQ(p.calls.size(), 2u);
  EXPECT_EQ(p.calls[1].name, "get_weather");

  // Not calls: plain text, or a call that does not parse, stays content.
  p = parse_tool_calls("Hello there", ToolCallFormat::Hermes, "c");
  EXPECT_TRUE(p.calls.empty());
  EXPECT_EQ(p.content, "Hello there");
  p = parse_tool_calls("<tool_call>\n{\"name\": \"get_we", ToolCallFormat::Hermes, "c");
  EXPECT_TRUE(p.calls.empty());
  EXPECT_EQ(p.content, "<tool_call>\n{\"name\": \"get_we");
  EXPECT_TRUE(parse_tool_calls("{\"answer\": 42}", ToolCallFormat::Llama3, "c").calls.empty());
  EXPECT_EQ(detect_tool_call_format("{{ '<tool_call>' }}"), ToolCallFormat::Hermes);
  EXPECT_EQ(detect_tool_call_format("{{ '[TOOL_CALLS]' }}"), ToolCallFormat::Mistral);
  EXPECT_EQ(detect_tool_call_format("{{ '<|python_tag|>' }}<|eot_id|>"), ToolCallFormat::Llama3);
}

// OpenAI's streamed calls, reassembled as its clients do: per index, id/type/name from the first
// delta, arguments concatenated over all of them.
struct StreamedCalls {
  std::string content;
  std::vector<ToolCall> calls;
  std::vector<int> argument_deltas;  // per call: deltas that carried argument bytes
  bool has_calls = false;
  void add(const ToolCallStream::Update& u) {
    content += u.content;
    has_calls = has_calls || u.has_calls;
    for (const json& d : u.deltas) {
      ASSERT_EQ(d["tool_calls"].size(), 1u);
      const json& c = d["tool_calls"][0];
      const size_t index = c["index"].get<size_t>();
      if (c.contains("id")) {  // the first delta of a call: everything but (most) arguments
        ASSERT_EQ(index, calls.size()) << "calls are announced in order, once";
        EXPECT_EQ(c["type"], "function");
        calls.push_back({c["id"].get<std::string>(), c["function"]["name"].get<std::string>(), ""});
        argument_deltas.push_back(0);
      }
      ASSERT_LT(index, calls.size()) << "arguments before the call's first delta";
      const std::string args = c["function"]["arguments"].get<std::string>();
      calls[index].arguments += args;
      if (!args.empty()) ++argument_deltas[index];
    }
  }
};

// Feeding a reply in pieces of every size gives the same calls as the whole reply, and no part
// of a call leaks out as content.
TEST(ToolCalls, StreamReassemblesToTheWholeReply) {
  const std::vector<std::pair<ToolCallFormat, std::string>> replies = {
      {ToolCallFormat::Hermes, "Checking.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>"},
      {ToolCallFormat::Hermes, "<tool_call>\n{\"name\": \"a\", \"arguments\": {\"s\": \"}{\\\"\", \"n\": [1, {\"x\": 2}]}}\n</tool_call>\n"
                               "<tool_call>\n{\"arguments\": {\"k\": true}, \"name\": \"b\"}\n</tool_call>"},
      {ToolCallFormat::Hermes, "<tool_call>\n{\"name\": \"c\", \"arguments\": \"{\\\"q\\\": 1}\"}\n</tool_call>"},
      {ToolCallFormat::Hermes, "no calls <tool here"},
      {ToolCallFormat::Llama3, " {\"name\": \"get_time\", \"parameters\": {}}"},
      {ToolCallFormat::Llama3, "{\"name\": \"a\", \"parameters\": {\"s\": \"x;y\"}}; {\"name\": \"b\", \"parameters\": {}}"},
      {ToolCallFormat::Llama3, "The answer is 4."},
      {ToolCallFormat::Mistral, "[{\"name\": \"get_time\", \"arguments\": {}}]"},
      {ToolCallFormat::Mistral, "[TOOL_CALLS] [{\"name\": \"f\", \"arguments\": {\"a\": 1}}, {\"name\": \"g\", \"arguments\": {\"b\": [2]}}]"},
  };
  for (const auto& [format, text] : replies) {
    SCOPED_TRACE(text);
    const ParsedToolCalls whole = parse_tool_calls(text, format, "call_");
    for (size_t step = 1; step <= 7; ++step) {
      ToolCallStream s(format, "call_");
      StreamedCalls got;
      for (size_t i = 0; i < text.size(); i += step) got.add(s.feed(text.substr(i, step), i + step >= text.size()));
      ASSERT_EQ(got.calls.size(), whole.calls.size());
      EXPECT_EQ(got.has_calls, !whole.calls.empty());
      for (size_t i = 0; i < whole.calls.size(); ++i) {
        EXPECT_EQ(got.calls[i].id, whole.calls[i].id);
        EXPECT_EQ(got.calls[i].name, whole.calls[i].name);
        EXPECT_EQ(got.calls[i].arguments, whole.calls[i].arguments);
      }
      if (whole.calls.empty()) {
        EXPECT_EQ(got.content, text);
      } else {
        EXPECT_EQ(got.content.find("name"), std::string::npos) << got.content;
      }
    }
  }
}

// Arguments are streamed as the model writes them: fed a byte at a time, the call is announced
// before its arguments are complete and they arrive in many fragments, the model's own bytes.
TEST(ToolCalls, StreamsArgumentsAsTheyAreGenerated) {
  const std::string text = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"unit\": \"c\"}}\n</tool_call>";
  ToolCallStream s(ToolCallFormat::Hermes, "call_");
  StreamedCalls got;
  bool announced_early = false;
  for (size_t i = 0; i < text.size(); ++i) {
    got.add(s.feed(text.substr(i, 1), i + 1 == text.size()));
    if (got.calls.size() == 1 && got.calls[0].arguments.empty() && text.substr(0, i + 1).ends_with("\"get_weather\""))
      announced_early = true;
  }
  EXPECT_TRUE(announced_early) << "the call's first delta comes as soon as its name is complete";
  ASSERT_EQ(got.calls.size(), 1u);
  EXPECT_EQ(got.calls[0].arguments, "{\"city\": \"Paris\", \"unit\": \"c\"}");
  EXPECT_EQ(got.argument_deltas[0], static_cast<int>(got.calls[0].arguments.size())) << "one fragment per byte fed";
  EXPECT_TRUE(got.has_calls);
  EXPECT_EQ(got.content, "");
  // The whole reply names the same arguments text, the model's bytes as written.
  EXPECT_EQ(parse_tool_calls(text, ToolCallFormat::Hermes, "call_").calls[0].arguments, got.calls[0].arguments);
}

// ---- Over HTTP, golden OPT model ----------------------------------------------------------------

class StructuredHttp : public testing::SharedServerTest {};

TEST_F(StructuredHttp, JsonSchemaChatAndCompletionsOutputsValidate) {
  auto c = server().client();
  const json schema = json::parse(R"({"type":"object","properties":{"name":{"type":"string","maxLength":10},
      "n":{"type":"integer","minimum":1,"maximum":9}},"required":["name","n"],"additionalProperties":false})");
  for (uint64_t seed = 0; seed < 3; ++seed) {
    json body = {{"model", "opt-preln"}, {"messages", {{{"role", "user"}, {"content", "Give JSON"}}}}, {"max_tokens", 80},
                 {"temperature", 1.0}, {"seed", seed},
                 {"response_format", {{"type", "json_schema"}, {"json_schema", {{"name", "x"}, {"strict", true}, {"schema", schema}}}}}};
    testing::Reply r = testing::post(*c, "/v1/chat/completions", body);
    ASSERT_EQ(r.status, 200) << r.body;
    const std::string text = r.json()["choices"][0]["message"]["content"];
    const json v = json::parse(text);
    EXPECT_TRUE(v["name"].is_string()) << text;
    EXPECT_GE(v["n"].get<int>(), 1);
    EXPECT_LE(v["n"].get<int>(), 9);
    EXPECT_EQ(v.size(), 2u);
    EXPECT_EQ(r.json()["choices"][0]["finish_reason"], "stop");
  }
  // Completions, and json_object: free-form strings may run past max_tokens, so only a finished
  // output must parse.
  testing::Reply r = testing::post(*c, "/v1/completions", json{{"model", "opt-preln"}, {"prompt", "x"}, {"max_tokens", 80}, {"seed", 1},
      {"response_format", {{"type", "json_schema"}, {"json_schema", {{"name", "x"}, {"schema", schema}}}}}});
  ASSERT_EQ(r.status, 200) << r.body;
  EXPECT_EQ(json::parse(r.json()["choices"][0]["text"].get<std::string>()).size(), 2u) << r.body;
  r = testing::post(*c, "/v1/completions", json{{"model", "opt-preln"}, {"prompt", "x"}, {"max_tokens", 80}, {"temperature", 0},
                                               {"response_format", {{"type", "json_object"}}}});
  ASSERT_EQ(r.status, 200) << r.body;
  if (r.json()["choices"][0]["finish_reason"] == "stop") {
    EXPECT_TRUE(json::parse(r.json()["choices"][0]["text"].get<std::string>()).is_object()) << r.body;
  } else {
    EXPECT_EQ(r.json()["choices"][0]["text"].get<std::string>().front(), '{') << r.body;
  }
}

TEST_F(StructuredHttp, TgiRegexGrammarMatchesFully) {
  auto c = server().client();
  const std::string pattern = "(yes|no), [0-9]{2}";
  testing::Reply r = testing::post(*c, "/generate", json{{"inputs", "Answer"}, {"parameters", {{"max_new_tokens", 20},
                                       {"grammar", {{"type", "regex"}, {"value", pattern}}}, {"details", true}}}});
  ASSERT_EQ(r.status, 200) << r.body;
  EXPECT_TRUE(std::regex_match(r.json()["generated_text"].get<std::string>(), std::regex(pattern))) << r.body;
  r = testing::post(*c, "/generate", json{{"inputs", "x"}, {"parameters", {{"grammar", {{"type", "json"}, {"value", {{"type", "array"}, {"uniqueItems", true}}}}}}}});
  EXPECT_EQ(r.status, 422);
  EXPECT_NE(r.body.find("uniqueItems"), std::string::npos) << r.body;
}

// The response writer turns a reply with calls into tool_calls, and a stream of the same reply in
// pieces into deltas that reassemble to it. (Over HTTP with a real model: the Python client test.)
TEST(StructuredOutputResponses, ToolCallsWholeAndStreamed) {
  json body = chat_body();
  body["tools"] = {kWeatherTool};
  const std::string reply = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
  ResponseContext ctx;
  ctx.request = parse(Endpoint::ChatCompletions, body);
  ctx.id = "chatcmpl-abc";
  ctx.model_name = "m";
  ResponseWriter whole(ctx);
  const json j = json::parse(whole.on_events({text_event(reply, FinishReason::EosToken)}));
  const json choice = j["choices"][0];
  EXPECT_EQ(choice["finish_reason"], "tool_calls");
  EXPECT_TRUE(choice["message"]["content"].is_null());
  ASSERT_EQ(choice["message"]["tool_calls"].size(), 1u);
  EXPECT_EQ(choice["message"]["tool_calls"][0]["id"], "call_abc_0");
  EXPECT_EQ(choice["message"]["tool_calls"][0]["function"]["name"], "get_weather");
  EXPECT_EQ(json::parse(choice["message"]["tool_calls"][0]["function"]["arguments"].get<std::string>()), json({{"city", "Paris"}}));

  ctx.request.stream = true;
  ResponseWriter stream(ctx);
  std::string sse;
  for (size_t i = 0; i < reply.size(); i += 5) {
    TokenEvent e = text_event(reply.substr(i, 5), std::nullopt);
    if (i + 5 >= reply.size()) e.finish = FinishReason::EosToken;
    sse += stream.on_events({e});
  }
  SseParser parser;
  std::string content;
  json calls = json::array();
  std::string finish;
  int argument_chunks = 0;
  for (const SseEvent& e : parser.feed(sse)) {
    if (e.data == "[DONE]") continue;
    const json ch = json::parse(e.data)["choices"][0];
    if (ch["delta"].contains("content")) content += ch["delta"]["content"].get<std::string>();
    if (ch["delta"].contains("tool_calls")) {
      const json& d = ch["delta"]["tool_calls"][0];
      EXPECT_EQ(d["index"], 0);
      if (d.contains("id")) calls.push_back(d);  // the first delta: id, type, name
      ASSERT_EQ(calls.size(), 1u);
      if (!d.contains("id")) {
        calls[0]["function"]["arguments"] = calls[0]["function"]["arguments"].get<std::string>() + d["function"]["arguments"].get<std::string>();
        ++argument_chunks;
      }
    }
    if (!ch["finish_reason"].is_null()) finish = ch["finish_reason"];
  }
  EXPECT_EQ(content, "");  // nothing of the call leaked as text
  EXPECT_EQ(finish, "tool_calls");
  ASSERT_EQ(calls.size(), 1u);
  EXPECT_EQ(calls[0]["type"], "function");
  EXPECT_EQ(calls[0]["id"], choice["message"]["tool_calls"][0]["id"]);
  EXPECT_EQ(calls[0]["function"], choice["message"]["tool_calls"][0]["function"]);
  EXPECT_GT(argument_chunks, 1) << "arguments arrive in fragments as they are generated";

  // tool_choice "none": the same text is plain content.
  body["tool_choice"] = "none";
  ctx.request = parse(Endpoint::ChatCompletions, body);
  ResponseWriter plain(ctx);
  const json p = json::parse(plain.on_events({text_event(reply, FinishReason::EosToken)}));
  EXPECT_EQ(p["choices"][0]["message"]["content"], reply);
  EXPECT_EQ(p["choices"][0]["finish_reason"], "stop");
}

}  // namespace
}  // namespace fineserve
