// The grammar engine: regex and JSON Schema -> DFA, accepted/rejected strings, token masks.
#include <gtest/gtest.h>

#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "engine/grammar/automaton.h"
#include "engine/grammar/grammar.h"
#include "engine/grammar/json_schema.h"
#include "engine/grammar/regex.h"
#include "kernels/base.h"
#include "models/tokenizer/tokenizer.h"

namespace fineserve::grammar {
namespace {

using json = nlohmann::ordered_json;

Dfa regex_dfa(const std::string& pattern) { return compile_dfa(*parse_regex(pattern)); }

struct RegexCase {
  std::string pattern;
  std::vector<std::string> accept, reject;
};

TEST(GrammarRegex, FullMatch) {
  const std::vector<RegexCase> cases = {
      {"abc", {"abc"}, {"", "ab", "abcd", "xabc"}},
      {"a|bc|", {"a", "bc", ""}, {"b", "abc"}},
      {"a*b+c?", {"b", "aab", "abbbc", "bc"}, {"", "a", "ac", "abcc"}},
      {"[a-c]{2,3}", {"ab", "cab", "ccc"}, {"a", "abca", "ad"}},
      {"x{3}", {"xxx"}, {"xx", "xxxx"}},
      {"x{2,}", {"xx", "xxxxxx"}, {"x"}},
      {"(ab)+", {"ab", "abab"}, {"", "aba"}},
      {"(?:a|b)(?P<n>c)(?<m>d)", {"acd", "bcd"}, {"cd"}},
      {"\\d+\\.\\d*", {"1.", "12.5"}, {".5", "a.1"}},
      {"\\w\\s\\W", {"a !", "_\t-"}, {"a a", "! !"}},
      {"[^a-z]", {"A", "0", "é", "€", "😀"}, {"a", "z", "", "AB"}},
      {".", {"a", "é", "😀"}, {"\n", "", "ab", "\xff"}},
      {"^[0-9a-f]+$", {"deadbeef"}, {"xyz", ""}},
      {"é+", {"é", "éé"}, {"e", "\xc3"}},
      {"[à-ÿ]", {"à", "ÿ", "é"}, {"a", "Ā"}},
      {"\\x41\\u00e9\\n", {"Aé\n"}, {"Ae\n"}},
      {"[\\d\\-x]", {"5", "-", "x"}, {"a"}},
      {"a.*?b", {"ab", "axxb"}, {"a"}},
      {"[]a]", {"]", "a"}, {"b"}},
      {"\\(\\)\\[\\]\\{\\}\\.\\*", {"()[]{}.*"}, {""}},
  };
  for (const auto& c : cases) {
    const Dfa d = regex_dfa(c.pattern);
    for (const auto& s : c.accept) EXPECT_TRUE(d.matches(s)) << c.pattern << " should match '" << s << "'";
    for (const auto& s : c.reject) EXPECT_FALSE(d.matches(s)) << c.pattern << " should not match '" << s << "'";
  }
}

TEST(GrammarRegex, UnsupportedConstructsNameThemselves) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"(a)\\1", "backreference"}, {"a(?=b)", "lookahead"}, {"(?<=a)b", "lookbehind"},
      {"\\bword", "word boundar"}, {"(?i)abc", "inline flags"}, {"a{2,1}", "m < n"},
      {"(ab", "missing ')'"}, {"ab)", "unbalanced"}, {"*a", "nothing to repeat"},
      {"[abc", "unterminated"}, {"a{99999}", "repetition count"}, {"[z-a]", "out of order"},
  };
  for (const auto& [pattern, needle] : cases) {
    try {
      parse_regex(pattern);
      ADD_FAILURE() << pattern << " parsed";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << pattern << ": " << e.what();
    }
  }
}

