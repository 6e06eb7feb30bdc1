// The tokenizers against Hugging Face: every reference string of tests/data/gpt2/reference.json
// must encode to exactly HF's ids and decode to exactly HF's text.
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "kernels/base.h"
#include "models/tokenizer/bpe.h"
#include "models/tokenizer/pretokenize.h"
#include "models/tokenizer/tokenizer.h"
#include "tests/tokenizer/tokenizer_test_util.h"

namespace fineserve {
namespace {

using nlohmann::json;
using namespace tokenizer_testing;

std::string escaped(const std::string& s) { return json(s).dump(); }

// Checks every case of one reference tokenizer; counts failures so that one bug does not print
// hundreds of cases.
void check_cases(const Tokenizer& tok, const json& section) {
  ASSERT_FALSE(section.at("cases").empty());
  int failures = 0;
  for (const json& c : section.at("cases")) {
    const std::string text = c.at("text");
    const auto ids = c.at("ids").get<std::vector<int32_t>>();
    const auto ids_plain = c.at("ids_plain").get<std::vector<int32_t>>();
    const bool ok = tok.encode(text, true) == ids && tok.encode(text, false) == ids_plain &&
                    tok.decode(ids, false) == c.at("decoded").get<std::string>() &&
                    tok.decode(ids, true) == c.at("decoded_skip_special").get<std::string>();
    if (!ok && ++failures <= 5) {
      ADD_FAILURE() << "text " << escaped(text) << "\n  ids       " << json(tok.encode(text, true))
                    << "\n  expected  " << json(ids) << "\n  plain     " << json(tok.encode(text, false))
                    << "\n  expected  " << json(ids_plain) << "\n  decoded   " << escaped(tok.decode(ids, false))
                    << "\n  expected  " << escaped(c.at("decoded")) << "\n  skipping  "
                    << escaped(tok.decode(ids, true)) << "\n  expected  " << escaped(c.at("decoded_skip_special"));
    }
  }
  EXPECT_EQ(failures, 0) << "of " << section.at("cases").size() << " cases";
  EXPECT_EQ(tok.vocab_size(), section.at("vocab_size").get<int32_t>());
  EXPECT_EQ(tok.bos_id(), section.at("bos_id").get<int32_t>());
}

TEST(TokenizerReference, Gpt2VocabMerges) {
  const json& section = reference().at("gpt2");
  check_cases(gpt2(), section);
  EXPECT_EQ(gpt2().eos_id(), section.at("eos_id").get<int32_t>());
}

TEST(TokenizerReference, Gpt2DecodeArbitraryIds) {
  // Random ids, many of them single bytes >= 0x80: truncated and invalid UTF-8 must become U+FFFD
  // exactly where HF puts it.
  int failures = 0;
  for (const json& c : reference().at("gpt2").at("decode_cases")) {
    const auto ids = c.at("ids").get<std::vector<int32_t>>();
    const std::string got = gpt2().decode(ids, false);
    if (got != c.at("decoded").get<std::string>() && ++failures <= 5) {
      ADD_FAILURE() << json(ids) << " -> " << escaped(got) << ", expected " << escaped(c.at("decoded"));
    }
    EXPECT_EQ(gpt2().decode(ids, true), c.at("decoded_skip_special").get<std::string>());
  }
  EXPECT_EQ(failures, 0);
}

// Writes the reference tokenizer.json (stored without vocab and merges) with the GPT-2 vocab and
// merges filled back in, merges either as pairs (what tokenizers writes now) or "a b" strings.
void write_tokenizer_json(const std::filesystem::path& dir, bool merges_as_pairs, bool add_prefix_space = false) {
  json tj = reference().at("tokenizer_json").at("tokenizer");
  tj["pre_tokenizer"]["add_prefix_space"] = add_prefix_space;
  tj["model"]["vocab"] = read_json_file(gpt2_dir() / "vocab.json");
  json merges = json::array();
  const std::string text = read_text_file(gpt2_dir() / "merges.txt");
  size_t pos = 0;
  while (pos < text.size()) {
    size_t end = text.find('\n', pos);
    if (end == std::string::npos) end = text.size();
    const std::string line = text.substr(pos, end - pos);
    pos = end + 1;
    if (line.empty() || line.starts_with("#version")) continue;
    const size_t space = line.find(' ');
    if (merges_as_pairs) {
      merges.push_back(json::array({line.substr(0, space), line.substr(space + 1)}));
    } else {
      merges.push_back(line);
    }
  }
  tj["model"]["merges"] = merges;
  write_file(dir / "tokenizer.json", tj.dump());
}

TEST(TokenizerReference, TokenizerJsonWithAddedTokensAndBosTemplate) {
  ASSERT_EQ(reference().at("tokenizer_json").at("merges_format"), "pairs");
  for (const bool pairs : {true, false}) {
    SCOPED_TRACE(pairs ? "merges as pairs" : "merges as strings");
    TempDir dir;
    write_tokenizer_json(dir.path(), pairs);
    const auto tok = load_tokenizer(dir.path());
    check_cases(*tok, reference().at("tokenizer_json"));
    // The template puts <|endoftext|> first; nothing names an EOS.
    EXPECT_EQ(tok->encode("Hi", true).front(), 50256);
    EXPECT_FALSE(tok->eos_id().has_value());
  }
}

TEST(TokenizerReference, TokenizerJsonWithPrefixSpace) {
  TempDir dir;
  write_tokenizer_json(dir.path(), true, /*add_prefix_space=*/true);
  check_cases(*load_tokenizer(dir.path()), reference().at("tokenizer_json_prefix_space"));
}

// SmolLM2's pre-tokenizer: Sequence[Digits, ByteLevel], digits isolated one by one or as runs.
TEST(TokenizerReference, TokenizerJsonWithDigitsPreTokenizer) {
  for (const char* name : {"tokenizer_json_digits", "tokenizer_json_digit_runs"}) {
    SCOPED_TRACE(name);
    const json& section = reference().at(name);
    TempDir dir;
    write_tokenizer_json(dir.path(), true);
    json tj = read_json_file(dir.path() / "tokenizer.json");
    tj["pre_tokenizer"] = section.at("pre_tokenizer");
    write_file(dir.path() / "tokenizer.json", tj.dump());
    check_cases(*load_tokenizer(dir.path()), section);
  }
}

// Llama 3's pre-tokenizer, Sequence[Split(regex), ByteLevel(use_regex false)], and Qwen2's (single
// digits): the splitter's pieces as the tokenizers library's pre_tokenize_str gives them (in the
// byte-level alphabet), and the ids of whole encodings.
TEST(TokenizerReference, TokenizerJsonWithSplitRegexPreTokenizer) {
  for (const auto& [name, max_digits] : {std::pair{"tokenizer_json_llama3_split", 3}, {"tokenizer_json_qwen2_split", 1}}) {
    SCOPED_TRACE(name);
    const json& section = reference().at(name);
    std::vector<std::string_view> pieces;
    for (const auto& c : section.at("pieces")) {
      const std::string text = c[0];
      split_llama3_pretokens(text, max_digits, pieces);
      std::vector<std::string> mapped;
      for (std::string_view p : pieces) {
        std::string m;
        for (const char ch : p) m += gpt2_byte_chars()[static_cast<uint8_t>(ch)];
        mapped.push_back(m);
      }
      EXPECT_EQ(mapped, c[1].get<std::vector<std::string>>()) << json(text).dump();
    }
    TempDir dir;
    write_tokenizer_json(dir.path(), true);
    json tj = read_json_file(dir.path() / "tokenizer.json");
    tj["pre_tokenizer"] = section.at("pre_tokenizer");
    write_file(dir.path() / "tokenizer.json", tj.dump());
    check_cases(*load_tokenizer(dir.path()), section);
  }
}

TEST(TokenizerReference, UnknownSplitRegexIsRefused) {
  TempDir dir;
  write_tokenizer_json(dir.path(), true);
  json tj = read_json_file(dir.path() / "tokenizer.json");
  json split = reference().at("tokenizer_json_llama3_split").at("pre_tokenizer");
  split["pretokenizers"][0]["pattern"]["Regex"] = "\\w+|\\s+";
  tj["pre_tokenizer"] = split;
  write_file(dir.path() / "tokenizer.json", tj.dump());
  try {
    load_tokenizer(dir.path());
    FAIL() << "an unknown Split regex was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("is not supported"), std::string::npos) << e.what();
  }
  split["pretokenizers"][0]["pattern"]["Regex"] = reference().at("tokenizer_json_llama3_split")
      .at("pre_tokenizer")["pretokenizers"][0]["pattern"]["Regex"];
  split["pretokenizers"][0]["behavior"] = "Removed";
  tj["pre_tokenizer"] = split;
  write_file(dir.path() / "tokenizer.json", tj.dump());
  EXPECT_THROW(load_tokenizer(dir.path()), Error);
}

TEST(TokenizerReference, TokenizerJsonIsPreferredOverVocabMerges) {
  TempDir dir;
  write_tokenizer_json(dir.path(), true);
  copy_gpt2_files(dir.path());  // present too, but tokenizer.json decides (its BOS template)
  EXPECT_EQ(load_tokenizer(dir.path())->encode("Hello", true), (std::vector<int32_t>{50256, 15496}));
}

TEST(TokenizerReference, OptStyleConfigAddsBos) {
  TempDir dir;
  copy_gpt2_files(dir.path());
  const json& section = reference().at("opt_style");
  write_file(dir / "tokenizer_config.json", section.at("tokenizer_config").dump());
  const auto tok = load_tokenizer(dir.path());
  check_cases(*tok, section);
  EXPECT_EQ(tok->eos_id(), section.at("eos_id").get<int32_t>());
  EXPECT_EQ(tok->token_to_id("</s>"), section.at("bos_id").get<int32_t>());
  EXPECT_TRUE(tok->is_special(*tok->token_to_id("<pad>")));
  EXPECT_FALSE(tok->is_special(50256));  // <|endoftext|> is plain vocabulary here
}

TEST(TokenizerReference, SpecialTokensMapOverridesTheConfig) {
  // What transformers 5 does with these files (checked by hand with AutoTokenizer).
  TempDir dir;
  copy_gpt2_files(dir.path());
  write_file(dir / "tokenizer_config.json",
             R"({"tokenizer_class": "GPT2Tokenizer", "add_bos_token": true, "bos_token": "</s>"})");
  write_file(dir / "special_tokens_map.json",
             R"({"bos_token": "<bos>", "eos_token": {"content": "<eos>"}, "pad_token": null})");
  const auto tok = load_tokenizer(dir.path());
  // New ids in transformers' order: bos, then eos; unk stays GPT-2's default.
  EXPECT_EQ(tok->bos_id(), 50257);
  EXPECT_EQ(tok->token_to_id("<bos>"), 50257);
  EXPECT_EQ(tok->eos_id(), 50258);
  EXPECT_EQ(tok->vocab_size(), 50259);
  EXPECT_FALSE(tok->token_to_id("</s>").has_value());
  EXPECT_EQ(tok->encode("a<eos>", true), (std::vector<int32_t>{50257, 64, 50258}));
  EXPECT_EQ(tok->decode(tok->encode("a<eos>", true), false), "<bos>a<eos>");
  EXPECT_EQ(tok->decode(tok->encode("a<eos>", true), true), "a");
}

}  // namespace
}  // namespace fineserve
