// Bad tokenizer folders: every failure is a fineserve::Error whose message names the file (and
// the field) at fault.
#include <string>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "models/tokenizer/tokenizer.h"
#include "tests/tokenizer/tokenizer_test_util.h"

namespace fineserve {
namespace {

using namespace tokenizer_testing;
using ::testing::HasSubstr;

std::string load_error(const std::filesystem::path& dir) {
  return error_of([&] { load_tokenizer(dir); });
}

TEST(TokenizerErrors, NoTokenizerFiles) {
  TempDir dir;
  const std::string msg = load_error(dir.path());
  EXPECT_THAT(msg, HasSubstr("no tokenizer in " + dir.path().string()));
  EXPECT_THAT(msg, HasSubstr("need tokenizer.json or vocab.json + merges.txt"));
  write_file(dir / "vocab.json", "{}");
  EXPECT_THAT(load_error(dir.path()), HasSubstr("found vocab.json but no merges.txt"));
  EXPECT_THAT(load_error(dir / "missing"), HasSubstr("does not exist"));
}

TEST(TokenizerErrors, CorruptVocabJson) {
  TempDir dir;
  copy_gpt2_files(dir.path());
  write_file(dir / "vocab.json", "{\"a\": 0, \"b\": ");
  EXPECT_THAT(load_error(dir.path()), HasSubstr((dir / "vocab.json").string() + ": invalid JSON"));
  write_file(dir / "vocab.json", "[1, 2]");
  EXPECT_THAT(load_error(dir.path()), HasSubstr("vocab.json: expected an object"));
  write_file(dir / "vocab.json", R"({"a": 0, "b": "one"})");
  EXPECT_THAT(load_error(dir.path()), HasSubstr("vocab.json: id of \"b\" is not an integer"));
  write_file(dir / "vocab.json", R"({"a": -4})");
  EXPECT_THAT(load_error(dir.path()), HasSubstr("out of range"));
  write_file(dir / "vocab.json", R"({"a": 4000000000})");
  EXPECT_THAT(load_error(dir.path()), HasSubstr("out of range"));
}

TEST(TokenizerErrors, CorruptMerges) {
  TempDir dir;
  copy_gpt2_files(dir.path());
  write_file(dir / "merges.txt", "#version: 0.2\n\xC4\xA0 t\nthree parts here\n");
  EXPECT_THAT(load_error(dir.path()), HasSubstr((dir / "merges.txt").string() + " line 3"));
  write_file(dir / "merges.txt", "#version: 0.2\nnosuchtoken t\n");
  const std::string msg = load_error(dir.path());
  EXPECT_THAT(msg, HasSubstr("merges.txt: merge 1"));
  EXPECT_THAT(msg, HasSubstr("\"nosuchtoken\" is not in the vocabulary"));
  std::filesystem::permissions(dir / "merges.txt", std::filesystem::perms::none);
  if (::access((dir / "merges.txt").c_str(), R_OK) != 0) {  // root reads anyway
    EXPECT_THAT(load_error(dir.path()), HasSubstr("cannot open " + (dir / "merges.txt").string()));
  }
}

TEST(TokenizerErrors, CorruptSideFiles) {
  TempDir dir;
  copy_gpt2_files(dir.path());
  write_file(dir / "tokenizer_config.json", "{not json");
  EXPECT_THAT(load_error(dir.path()), HasSubstr("tokenizer_config.json: invalid JSON"));
  write_file(dir / "tokenizer_config.json", R"({"bos_token": 7})");
  EXPECT_THAT(load_error(dir.path()), HasSubstr("tokenizer_config.json \"bos_token\""));
  write_file(dir / "tokenizer_config.json", R"({"add_bos_token": "yes"})");
  EXPECT_THAT(load_error(dir.path()), HasSubstr("\"add_bos_token\" must be true or false"));
  write_file(dir / "tokenizer_config.json", R"({"added_tokens_decoder": {"x": {"content": "<a>"}}})");
  EXPECT_THAT(load_error(dir.path()), HasSubstr("added_tokens_decoder[\"x\"]"));
  write_file(dir / "tokenizer_config.json", "{}");
  write_file(dir / "special_tokens_map.json", R"({"eos_token": {"contents": "</s>"}})");
  EXPECT_THAT(load_error(dir.path()), HasSubstr("special_tokens_map.json \"eos_token\""));
}

// A minimal tokenizer.json around the given model and pieces.
nlohmann::json tokenizer_json(nlohmann::json model) {
  return {{"version", "1.0"},
          {"added_tokens", nlohmann::json::array()},
          {"normalizer", nullptr},
          {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}}},
          {"post_processor", nullptr},
          {"decoder", {{"type", "ByteLevel"}}},
          {"model", std::move(model)}};
}