TEST(GrammarRegex, BlowUpStopsWithAClearError) {
  // Each would need millions of states; the limits stop them quickly instead.
  for (const char* p : {"(a{1000}){1000}", "((a|b){1000}){1000}", "[ab]*a[ab]{20}"}) {
    try {
      compile_dfa(*parse_regex(p), AutomatonLimits{.max_nfa_states = 200000, .max_dfa_states = 20000});
      ADD_FAILURE() << p << " compiled";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("too large"), std::string::npos) << e.what();
    }
  }
  try {
    parse_regex(std::string(200, '(') + "a" + std::string(200, ')'));
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("nested"), std::string::npos) << e.what();
  }
}

// ---- JSON Schema ------------------------------------------------------------------------------

struct SchemaCase {
  const char* name;
  json schema;
  std::vector<std::string> valid, invalid;
};

Dfa schema_dfa(const json& schema, int ws = 2) {
  JsonGrammarOptions o;
  o.max_whitespace = ws;
  return compile_dfa(*json_schema_grammar(schema, o));
}

TEST(GrammarJsonSchema, Corpus) {
  const std::vector<SchemaCase> cases = {
      {"integer", {{"type", "integer"}}, {"0", "-12", "1234567890"}, {"01", "1.5", "\"1\"", "-", "", "1e3"}},
      {"number", {{"type", "number"}}, {"0", "-1.25", "3e10", "2.5E-3"}, {".5", "1.", "+1", "NaN"}},
      {"boolean", {{"type", "boolean"}}, {"true", "false"}, {"True", "1", "null"}},
      {"null", {{"type", "null"}}, {"null"}, {"nul", "\"null\""}},
      {"string", {{"type", "string"}}, {"\"\"", "\"a b\"", "\"\\\"q\\\"\"", "\"\\u00e9\"", "\"é€😀\""},
       {"\"a", "\"a\"b\"", "\"\\x\"", "\"tab\there\"", "a"}},
      {"string lengths", {{"type", "string"}, {"minLength", 2}, {"maxLength", 3}}, {"\"ab\"", "\"abc\"", "\"éé\""}, {"\"a\"", "\"abcd\""}},
      {"type list", {{"type", json::array({"string", "null"})}}, {"\"x\"", "null"}, {"1"}},
      {"enum", {{"enum", json::array({"red", 1, nullptr, json::object({{"a", 1}})})}}, {"\"red\"", "1", "null", "{\"a\":1}"}, {"\"blue\"", "2"}},
      {"const", {{"const", "x"}}, {"\"x\""}, {"\"y\""}},
      {"object required",
       json::parse(R"({"type":"object","properties":{"a":{"type":"integer"},"b":{"type":"string"}},"required":["a"]})"),
       {"{\"a\":1}", "{\"a\":1,\"b\":\"x\"}", "{ \"a\" : 1 , \"b\" : \"x\" }", "{\n\"a\": 1\n}"},
       {"{}", "{\"b\":\"x\"}", "{\"a\":1,}", "{\"a\":1,\"c\":2}", "{\"a\":\"1\"}", "{\"a\":1   }"}},
      {"object optional only",
       json::parse(R"({"type":"object","properties":{"a":{"type":"integer"},"b":{"type":"integer"},"c":{"type":"integer"}}})"),
       {"{}", "{\"b\":2}", "{\"a\":1,\"c\":3}", "{\"a\":1,\"b\":2,\"c\":3}"}, {"{,}", "{\"a\":1\"b\":2}", "{\"c\":3,\"a\":1}", "{\"a\":1,}"}},
      {"additionalProperties schema",
       json::parse(R"({"type":"object","properties":{"a":{"type":"integer"}},"required":["a"],"additionalProperties":{"type":"boolean"}})"),
       {"{\"a\":1}", "{\"a\":1,\"x\":true,\"y\":false}"}, {"{\"a\":1,\"x\":1}", "{\"x\":true}"}},
      {"free object", {{"type", "object"}}, {"{}", "{\"k\":[1,{\"z\":null}]}"}, {"[]", "{\"k\"}"}},
      {"array bounds", json::parse(R"({"type":"array","items":{"type":"integer"},"minItems":1,"maxItems":3})"),
       {"[1]", "[1,2,3]", "[ 1 , 2 ]"}, {"[]", "[1,2,3,4]", "[1,]", "[\"a\"]"}},
      {"array any", {{"type", "array"}}, {"[]", "[1,\"a\",[true]]"}, {"[", "{}"}},
      {"prefixItems", json::parse(R"({"type":"array","prefixItems":[{"type":"string"},{"type":"integer"}],"items":false})"),
       {"[]", "[\"a\"]", "[\"a\",1]"}, {"[1]", "[\"a\",1,2]"}},
      {"nested + $defs",
       json::parse(R"({"type":"object","properties":{"p":{"$ref":"#/$defs/point"},"tags":{"type":"array","items":{"type":"string"}}},
                      "required":["p","tags"],"$defs":{"point":{"type":"object","properties":{"x":{"type":"number"},"y":{"type":"number"}},"required":["x","y"]}}})"),
       {"{\"p\":{\"x\":1,\"y\":2.5},\"tags\":[]}", "{\"p\":{\"x\":1,\"y\":2},\"tags\":[\"a\",\"b\"]}"}, {"{\"p\":{\"x\":1},\"tags\":[]}", "{\"tags\":[]}"}},
      {"recursive $ref",
       json::parse(R"({"type":"object","properties":{"v":{"type":"integer"},"next":{"anyOf":[{"$ref":"#"},{"type":"null"}]}},"required":["v","next"]})"),
       {"{\"v\":1,\"next\":null}", "{\"v\":1,\"next\":{\"v\":2,\"next\":null}}"}, {"{\"v\":1}", "{\"v\":1,\"next\":{\"v\":2}}"}},
      {"anyOf", json::parse(R"({"anyOf":[{"type":"integer"},{"type":"string","maxLength":1}]})"), {"5", "\"a\""}, {"\"ab\"", "true"}},
      {"allOf single", json::parse(R"({"allOf":[{"type":"boolean"}]})"), {"true"}, {"1"}},
      {"nullable", json::parse(R"({"type":"integer","nullable":true})"), {"3", "null"}, {"\"3\""}},
      {"integer range", json::parse(R"({"type":"integer","minimum":-5,"maximum":120})"),
       {"-5", "-1", "0", "9", "10", "99", "100", "120"}, {"-6", "121", "200", "1000", "-10"}},
      {"integer exclusive", json::parse(R"({"type":"integer","exclusiveMinimum":0,"exclusiveMaximum":10})"), {"1", "9"}, {"0", "10"}},
      {"integer minimum only", json::parse(R"({"type":"integer","minimum":18})"), {"18", "19", "99", "100", "123456"}, {"17", "0", "-1"}},
      {"pattern", json::parse(R"({"type":"string","pattern":"^[A-Z]{2}-\\d{3}$"})"), {"\"AB-123\""}, {"\"AB-12\"", "\"ab-123\""}},
      {"pattern cannot break out of the string", json::parse(R"({"type":"string","pattern":".*"})"), {"\"a b\"", "\"\""}, {"\"a\"b\"", "\"\\\""}},
      {"format date", json::parse(R"({"type":"string","format":"date"})"), {"\"2024-02-29\""}, {"\"2024-13-01\"", "\"24-01-01\""}},
      {"format date-time", json::parse(R"({"type":"string","format":"date-time"})"), {"\"2024-01-02T03:04:05Z\"", "\"2024-01-02T03:04:05.123+01:00\""}, {"\"2024-01-02 03:04:05\""}},
      {"format uuid", json::parse(R"({"type":"string","format":"uuid"})"), {"\"123e4567-e89b-12d3-a456-426614174000\""}, {"\"123e4567\""}},
      {"format ipv4", json::parse(R"({"type":"string","format":"ipv4"})"), {"\"192.168.0.1\""}, {"\"256.1.1.1\"", "\"1.2.3\""}},
      {"unknown format is an annotation", json::parse(R"({"type":"string","format":"uri"})"), {"\"anything\""}, {"1"}},
      {"true schema", json(true), {"1", "\"s\"", "{\"a\":[]}", "null"}, {"", "nul"}},
      {"annotations ignored", json::parse(R"({"title":"T","description":"d","default":1,"examples":[1],"type":"integer"})"), {"1"}, {"\"1\""}},
      {"escaped property name", json::parse(R"({"type":"object","properties":{"a\"b":{"type":"null"}},"required":["a\"b"]})"), {"{\"a\\\"b\":null}"}, {"{\"a\"b\":null}"}},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    const Dfa d = schema_dfa(c.schema);
    for (const auto& s : c.valid) EXPECT_TRUE(d.matches(s)) << c.name << ": should accept " << s;
    for (const auto& s : c.invalid) EXPECT_FALSE(d.matches(s)) << c.name << ": should reject " << s;
  }
}

