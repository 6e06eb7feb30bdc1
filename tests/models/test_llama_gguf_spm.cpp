// A GGUF with a SentencePiece vocabulary (tokenizer.ggml.model "llama"), made by llama.cpp's gguf-py
// from tests/data/spm's tokenizer.model as convert_hf_to_gguf.py writes one, with the llama-gqa
// golden model's weights (tests/checkpoint/make_gguf_fixtures.py): imported, its tokenizer must
// give transformers' ids for the original tokenizer.model (tests/data/spm/reference.json), and the
// model transformers' logits and greedy tokens.
#include <algorithm>
#include <filesystem>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "kernels/backend.h"
#include "models/checkpoint/gguf_import.h"
#include "models/model.h"
#include "models/tokenizer/hf_config.h"
#include "models/tokenizer/sentencepiece.h"
#include "models/tokenizer/tokenizer.h"
#include "tests/checkpoint/gguf_test_writer.h"
#include "tests/models/golden_util.h"

namespace fineserve {
namespace {
namespace fs = std::filesystem;
using nlohmann::json;
using testing::Scratch;

const fs::path kData = fs::path(FINESERVE_TEST_DATA);
const fs::path kSpmGguf = kData / "gguf" / "tiny-llama-spm.gguf";

const json& spm_reference() {
  static const json ref = read_json_file(kData / "spm" / "reference.json");
  return ref;
}

fs::path import_to(const fs::path& gguf, const fs::path& out) {
  ckpt::GgufImportOptions o;
  o.gguf = gguf;
  o.out = out;
  ckpt::import_gguf(o);
  return out;
}

// The fixture with its metadata changed, written to `path`.
fs::path variant(const fs::path& path, const std::vector<std::pair<std::string, bool>>& flags) {
  ckpt::gguf_testing::Model m = ckpt::gguf_testing::model_of(kSpmGguf);
  for (const auto& [key, value] : flags) {
    ckpt::gguf::Value v;
    v.type = ckpt::gguf::ValueType::Bool;
    v.data = value;
    if (ckpt::gguf::Value* old = m.find(key)) {
      *old = v;
    } else {
      m.metadata.emplace_back(key, v);
    }
  }
  ckpt::gguf_testing::write_file_bytes(path, m.build());
  return path;
}

std::string streamed(const Tokenizer& tok, const std::vector<int32_t>& ids, bool skip_special) {
  StreamDecoder stream(tok, skip_special);
  std::string all;
  for (int32_t id : ids) all += stream.feed(id);
  return all + stream.flush();
}

// Every case of a reference.json section: ids with and without special tokens, decoded and streamed
// text with and without them. Counts failures so that one bug does not print hundreds.
void expect_reference(const Tokenizer& tok, const std::string& section_name) {
  SCOPED_TRACE(section_name);
  const json& section = spm_reference().at(section_name);
  int failures = 0;
  for (const json& c : section.at("cases")) {
    const std::string text = c.at("text");
    const auto ids = c.at("ids").get<std::vector<int32_t>>();
    const std::string decoded = c.at("decoded"), decoded_skip = c.at("decoded_skip_special");
    const bool ok = tok.encode(text, true) == ids && tok.encode(text, false) == c.at("ids_plain").get<std::vector<int32_t>>() &&
                    tok.decode(ids, false) == decoded && tok.decode(ids, true) == decoded_skip &&
                    streamed(tok, ids, false) == decoded && streamed(tok, ids, true) == decoded_skip;
    if (!ok && ++failures <= 5)
      ADD_FAILURE() << json(text).dump() << ": ids " << json(tok.encode(text, true)) << ", expected " << json(ids)
                    << "; decoded " << json(tok.decode(ids, false)).dump() << ", expected " << json(decoded).dump();
  }
  EXPECT_EQ(failures, 0) << "of " << section.at("cases").size() << " cases";
  EXPECT_EQ(tok.vocab_size(), section.at("vocab_size").get<int32_t>());
  EXPECT_EQ(tok.bos_id(), section.at("bos_id").get<int32_t>());
  EXPECT_EQ(tok.eos_id(), section.at("eos_id").get<int32_t>());
}

TEST(LlamaGgufSpm, ImportedTokenizerMatchesTransformers) {
  Scratch tmp;
  const fs::path out = import_to(kSpmGguf, tmp.path() / "hf");
  EXPECT_TRUE(fs::exists(out / "tokenizer.model"));
  EXPECT_FALSE(fs::exists(out / "tokenizer.json"));  // load_tokenizer would prefer it
  const json tc = read_json_file(out / "tokenizer_config.json");
  EXPECT_EQ(tc["tokenizer_class"], "LlamaTokenizer");
  EXPECT_EQ(tc["bos_token"], "<s>");
  EXPECT_EQ(tc["eos_token"], "</s>");
  EXPECT_EQ(tc["unk_token"], "<unk>");
  EXPECT_EQ(tc["add_bos_token"], true);
  EXPECT_EQ(tc["legacy"], false);
  EXPECT_NE(tc["chat_template"].get<std::string>().find("[INST]"), std::string::npos);

  const auto tok = load_tokenizer(out);
  const auto* spm = dynamic_cast<const SentencePieceTokenizer*>(tok.get());
  ASSERT_NE(spm, nullptr);
  EXPECT_EQ(spm->prefix_rule(), PrefixRule::kFirst);
  expect_reference(*tok, "llama2");

  // Whole characters spelled in byte tokens, specials, lone '▁'s: decoded as transformers does.
  int failures = 0;
  for (const json& c : spm_reference().at("llama2").at("decode_cases")) {
    const auto ids = c.at("ids").get<std::vector<int32_t>>();
    if ((tok->decode(ids, false) != c.at("decoded") || tok->decode(ids, true) != c.at("decoded_skip_special")) &&
        ++failures <= 5)
      ADD_FAILURE() << json(ids) << " -> " << json(tok->decode(ids, false)).dump();
  }
  EXPECT_EQ(failures, 0);

  // Every id names the original's token, special exactly where the original's is.
  const auto original = load_tokenizer(kData / "spm");
  ASSERT_EQ(tok->vocab_size(), original->vocab_size());
  for (int32_t id = 0; id < tok->vocab_size(); ++id) {
    EXPECT_EQ(tok->id_to_token(id), original->id_to_token(id)) << id;
    EXPECT_EQ(tok->is_special(id), original->is_special(id)) << id;
  }
}

// The written tokenizer.model stands in for the original under every tokenizer_config.json of the
// reference, added tokens and the legacy rule included.
TEST(LlamaGgufSpm, TokenizerModelActsAsTheOriginalUnderEveryConfig) {
  Scratch tmp;
  const fs::path out = import_to(kSpmGguf, tmp.path() / "hf");
  for (const char* section : {"llama2", "legacy", "bos_eos", "added_tokens", "no_prefix_space"}) {
    const fs::path dir = tmp.path() / section;
    fs::create_directories(dir);
    fs::copy_file(out / "tokenizer.model", dir / "tokenizer.model");
    ckpt::gguf_testing::write_file_bytes(dir / "tokenizer_config.json",
                                         spm_reference().at(section).at("tokenizer_config").dump());
    expect_reference(*load_tokenizer(dir), section);
  }
}

// The GGUF keys llama.cpp reads for a SentencePiece vocabulary: add_space_prefix, add_bos_token and
// add_eos_token, carried into tokenizer_config.json.
TEST(LlamaGgufSpm, MetadataFlags) {
  Scratch tmp;
  const fs::path no_prefix = variant(tmp.path() / "no_prefix.gguf", {{"tokenizer.ggml.add_space_prefix", false}});
  expect_reference(*load_tokenizer(import_to(no_prefix, tmp.path() / "a")), "no_prefix_space");
  const fs::path eos = variant(tmp.path() / "eos.gguf",
                               {{"tokenizer.ggml.add_bos_token", false}, {"tokenizer.ggml.add_eos_token", true}});
  expect_reference(*load_tokenizer(import_to(eos, tmp.path() / "b")), "bos_eos");
}

// Pieces past the SentencePiece model, as the converter writes them: "[PADn]" placeholders (UNUSED)
// and tokenizer_config.json's added tokens (CONTROL when special, USER_DEFINED otherwise).
TEST(LlamaGgufSpm, PaddingAndAddedTokens) {
  Scratch tmp;
  ckpt::gguf_testing::Model m = ckpt::gguf_testing::model_of(kSpmGguf);
  auto list = [&](const char* key) -> std::vector<ckpt::gguf::Value>& {
    return std::get<std::vector<ckpt::gguf::Value>>(m.find(key)->data);
  };
  const std::pair<const char*, int64_t> extra[] = {{"[PAD512]", 5}, {"<|im_start|>", 3}, {"[NEW] x", 4}};
  for (const auto& [text, type] : extra) {
    list("tokenizer.ggml.tokens").push_back(ckpt::gguf_testing::str_value(text));
    ckpt::gguf::Value score;
    score.type = ckpt::gguf::ValueType::F32;
    score.data = -1000.0;
    list("tokenizer.ggml.scores").push_back(score);
    list("tokenizer.ggml.token_type").push_back(ckpt::gguf_testing::int_value(ckpt::gguf::ValueType::I32, type));
  }
  ckpt::gguf_testing::write_file_bytes(tmp.path() / "extra.gguf", m.build());
  const auto tok = load_tokenizer(import_to(tmp.path() / "extra.gguf", tmp.path() / "hf"));
  EXPECT_EQ(tok->vocab_size(), 515);
  EXPECT_EQ(tok->id_to_token(512), "[PAD512]");
  EXPECT_FALSE(tok->is_special(512));
  EXPECT_TRUE(tok->is_special(513));
  EXPECT_FALSE(tok->is_special(514));
  // Added tokens are matched in the text before SentencePiece runs; a placeholder is not.
  const std::vector<int32_t> ids = tok->encode("<|im_start|>[NEW] x", false);
  EXPECT_EQ(ids, (std::vector<int32_t>{513, 514}));
  EXPECT_EQ(tok->decode(ids, false), "<|im_start|>[NEW] x");
  EXPECT_EQ(tok->decode(ids, true), "[NEW] x");
  const std::vector<int32_t> pad = tok->encode("[PAD512]", false);
  EXPECT_TRUE(std::find(pad.begin(), pad.end(), 512) == pad.end());
  // Everything else tokenizes as before.
  const json& cases = spm_reference().at("llama2").at("cases");
  for (size_t i = 0; i < 60; ++i)
    EXPECT_EQ(tok->encode(cases[i].at("text").get<std::string>()), cases[i].at("ids").get<std::vector<int32_t>>()) << i;
}

TEST(LlamaGgufSpm, ModelMatchesTransformersAndGenerates) {
  Scratch tmp;
  const fs::path out = import_to(kSpmGguf, tmp.path() / "hf");
  const testing::Golden g = testing::read_golden(kData / "golden" / "llama-gqa");  // the same weights
  auto tok = load_tokenizer(out);
  auto backend = make_cpu_backend();
  auto model = load_model(out, *backend);
  EXPECT_EQ(model->info().bos_token_id, 1);
  EXPECT_EQ(model->info().eos_token_id, 2);
  for (const auto& p : g.prompts) EXPECT_LE(testing::rel_max_error(testing::prefill_logits(*model, p.ids), p.logits), 1e-5);
  const auto out_tokens = testing::greedy(*model, tok.get(), g, 512);
  for (size_t i = 0; i < g.prompts.size(); ++i) EXPECT_EQ(out_tokens[i], g.prompts[i].greedy);

  // A prompt through the SentencePiece tokenizer, greedy tokens back to text.
  const std::vector<int32_t> prompt = tok->encode("In the beginning");
  ASSERT_EQ(prompt.front(), 1);  // <s>
  const auto generated = testing::greedy(*model, {prompt}, 8, 512, tok.get());
  ASSERT_EQ(generated.size(), 1u);
  EXPECT_EQ(generated[0].size(), 8u);
  const std::string text = tok->decode(generated[0]);
  EXPECT_EQ(streamed(*tok, generated[0], true), text);
}

}  // namespace
}  // namespace fineserve
