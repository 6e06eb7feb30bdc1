// Chat templates: the Jinja interpreter against transformers' renderings of real vendor templates
// and of small snippets (tests/data/chat_templates/expected.json, made by
// tests/server/make_chat_template_reference.py), its load-time and runtime errors and limits,
// loading a checkpoint's template, and a served checkpoint whose template the chat route applies.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>

#include "server/api.h"
#include "server/chat_template.h"
#include "server/serve.h"
#include "server_util.h"
#include "tests/scratch_dir.h"

namespace fineserve {
namespace {

using ojson = nlohmann::ordered_json;
namespace fs = std::filesystem;

const fs::path kTemplates = fs::path(FINESERVE_TEST_DATA) / "chat_templates";

std::string read_file(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

const ojson& expected() {
  static const ojson j = ojson::parse(read_file(kTemplates / "expected.json"));
  return j;
}

using TempDir = testing::ScratchDir;  // tests/scratch_dir.h

void write_file(const fs::path& p, const std::string& text) {
  std::ofstream out(p, std::ios::binary);
  out << text;
}

// ---- byte-exact agreement with transformers -----------------------------------------------------

TEST(ChatTemplate, RealTemplatesRenderAsTransformers) {
  const ojson& exp = expected();
  ASSERT_GE(exp["cases"].size(), 100u);
  int errors = 0;
  for (const ojson& c : exp["cases"]) {
    const std::string name = c["template"];
    ojson special = ojson::object();
    for (const char* k : {"bos_token", "eos_token"})
      if (c.contains(k)) special[k] = c[k];
    const ChatFormat chat = make_chat_format(read_file(kTemplates / (name + ".jinja")), name, special);
    const ojson& messages = exp["conversations"][c["conversation"].get<std::string>()];
    const std::string what = name + " / " + c["conversation"].get<std::string>() +
                             (c["add_generation_prompt"].get<bool>() ? " / generation prompt" : "");
    if (c.contains("error")) {
      ++errors;
      try {
        chat.render(messages, c["add_generation_prompt"]);
        ADD_FAILURE() << what << ": rendered, but transformers raised: " << c["error"];
      } catch (const ChatTemplateError& e) {
        EXPECT_EQ(std::string(e.what()), c["error"].get<std::string>()) << what;  // raise_exception's message
      }
    } else {
      EXPECT_EQ(chat.render(messages, c["add_generation_prompt"]), c["output"].get<std::string>()) << what;
    }
  }
  EXPECT_GT(errors, 5);  // the alternation checks of several templates fire
}

TEST(ChatTemplate, SnippetsRenderAsJinja) {
  const ojson& exp = expected();
  ojson vars = exp["variables"];
  // What transformers' render_jinja_template passes besides the caller's variables.
  vars["tools"] = nullptr;
  vars["documents"] = nullptr;
  vars["add_generation_prompt"] = false;
  for (const ojson& s : exp["snippets"]) {
    const std::string src = s["template"];
    SCOPED_TRACE(src);
    ChatTemplate t(src);
    if (s.contains("error")) {
      EXPECT_THROW(t.render(vars), ChatTemplateError);
    } else {
      EXPECT_EQ(t.render(vars), s["output"].get<std::string>());
    }
  }
}

TEST(ChatTemplate, RaiseExceptionMessage) {
  ChatTemplate t("{{ raise_exception('bad: ' + messages[0].role) }}");
  try {
    t.render({{"messages", ojson::array({{{"role", "tool"}, {"content", "x"}}})}});
    FAIL() << "no error";
  } catch (const ChatTemplateError& e) {
    EXPECT_STREQ(e.what(), "bad: tool");
  }
}

// ---- errors and limits --------------------------------------------------------------------------

void expect_load_error(const std::string& src, const std::string& fragment) {
  try {
    ChatTemplate t(src, "tmpl");
    ADD_FAILURE() << "loaded: " << src;
  } catch (const ChatTemplateError& e) {
    ADD_FAILURE() << "a runtime error at load: " << e.what();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << src << " -> " << e.what();
    EXPECT_EQ(std::string(e.what()).rfind("tmpl:", 0), 0u) << e.what();  // names the template and position
  }
}

TEST(ChatTemplate, LoadErrorsNameThePosition) {
  expect_load_error("ok\n{{ x | nosuchfilter }}", "tmpl:2:6: no filter named 'nosuchfilter'");
  expect_load_error("{{ x is nosuchtest }}", "no test named 'nosuchtest'");
  expect_load_error("{% if x %}unclosed", "expected 'elif'");
  expect_load_error("{% for x in y %}", "expected 'else'");
  expect_load_error("{% endif %}", "tag 'endif'");
  expect_load_error("{% macro m() %}{% endmacro %}", "unsupported tag 'macro'");
  expect_load_error("{{ 1 + }}", "unexpected '}}'");
  expect_load_error("{{ 'unterminated }}", "unterminated string");
  expect_load_error("{# never closed", "missing end of comment");
  expect_load_error("{{ x ", "missing end of output tag");
  expect_load_error("{{ x ) }}", "unexpected ')'");
  expect_load_error("{% break %}", "outside a loop");
  expect_load_error("{{ f(a=1, 2) }}", "positional argument after a keyword");
  expect_load_error("{{ 99999999999999999999 }}", "too large");
  expect_load_error("{{ " + std::string(5000, '(') + "1" + std::string(5000, ')') + " }}", "nests too deeply");
  expect_load_error("{{ 1" + [] { std::string s; for (int i = 0; i < 5000; ++i) s += " + 1"; return s; }() + " }}",
                    "nests too deeply");
  std::string deep;
  for (int i = 0; i < 1000; ++i) deep += "{% if true %}";
  expect_load_error(deep, "nests too deeply");
}

TEST(ChatTemplate, RuntimeErrorsAreTemplateErrors) {
  const ojson vars = {{"messages", ojson::array()}, {"s", "x"}, {"d", {{"k", 1}}}};
  for (const char* src : {"{{ missing.attr }}", "{{ missing + 1 }}", "{{ s + 1 }}", "{{ 1 // 0 }}", "{{ 1 % 0 }}",
                          "{{ 1 / 0 }}", "{% for x in 3 %}{% endfor %}", "{{ s() }}", "{{ s.nosuchmethod() }}",
                          "{{ 1 < 'a' }}", "{{ 9223372036854775807 + 1 }}", "{% set d.k = 2 %}", "{{ missing|tojson }}",
                          "{{ range(1, 2, 0) }}", "{{ [1, 2][::0] }}", "{% for a, b in [[1, 2, 3]] %}{% endfor %}",
                          "{% set ns = namespace() %}{% set ns.me = ns %}", "{{ 'x'.split('') }}"}) {
    ChatTemplate t(src);
    EXPECT_THROW(t.render(vars), ChatTemplateError) << src;
  }
}

TEST(ChatTemplate, HostileTemplatesHitTheLimits) {
  ChatTemplateLimits lim;
  lim.max_steps = 200'000;
  lim.max_output_bytes = 1 << 20;
  for (const char* src : {
           "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
           "{% set ns = namespace(s='ab') %}{% for i in range(100) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s|length }}",
           "{{ 'x' * 1000000000000 }}", "{{ [1] * 100000000 }}", "{{ range(1000000000)|length }}",
           "{% for i in range(1000) %}{{ 'y' * 10000 }}{% endfor %}",
           "{% set ns = namespace(l=[]) %}{% for i in range(100000) %}{% set ns.l = [ns.l] %}{% endfor %}{{ ns.l|tojson }}",
       }) {
    ChatTemplate t(src, "hostile", lim);
    EXPECT_THROW(t.render(ojson::object()), ChatTemplateError) << src;
  }
}

// ---- formats and checkpoints --------------------------------------------------------------------

TEST(ChatFormat, ChatmlDefaultAndStops) {
  const ChatFormat chatml = ChatFormat::chatml();
  EXPECT_TRUE(chatml.builtin());
  const ojson msgs = ojson::array({{{"role", "user"}, {"content", "Hi"}}});
  EXPECT_EQ(chatml.render(msgs, true), render_chat_template({{"user", "Hi"}}, true));
  EXPECT_EQ(chatml.stop, std::vector<std::string>{"<|im_end|>"});

  // A checkpoint template: EOS stops generation (the engine); the known end-of-turn markers it
  // writes become stop strings.
  EXPECT_EQ(make_chat_format(read_file(kTemplates / "smollm2.jinja"), "t").stop, std::vector<std::string>{"<|im_end|>"});
  EXPECT_EQ(make_chat_format(read_file(kTemplates / "llama3_1_instruct.jinja"), "t").stop, std::vector<std::string>{"<|eot_id|>"});
  EXPECT_EQ(make_chat_format(read_file(kTemplates / "gemma2.jinja"), "t").stop, std::vector<std::string>{"<end_of_turn>"});
  EXPECT_TRUE(make_chat_format(read_file(kTemplates / "llama2_chat.jinja"), "t").stop.empty());
}

TEST(ChatFormat, LoadsTheCheckpointsTemplate) {
  TempDir d;
  // No tokenizer_config.json: the built-in ChatML.
  EXPECT_TRUE(load_chat_format(d.path()).builtin());

  // A string template; special tokens as strings or {"content": ...}.
  ojson tc = {{"bos_token", {{"content", "<B>"}, {"lstrip", false}}}, {"eos_token", "<E>"},
              {"chat_template", "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{{ eos_token }}{% endfor %}"}};
  write_file(d.path() / "tokenizer_config.json", tc.dump());
  ChatFormat f = load_chat_format(d.path());
  EXPECT_FALSE(f.builtin());
  EXPECT_EQ(f.origin, "tokenizer_config.json chat_template");
  EXPECT_EQ(f.render(ojson::array({{{"role", "user"}, {"content", "q"}}}), true), "<B>[user]q<E>");

  // A list: the entry named "default".
  tc["chat_template"] = ojson::array({{{"name", "tool_use"}, {"template", "T"}}, {{"name", "default"}, {"template", "D"}}});
  write_file(d.path() / "tokenizer_config.json", tc.dump());
  EXPECT_EQ(load_chat_format(d.path()).render(ojson::array(), false), "D");
  tc["chat_template"] = ojson::array({{{"name", "tool_use"}, {"template", "T"}}});
  write_file(d.path() / "tokenizer_config.json", tc.dump());
  EXPECT_THROW(load_chat_format(d.path()), Error);

  // chat_template.jinja wins over tokenizer_config.json; --chat-template over both.
  write_file(d.path() / "chat_template.jinja", "J{{ messages|length }}\n");
  EXPECT_EQ(load_chat_format(d.path()).render(ojson::array(), false), "J0");
  EXPECT_EQ(load_chat_format(d.path()).origin, "chat_template.jinja");
  write_file(d.path() / "override.jinja", "O");
  EXPECT_EQ(load_chat_format(d.path(), (d.path() / "override.jinja").string()).render(ojson::array(), false), "O");
  EXPECT_THROW(load_chat_format(d.path(), (d.path() / "missing.jinja").string()), Error);

  // A template that does not parse fails at load, naming where it came from.
  write_file(d.path() / "chat_template.jinja", "{% if %}");
  try {
    load_chat_format(d.path());
    ADD_FAILURE() << "loaded a broken template";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("chat_template.jinja:1:"), std::string::npos) << e.what();
  }
}

TEST(ChatFormat, ApiRendersWithTheModelsTemplate) {
  ApiLimits limits;
  limits.model_name = "m";
  limits.max_context = 4096;
  limits.chat = std::make_shared<const ChatFormat>(
      make_chat_format(read_file(kTemplates / "llama2_chat.jinja"), "llama2", {{"bos_token", "<s>"}, {"eos_token", "</s>"}}));
  const std::string body = R"({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]})";
  ApiRequest r = parse_request(Endpoint::ChatCompletions, body, limits);
  EXPECT_EQ(r.prompt, "<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nU [/INST]");
  EXPECT_FALSE(r.add_special_tokens);  // the template wrote the BOS itself
  EXPECT_TRUE(r.stop.empty());    // Llama 2 ends its turns with EOS only

  // The template refuses two user turns in a row: 422 with its message.
  try {
    parse_request(Endpoint::ChatCompletions, R"({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]})", limits);
    FAIL() << "accepted";
  } catch (const ApiError& e) {
    EXPECT_EQ(e.status(), 422);
    EXPECT_NE(std::string(e.what()).find("Conversation roles must alternate"), std::string::npos) << e.what();
  }
}

// A served checkpoint with a chat template in its tokenizer_config.json: the chat route renders
// with it, /info says so, and a conversation the template raises on gets 422.
TEST(ChatFormat, ServedCheckpointUsesItsTemplate) {
  TempDir d;
  for (const auto& entry : fs::directory_iterator(testing::kModelDir))
    if (entry.path().filename() != "golden.safetensors") fs::copy_file(entry.path(), d.path() / entry.path().filename());
  ojson tc = ojson::parse(read_file(d.path() / "tokenizer_config.json"));
  tc["chat_template"] =
      "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system messages') }}{% endif %}"
      "{{ m.role|upper }}: {{ m.content|trim }}\n{% endfor %}{% if add_generation_prompt %}BOT:{% endif %}";
  write_file(d.path() / "tokenizer_config.json", tc.dump());

  ServeOptions o = default_serve_options();
  o.model = d.path().string();
  o.served_model_name = "tiny";
  o.http.port = 0;
  o.http.threads = 8;
  o.kv_cache_mb = 4;
  ServingStack stack(o);
  stack.load();
  httplib::Client c("127.0.0.1", stack.port());
  c.set_read_timeout(std::chrono::seconds(60));

  testing::Reply info = testing::get(c, "/info");
  ASSERT_EQ(info.status, 200);
  EXPECT_EQ(info.json()["chat_template"], "tokenizer_config.json chat_template");

  const nlohmann::json req = {{"model", "tiny"},
                              {"messages", {{{"role", "user"}, {"content", "  Hello  "}}, {{"role", "assistant"}, {"content", "Hi"}},
                                            {{"role", "user"}, {"content", "Bye"}}}},
                              {"max_tokens", 2}, {"temperature", 0}, {"ignore_eos", true}};
  testing::Reply r = testing::post(c, "/v1/chat/completions", req);
  ASSERT_EQ(r.status, 200) << r.body;
  auto tok = load_tokenizer(d.path());
  const std::string prompt = "USER: Hello\nASSISTANT: Hi\nUSER: Bye\nBOT:";
  EXPECT_EQ(r.json()["usage"]["prompt_tokens"], tok->encode(prompt, /*add_special_tokens=*/false).size());

  nlohmann::json bad = req;
  bad["messages"] = {{{"role", "system"}, {"content", "S"}}, {{"role", "user"}, {"content", "U"}}};
  testing::Reply e = testing::post(c, "/v1/chat/completions", bad);
  EXPECT_EQ(e.status, 422) << e.body;
  EXPECT_NE(e.body.find("no system messages"), std::string::npos) << e.body;
  stack.stop();
}

}  // namespace
}  // namespace fineserve
