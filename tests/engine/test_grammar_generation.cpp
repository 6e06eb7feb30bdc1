// Constrained generation through the engine on golden models: every output of a constrained
// request parses and validates, regex outputs match fully (checked with std::regex, not with the
// grammar engine), and constrained requests batch with unconstrained ones.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <regex>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "engine/engine.h"
#include "engine/grammar/grammar.h"
#include "engine/grammar/json_schema.h"
#include "engine/grammar/regex.h"
#include "kernels/backend.h"
#include "models/model.h"
#include "models/tokenizer/tokenizer.h"

namespace fineserve {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::ordered_json;

const fs::path kGolden = fs::path(FINESERVE_TEST_DATA) / "golden";

struct Loaded {
  std::unique_ptr<Backend> backend;
  std::unique_ptr<Model> model;
  std::unique_ptr<Tokenizer> tok;
  std::shared_ptr<const grammar::VocabIndex> vocab;
};

Loaded load(const std::string& name) {
  Loaded l;
  l.backend = make_cpu_backend();
  l.model = load_model(kGolden / name, *l.backend);
  l.tok = load_tokenizer(kGolden / name);
  l.vocab = grammar::VocabIndex::from_tokenizer(*l.tok, static_cast<int32_t>(l.model->info().vocab_size),
                                                {static_cast<int32_t>(l.model->info().eos_token_id)});
  return l;
}

class GrammarGeneration : public ::testing::TestWithParam<std::string> {};

TEST_P(GrammarGeneration, OutputsParseValidateAndBatchWithUnconstrained) {
  Loaded l = load(GetParam());
  const json schema = json::parse(R"({"type":"object","properties":{
      "name":{"type":"string","maxLength":6},
      "age":{"type":"integer","minimum":0,"maximum":99},
      "ok":{"type":"boolean"},
      "kind":{"enum":["cat","dog"]}},
    "required":["name","age","ok","kind"]})");
  grammar::JsonGrammarOptions jo;
  jo.max_whitespace = 1;
  auto json_grammar = grammar::compile_grammar(grammar::json_schema_grammar(schema, jo), l.vocab);
  const std::string pattern = "[a-z]{2,4}-[0-9]{2}";
  auto regex_grammar = grammar::compile_grammar(grammar::parse_regex(pattern), l.vocab);

  EngineConfig ec;
  ec.num_blocks = 256;
  Engine engine(*l.model, l.tok.get(), ec);
  std::vector<GenerationRequest> reqs;
  const std::vector<int32_t> prompt = l.tok->encode("Describe a pet as JSON:");
  for (int i = 0; i < 6; ++i) {
    GenerationRequest r;
    r.prompt = prompt;
    // As long as the context allows (the engine asserts requests fit, as the API resolves them).
    r.stop.max_new_tokens = static_cast<int>(std::min<int64_t>(120, l.model->info().max_context - static_cast<int64_t>(prompt.size())));
    r.sampling.do_sample = i > 0;  // one greedy, the rest sampled at a high temperature
    r.sampling.temperature = 1.5f;
    r.sampling.seed = static_cast<uint64_t>(i);
    r.grammar = i % 3 == 2 ? nullptr : (i % 3 == 0 ? json_grammar : regex_grammar);
    if (!r.grammar) r.stop.max_new_tokens = 20;  // only needs to share steps with the others
    reqs.push_back(r);
  }
  const auto results = engine.generate(reqs);
  ASSERT_EQ(results.size(), reqs.size());
  for (size_t i = 0; i < results.size(); ++i) {
    const auto& res = results[i];
    if (!reqs[i].grammar) {
      EXPECT_FALSE(res.tokens.empty());  // unconstrained: ran beside the others
      continue;
    }
    SCOPED_TRACE("request " + std::to_string(i) + ": " + res.text);
    // 120 tokens are enough for these grammars: every constrained output is complete.
    ASSERT_NE(res.finish, FinishReason::Length);
    if (reqs[i].grammar == regex_grammar) {
      EXPECT_TRUE(std::regex_match(res.text, std::regex(pattern)));
      continue;
    }
    const auto v = nlohmann::json::parse(res.text);
    ASSERT_TRUE(v.is_object());
    EXPECT_EQ(v.size(), 4u);
    EXPECT_TRUE(v["name"].is_string());
    EXPECT_TRUE(v["age"].is_number_integer());
    EXPECT_GE(v["age"].get<int>(), 0);
    EXPECT_LE(v["age"].get<int>(), 99);
    EXPECT_TRUE(v["ok"].is_boolean());
    EXPECT_TRUE(v["kind"] == "cat" || v["kind"] == "dog");
  }
}

// With EOS ignored, a grammar that is complete ends the request with its own finish reason
// instead of running to max_new_tokens.
TEST_P(GrammarGeneration, CompleteGrammarWithoutEosEndsWithGrammarEnd) {
  Loaded l = load(GetParam());
  auto g = grammar::compile_grammar(grammar::parse_regex("(yes|no)"), l.vocab);
  EngineConfig ec;
  ec.num_blocks = 64;
  Engine engine(*l.model, l.tok.get(), ec);
  GenerationRequest r;
  r.prompt = l.tok->encode("Answer:");
  r.stop.max_new_tokens = 50;
  r.ignore_eos = true;
  r.grammar = g;
  const auto res = engine.generate({r});
  EXPECT_EQ(res[0].finish, FinishReason::GrammarEnd);
  EXPECT_TRUE(res[0].text == "yes" || res[0].text == "no") << res[0].text;
  EXPECT_EQ(finish_reason_name(res[0].finish), "grammar_end");
}

INSTANTIATE_TEST_SUITE_P(Golden, GrammarGeneration, ::testing::Values("opt-preln", "llama-gqa"));

}  // namespace
}  // namespace fineserve