TEST(GrammarJsonSchema, WhitespaceIsBounded) {
  const json schema = json::parse(R"({"type":"object","properties":{"a":{"type":"integer"}},"required":["a"]})");
  const Dfa compact = schema_dfa(schema, 0);
  EXPECT_TRUE(compact.matches("{\"a\":1}"));
  EXPECT_FALSE(compact.matches("{\"a\": 1}"));
  const Dfa two = schema_dfa(schema, 2);
  EXPECT_TRUE(two.matches("{\n \"a\":  1  }"));
  EXPECT_FALSE(two.matches("{\n  \"a\":1}"));
  EXPECT_FALSE(two.matches("{   \"a\":1}"));
}

TEST(GrammarJsonSchema, UnsupportedKeywordsAreNamed) {
  const std::vector<std::pair<json, std::string>> cases = {
      {json::parse(R"({"type":"object","properties":{"a":{"not":{"type":"string"}}}})"), "'not'"},
      {json::parse(R"({"type":"array","uniqueItems":true})"), "'uniqueItems'"},
      {json::parse(R"({"type":"object","patternProperties":{"^x":{}}})"), "'patternProperties'"},
      {json::parse(R"({"allOf":[{"type":"string"},{"maxLength":2}]})"), "'allOf'"},
      {json::parse(R"({"type":"number","minimum":0})"), "'minimum'"},
      {json::parse(R"({"$ref":"https://example.com/s.json"})"), "local references"},
      {json::parse(R"({"$ref":"#/$defs/missing"})"), "does not resolve"},
      {json::parse(R"({"type":"strange"})"), "unknown type 'strange'"},
      {json::parse(R"({"type":"string","pattern":"(a)\\1"})"), "backreference"},
      {json::parse(R"({"type":"string","maxLength":100000})"), "'maxLength'"},
      {json(false), "no JSON value"},
      {json(3), "must be an object or a boolean"},
  };
  for (const auto& [schema, needle] : cases) {
    try {
      json_schema_grammar(schema);
      ADD_FAILURE() << schema.dump() << " compiled";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << schema.dump() << ": " << e.what();
    }
  }
  // The message says where: a JSON pointer into the schema.
  try {
    json_schema_grammar(json::parse(R"({"type":"object","properties":{"deep":{"type":"array","items":{"not":{}}}}})"));
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("#/properties/deep/items"), std::string::npos) << e.what();
  }
}

json fifty_property_schema() {
  json props = json::object();
  json required = json::array();
  const char* types[] = {"string", "integer", "number", "boolean"};
  for (int i = 0; i < 50; ++i) {
    const std::string name = "field_" + std::to_string(i);
    props[name] = {{"type", types[i % 4]}};
    if (i % 3 == 0) required.push_back(name);
  }
  return {{"type", "object"}, {"properties", props}, {"required", required}};
}

TEST(GrammarJsonSchema, FiftyPropertiesCompile) {
  const Dfa d = schema_dfa(fifty_property_schema());
  EXPECT_GT(d.num_states(), 50);
  EXPECT_FALSE(d.matches("{}"));
}

// ---- Token masks --------------------------------------------------------------------------------

std::filesystem::path data_dir() { return std::filesystem::path(FINESERVE_TEST_DATA); }

const Tokenizer& tokenizer_named(const std::string& name) {
  static const std::unique_ptr<Tokenizer> gpt2 = load_tokenizer(data_dir() / "gpt2");
  static const std::unique_ptr<Tokenizer> spm = load_tokenizer(data_dir() / "spm");
  return name == "gpt2" ? *gpt2 : *spm;
}

std::shared_ptr<const VocabIndex> index_for(const Tokenizer& tok) {
  std::vector<int32_t> eos;
  if (tok.eos_id()) eos.push_back(*tok.eos_id());
  return VocabIndex::from_tokenizer(tok, tok.vocab_size(), eos);
}

// Walks random allowed tokens; at each step the trie-walk mask must equal the brute-force mask
// (every token's bytes run through the DFA), EOS only when accepting, and the text so far must be
// a prefix of the language.
void check_masks_against_brute_force(const std::string& tok_name, const NodePtr& root, int steps, uint32_t seed) {
  const Tokenizer& tok = tokenizer_named(tok_name);
  auto vocab = index_for(tok);
  auto g = compile_grammar(root, vocab);
  std::mt19937 rng(seed);
  GrammarConstraint c(g);
  int32_t state = g->dfa().start();
  bool first = true;
  for (int step = 0; step < steps; ++step) {
    const auto fast = c.allowed();
    const TokenMask slow = g->allowed_brute_force(state, first);
    ASSERT_EQ(fast->count, slow.count) << tok_name << " step " << step;
    ASSERT_EQ(fast->words, slow.words) << tok_name << " step " << step;
    for (int32_t id : vocab->eos_ids()) EXPECT_EQ(fast->test(id), g->dfa().accepting(state));
    if (fast->count == 0) break;
    std::vector<int32_t> ids;
    for (int32_t id = 0; id < vocab->size(); ++id)
      if (fast->test(id) && !vocab->is_eos(id)) ids.push_back(id);
    if (ids.empty()) break;
    const int32_t pick = ids[std::uniform_int_distribution<size_t>(0, ids.size() - 1)(rng)];
    ASSERT_TRUE(c.advance(pick));
    state = g->dfa().walk(state, first ? vocab->start_bytes(pick) : vocab->bytes(pick));
    first = false;
    ASSERT_GE(state, 0);
  }
}

TEST(GrammarMask, MatchesBruteForceOnGpt2) {
  check_masks_against_brute_force("gpt2", json_schema_grammar(fifty_property_schema()), 40, 1);
  check_masks_against_brute_force("gpt2", parse_regex("[0-9]{3}-(é|€|😀)+ ?[a-z]+"), 30, 2);
  check_masks_against_brute_force("gpt2", any_json_object(), 40, 3);
}

TEST(GrammarMask, MatchesBruteForceOnSentencePiece) {
  check_masks_against_brute_force("spm", json_schema_grammar(fifty_property_schema()), 40, 4);
  check_masks_against_brute_force("spm", parse_regex(" ?[A-Z][a-z]+ (é|€|😀)+"), 30, 5);
  check_masks_against_brute_force("spm", any_json_value(), 40, 6);
}

TEST(GrammarMask, MultiByteCharactersAcrossTokens) {
  // "😀" is 4 bytes; GPT-2 has no single token for it, so the only way is through partial-byte
  // tokens, which must be allowed midway.
  const Tokenizer& tok = tokenizer_named("gpt2");
  auto g = compile_grammar(parse_regex("😀"), index_for(tok));
  GrammarConstraint c(g);
  const std::vector<int32_t> ids = tok.encode("😀", false);
  ASSERT_GT(ids.size(), 1u);
  for (int32_t id : ids) {
    EXPECT_TRUE(c.allowed()->test(id));
    EXPECT_FALSE(c.is_accepting());
    ASSERT_TRUE(c.advance(id));
  }
  EXPECT_TRUE(c.is_accepting());
  // Only EOS may follow.
  EXPECT_EQ(c.allowed()->count, 1);
  EXPECT_TRUE(c.allowed()->test(*tok.eos_id()));
  EXPECT_TRUE(c.advance(*tok.eos_id()));
  EXPECT_TRUE(c.is_finished());
  EXPECT_TRUE(c.is_dead());
}

TEST(GrammarMask, DisallowedTokenKillsTheConstraint) {
  const Tokenizer& tok = tokenizer_named("gpt2");
  auto g = compile_grammar(parse_regex("[0-9]+"), index_for(tok));
  GrammarConstraint c(g);
  EXPECT_FALSE(c.allowed()->test(*tok.eos_id()));  // not accepting yet: no EOS
  EXPECT_FALSE(c.advance(tok.encode("abc", false)[0]));
  EXPECT_TRUE(c.is_dead());
  std::vector<float> logits(static_cast<size_t>(tok.vocab_size()), 1.0f);
  EXPECT_FALSE(c.mask_logits(logits.data(), tok.vocab_size()));
}

TEST(GrammarMask, MaskLogitsLeavesOnlyAllowedTokens) {
  const Tokenizer& tok = tokenizer_named("spm");
  auto g = compile_grammar(json_schema_grammar(json::parse(R"({"enum":["yes","no"]})")), index_for(tok));
  GrammarConstraint c(g);
  std::vector<float> logits(static_cast<size_t>(tok.vocab_size()), 0.5f);
  ASSERT_TRUE(c.mask_logits(logits.data(), tok.vocab_size()));
  std::vector<bool> allowed;
  c.allowed(allowed);
  for (int32_t id = 0; id < tok.vocab_size(); ++id) {
    EXPECT_EQ(std::isfinite(logits[static_cast<size_t>(id)]), allowed[static_cast<size_t>(id)]) << id;
    if (allowed[static_cast<size_t>(id)]) {
      std::string b;
      tok.append_token_bytes(id, true, true, b);
      EXPECT_TRUE(std::string("\"yes\"").starts_with(b) || std::string("\"no\"").starts_with(b)) << b;
    }
  }
}

// A random walk under the grammar always ends in text the schema accepts (checked by parsing it).
TEST(GrammarMask, RandomGenerationIsValidJson) {
  const Tokenizer& tok = tokenizer_named("gpt2");
  auto vocab = index_for(tok);
  const json schema = json::parse(R"({"type":"object","properties":{"name":{"type":"string","maxLength":8},
      "age":{"type":"integer","minimum":0,"maximum":150},"tags":{"type":"array","items":{"enum":["a","b"]},"maxItems":3}},
      "required":["name","age","tags"]})");
  auto g = compile_grammar(json_schema_grammar(schema), vocab);
  std::mt19937 rng(7);
  for (int trial = 0; trial < 20; ++trial) {
    GrammarConstraint c(g);
    std::vector<int32_t> out;
    for (int step = 0; step < 400 && !c.is_finished(); ++step) {
      const auto m = c.allowed();
      ASSERT_GT(m->count, 0);
      std::vector<int32_t> ids;
      for (int32_t id = 0; id < vocab->size(); ++id)
        if (m->test(id)) ids.push_back(id);
      // Prefer EOS once allowed, short tokens otherwise, so that walks end.
      int32_t pick = ids[std::uniform_int_distribution<size_t>(0, ids.size() - 1)(rng)];
      if (m->test(*tok.eos_id()) && step > 5) pick = *tok.eos_id();
      ASSERT_TRUE(c.advance(pick));
      if (!vocab->is_eos(pick)) out.push_back(pick);
    }
    if (!c.is_finished()) continue;  // ran out of steps inside a long string: nothing to check
    const json v = json::parse(tok.decode(out));
    EXPECT_TRUE(v["name"].is_string());
    EXPECT_LE(v["name"].get<std::string>().size(), 8u * 4);
    EXPECT_TRUE(v["age"].is_number_integer());
    EXPECT_LE(v["age"].get<int>(), 150);
    EXPECT_LE(v["tags"].size(), 3u);
  }
}

}  // namespace
}  // namespace fineserve::grammar