nlohmann::json tiny_bpe() {
  return {{"type", "BPE"}, {"vocab", {{"a", 0}, {"b", 1}, {"ab", 2}}}, {"merges", {"a b"}}};
}

TEST(TokenizerErrors, TokenizerJsonTinyModelLoads) {
  TempDir dir;
  write_file(dir / "tokenizer.json", tokenizer_json(tiny_bpe()).dump());
  const auto tok = load_tokenizer(dir.path());
  EXPECT_EQ(tok->encode("abab"), (std::vector<int32_t>{2, 2}));
  EXPECT_EQ(tok->decode(std::vector<int32_t>{2, 0}), "aba");
}

TEST(TokenizerErrors, TokenizerJsonUnsupported) {
  TempDir dir;
  const std::string file = (dir / "tokenizer.json").string();
  auto expect_error = [&](const nlohmann::json& j, const std::string& needle) {
    write_file(dir / "tokenizer.json", j.dump());
    const std::string msg = load_error(dir.path());
    EXPECT_THAT(msg, HasSubstr(file));
    EXPECT_THAT(msg, HasSubstr(needle));
  };
  expect_error(tokenizer_json({{"type", "Unigram"}, {"vocab", nlohmann::json::array()}}),
               "tokenizer model type \"Unigram\" is not supported");
  expect_error(tokenizer_json({{"type", "WordPiece"}, {"vocab", nlohmann::json::object()}}), "\"WordPiece\"");
  auto j = tokenizer_json(tiny_bpe());
  j["model"]["byte_fallback"] = true;
  expect_error(j, "byte_fallback");
  j = tokenizer_json(tiny_bpe());
  j["normalizer"] = {{"type", "NFC"}};
  expect_error(j, "normalizer: \"NFC\" is not supported");
  j = tokenizer_json(tiny_bpe());
  j["pre_tokenizer"] = {{"type", "Metaspace"}, {"replacement", "_"}};
  expect_error(j, "only ByteLevel, optionally after Digits");
  j = tokenizer_json(tiny_bpe());
  j["decoder"] = {{"type", "WordPiece"}};
  expect_error(j, "decoder \"WordPiece\" is not supported");
  j = tokenizer_json(tiny_bpe());
  j["post_processor"] = {{"type", "Mystery"}};
  expect_error(j, "post-processor \"Mystery\" is not supported");
  j = tokenizer_json(tiny_bpe());
  j["model"]["merges"] = {"a b c"};
  expect_error(j, "model.merges[0]");
  j = tokenizer_json(tiny_bpe());
  j["model"]["merges"] = nlohmann::json::array({nlohmann::json::array({"a", "zz"})});
  expect_error(j, "\"zz\" is not in the vocabulary");
  j = tokenizer_json(tiny_bpe());
  j["added_tokens"] = {{{"id", 5}}};
  expect_error(j, "added_tokens[0]: no string \"content\"");
  j = tokenizer_json(tiny_bpe());
  j["model"].erase("vocab");
  expect_error(j, "no \"vocab\"");
  write_file(dir / "tokenizer.json", "{\"model\": ");
  EXPECT_THAT(load_error(dir.path()), HasSubstr(file + ": invalid JSON"));
  write_file(dir / "tokenizer.json", "");
  EXPECT_THAT(load_error(dir.path()), HasSubstr(file + ": invalid JSON"));
}

TEST(TokenizerErrors, TemplateNamesAnUnknownId) {
  TempDir dir;
  auto j = tokenizer_json(tiny_bpe());
  j["post_processor"] = nlohmann::json::parse(R"({"type": "TemplateProcessing",
      "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
      "special_tokens": {"<s>": {"id": "<s>", "ids": [9], "tokens": ["<s>"]}}})");
  write_file(dir / "tokenizer.json", j.dump());
  EXPECT_THAT(load_error(dir.path()), HasSubstr(
      (dir / "tokenizer.json").string() + ": post-processor id 9 names no token"));
  // The same template with an id that exists: prepended by encode(add_special_tokens=true).
  j["post_processor"]["special_tokens"]["<s>"]["ids"] = {1};
  write_file(dir / "tokenizer.json", j.dump());
  const auto tok = load_tokenizer(dir.path());
  EXPECT_EQ(tok->encode("a"), (std::vector<int32_t>{1, 0}));
  EXPECT_EQ(tok->encode("a", false), (std::vector<int32_t>{0}));
  EXPECT_EQ(tok->bos_id(), 1);
}

}  // namespace
}  // namespace fineserve
