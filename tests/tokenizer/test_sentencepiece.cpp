// The SentencePiece tokenizer against Hugging Face: tests/data/spm/reference.json, written by
// tests/tokenizer/make_spm_reference.py with transformers' AutoTokenizer (LlamaTokenizer) from a
// tiny Llama-style tokenizer.model. Ids, decoded text and streamed text must match exactly.
#include <algorithm>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "models/tokenizer/hf_config.h"
#include "models/tokenizer/sentencepiece.h"
#include "models/tokenizer/tokenizer.h"
#include "models/tokenizer/utf8.h"
#include "tests/tokenizer/tokenizer_test_util.h"

namespace fineserve {
namespace {

using nlohmann::json;
using namespace tokenizer_testing;

std::filesystem::path spm_dir() { return std::filesystem::path(FINESERVE_TEST_DATA) / "spm"; }

const json& spm_reference() {
  static const json ref = read_json_file(spm_dir() / "reference.json");
  return ref;
}

std::string escaped(const std::string& s) { return json(s).dump(); }

std::string stream_all(const Tokenizer& tok, const std::vector<int32_t>& ids, bool skip_special) {
  StreamDecoder stream(tok, skip_special);
  std::string all;
  for (int32_t id : ids) {
    const std::string piece = stream.feed(id);
    EXPECT_TRUE(utf8::is_valid(piece));
    all += piece;
  }
  return all + stream.flush();
}

// A folder with the fixture's tokenizer.model and the given tokenizer_config.json.
void write_model_folder(const TempDir& dir, const json& config) {
  std::filesystem::copy_file(spm_dir() / "tokenizer.model", dir / "tokenizer.model");
  write_file(dir / "tokenizer_config.json", config.dump());
}

// Every case of one reference section: ids with and without the special tokens, decoded text both
// ways, and streamed text equal to decoded text. Counts failures so one bug does not print hundreds.
void check_cases(const Tokenizer& tok, const json& section) {
  ASSERT_FALSE(section.at("cases").empty());
  int failures = 0;
  for (const json& c : section.at("cases")) {
    const std::string text = c.at("text");
    const auto ids = c.at("ids").get<std::vector<int32_t>>();
    const auto ids_plain = c.at("ids_plain").get<std::vector<int32_t>>();
    const std::string decoded = c.at("decoded"), decoded_skip = c.at("decoded_skip_special");
    const bool ok = tok.encode(text, true) == ids && tok.encode(text, false) == ids_plain &&
                    tok.decode(ids, false) == decoded && tok.decode(ids, true) == decoded_skip &&
                    stream_all(tok, ids, false) == decoded && stream_all(tok, ids, true) == decoded_skip;
    if (!ok && ++failures <= 5) {
      ADD_FAILURE() << "text " << escaped(text) << "\n  ids       " << json(tok.encode(text, true))
                    << "\n  expected  " << json(ids) << "\n  plain     " << json(tok.encode(text, false))
                    << "\n  expected  " << json(ids_plain) << "\n  decoded   " << escaped(tok.decode(ids, false))
                    << "\n  expected  " << escaped(decoded) << "\n  streamed  " << escaped(stream_all(tok, ids, false))
                    << "\n  skipping  " << escaped(tok.decode(ids, true)) << "\n  expected  "
                    << escaped(decoded_skip) << "\n  streamed  " << escaped(stream_all(tok, ids, true));
    }
  }
  EXPECT_EQ(failures, 0) << "of " << section.at("cases").size() << " cases";
  EXPECT_EQ(tok.vocab_size(), section.at("vocab_size").get<int32_t>());
  EXPECT_EQ(tok.bos_id(), section.at("bos_id").get<int32_t>());
  EXPECT_EQ(tok.eos_id(), section.at("eos_id").get<int32_t>());
}

const Tokenizer& llama2() {
  static const std::unique_ptr<Tokenizer> tok = load_tokenizer(spm_dir());
  return *tok;
}

TEST(SentencePieceReference, Llama2FolderFallsBackFromTokenizerJson) {
  // The folder has a tokenizer.json too (BPE with byte_fallback, which the byte-level BPE does not
  // read), as every Llama checkpoint: load_tokenizer must pick tokenizer.model.
  ASSERT_TRUE(std::filesystem::exists(spm_dir() / "tokenizer.json"));
  const auto* spm = dynamic_cast<const SentencePieceTokenizer*>(&llama2());
  ASSERT_NE(spm, nullptr);
  EXPECT_EQ(spm->prefix_rule(), PrefixRule::kFirst);  // legacy=false
  check_cases(llama2(), spm_reference().at("llama2"));
}

TEST(SentencePieceReference, ModelWithoutTokenizerJson) {
  TempDir dir;
  write_model_folder(dir, spm_reference().at("llama2").at("tokenizer_config"));
  check_cases(*load_tokenizer(dir.path()), spm_reference().at("llama2"));
}

TEST(SentencePieceReference, ModelWithoutAnyConfigUsesLlamaDefaults) {
  // No tokenizer_config.json: LlamaTokenizer's defaults are Llama-2's config.
  TempDir dir;
  std::filesystem::copy_file(spm_dir() / "tokenizer.model", dir / "tokenizer.model");
  const auto tok = load_tokenizer(dir.path());
  const json& section = spm_reference().at("llama2");
  for (size_t i = 0; i < 40; ++i) {
    const json& c = section.at("cases").at(i);
    EXPECT_EQ(tok->encode(c.at("text").get<std::string>()), c.at("ids").get<std::vector<int32_t>>()) << c.at("text");
  }
}

TEST(SentencePieceReference, Variants) {
  for (const char* name : {"legacy", "bos_eos", "added_tokens", "no_prefix_space"}) {
    SCOPED_TRACE(name);
    const json& section = spm_reference().at(name);
    TempDir dir;
    write_model_folder(dir, section.at("tokenizer_config"));
    check_cases(*load_tokenizer(dir.path()), section);
  }
}

TEST(SentencePieceReference, DecodeArbitraryIds) {
  // Whole characters spelled in byte tokens between pieces, specials and lone '▁'s: the first
  // decoded token loses its leading space, and only that one.
  int failures = 0;
  for (const json& c : spm_reference().at("llama2").at("decode_cases")) {
    const auto ids = c.at("ids").get<std::vector<int32_t>>();
    for (const bool skip : {false, true}) {
      const std::string expected = c.at(skip ? "decoded_skip_special" : "decoded");
      if ((llama2().decode(ids, skip) != expected || stream_all(llama2(), ids, skip) != expected) &&
          ++failures <= 5) {
        ADD_FAILURE() << json(ids) << " skip " << skip << " -> " << escaped(llama2().decode(ids, skip))
                      << ", expected " << escaped(expected);
      }
    }
  }
  EXPECT_EQ(failures, 0);
}

TEST(SentencePieceTokenizer, IllFormedByteTokensBecomeReplacementCharacters) {
  // HF's ByteFallback decoder turns every byte of a run of byte tokens that is not entirely UTF-8
  // into U+FFFD (reference.json's ill_formed_decode: "\uFFFD\uFFFD" for <0xE4><0xBD>). FineServe
  // decodes every tokenizer's bytes alike, one U+FFFD per maximal ill-formed subpart (Python's
  // errors="replace"), so that streaming needs no look-ahead; a model only produces such runs by
  // stopping inside a character.
  const auto id = [](const char* t) { return *llama2().token_to_id(t); };
  const std::string fffd = "\xEF\xBF\xBD";
  EXPECT_EQ(llama2().decode(std::vector<int32_t>{id("<0xE4>"), id("<0xBD>")}), fffd);
  EXPECT_EQ(llama2().decode(std::vector<int32_t>{id("<0xE4>"), id("<0xBD>"), id("a")}), fffd + "a");
  EXPECT_EQ(llama2().decode(std::vector<int32_t>{id("<0xC3>"), id("<0xA9>"), id("<0xA9>")}), "\xC3\xA9" + fffd);
  EXPECT_EQ(llama2().decode(std::vector<int32_t>{id("<0xFF>")}), fffd);
  // Where the run is whole characters the two agree.
  EXPECT_EQ(llama2().decode(std::vector<int32_t>{id("<0xE4>"), id("<0xBD>"), id("<0xA0>")}), "\xE4\xBD\xA0");
  for (const json& c : spm_reference().at("ill_formed_decode")) {
    const auto ids = c.at("ids").get<std::vector<int32_t>>();
    EXPECT_EQ(stream_all(llama2(), ids, true), llama2().decode(ids));
  }
}

TEST(SentencePieceTokenizer, StreamingSplitsNoCharacterAndKeepsTheRightSpaces) {
  const Tokenizer& tok = llama2();
  // "你" and "😀" are not in the 512-piece vocabulary: byte fallback spends a token per byte.
  const std::string text = "  Hello 你 😀!\n  x";
  const auto ids = tok.encode(text);
  EXPECT_GT(ids.size(), 12u);
  StreamDecoder stream(tok);
  std::vector<std::string> pieces;
  for (int32_t id : ids) pieces.push_back(stream.feed(id));
  pieces.push_back(stream.flush());
  std::string all;
  for (const auto& p : pieces) {
    EXPECT_TRUE(utf8::is_valid(p)) << escaped(p);
    all += p;
  }
  // The text starts with two spaces: HF's decoder strips one of them, as decode does.
  EXPECT_EQ(all, " Hello 你 😀!\n  x");
  EXPECT_EQ(all, tok.decode(ids));
  EXPECT_EQ(std::count(pieces.begin(), pieces.end(), "\xF0\x9F\x98\x80"), 1);  // whole, in one piece
  // After flush() the decoder starts over: the next leading space is dropped again.
  const auto space_a = tok.token_to_id("\xE2\x96\x81" "a");
  ASSERT_TRUE(space_a.has_value());
  EXPECT_EQ(stream.feed(*space_a), "a");
}

TEST(SentencePieceTokenizer, TokenLookups) {
  const Tokenizer& tok = llama2();
  EXPECT_EQ(tok.token_to_id("<unk>"), 0);
  EXPECT_EQ(tok.token_to_id("<s>"), 1);
  EXPECT_EQ(tok.token_to_id("</s>"), 2);
  EXPECT_EQ(tok.token_to_id("<0x0A>"), 13);  // byte pieces follow the three specials, as in Llama
  EXPECT_EQ(tok.id_to_token(13), "<0x0A>");
  EXPECT_EQ(tok.token_to_id("\xE2\x96\x81"), tok.encode(" ", false).at(0));
  EXPECT_FALSE(tok.token_to_id("no such piece").has_value());  // SentencePiece itself says <unk>
  EXPECT_FALSE(tok.token_to_id("").has_value());
  EXPECT_FALSE(tok.id_to_token(-1).has_value());
  EXPECT_FALSE(tok.id_to_token(tok.vocab_size()).has_value());
  for (int32_t id = 0; id < tok.vocab_size(); ++id) {
    const auto token = tok.id_to_token(id);
    ASSERT_TRUE(token.has_value()) << id;
    EXPECT_EQ(tok.token_to_id(*token), id) << *token;
    EXPECT_EQ(tok.is_special(id), id < 3) << id;
  }
  EXPECT_EQ(tok.decode(std::vector<int32_t>{-5, 9999, 1}, false), "<s>");  // unknown ids are skipped
}

TEST(SentencePieceTokenizer, IllFormedInputKeepsItsBytes) {
  // Python strings cannot hold these, so there is no HF reference: each ill-formed byte becomes its
  // byte token (SentencePiece alone would make it U+FFFD), and decoding gives the bytes back.
  const Tokenizer& tok = llama2();
  const std::string text = "a\xFF" "b\xE4\xBD" " c\xC0";
  const auto ids = tok.encode(text, false);
  std::string raw;
  for (int32_t id : ids) tok.append_token_bytes(id, false, /*at_start=*/false, raw);
  EXPECT_EQ(raw, " " + text);  // with the space of the '▁' prefix
  EXPECT_EQ(tok.decode(ids), utf8::replace_invalid(text));
}

TEST(SentencePieceTokenizer, ConcurrentEncodeAndDecode) {
  const json& cases = spm_reference().at("llama2").at("cases");
  std::vector<std::thread> threads;
  std::vector<int> failures(4, 0);
  for (size_t t = 0; t < failures.size(); ++t) {
    threads.emplace_back([&, t] {
      for (size_t i = t; i < cases.size(); i += 2) {
        const auto ids = cases[i].at("ids").get<std::vector<int32_t>>();
        if (llama2().encode(cases[i].at("text").get<std::string>()) != ids ||
            llama2().decode(ids, false) != cases[i].at("decoded").get<std::string>()) {
          ++failures[t];
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  for (int f : failures) EXPECT_EQ(f, 0);
}

// ---- errors --------------------------------------------------------------------------------

TEST(SentencePieceErrors, MissingModel) {
  TempDir dir;
  write_file(dir / "tokenizer_config.json", spm_reference().at("llama2").at("tokenizer_config").dump());
  EXPECT_NE(error_of([&] { load_tokenizer(dir.path()); }).find("no tokenizer in"), std::string::npos);
  EXPECT_NE(error_of([&] { load_sentencepiece_tokenizer(dir.path()); }).find("no tokenizer.model"),
            std::string::npos);
}

TEST(SentencePieceErrors, SentencePieceStyleTokenizerJsonWithoutModel) {
  TempDir dir;
  std::filesystem::copy_file(spm_dir() / "tokenizer.json", dir / "tokenizer.json");
  std::filesystem::copy_file(spm_dir() / "tokenizer_config.json", dir / "tokenizer_config.json");
  const std::string message = error_of([&] { load_tokenizer(dir.path()); });
  EXPECT_NE(message.find("byte_fallback"), std::string::npos) << message;
  EXPECT_NE(message.find("no tokenizer.model"), std::string::npos) << message;
}

TEST(SentencePieceErrors, CorruptModel) {
  const std::string good = read_text_file(spm_dir() / "tokenizer.model");
  const std::vector<std::pair<std::string, std::string>> bad = {
      {"empty", ""},
      {"truncated", good.substr(0, good.size() / 2)},
      {"text", "this is not a protobuf at all\n"},
      {"json", R"({"model": {"type": "BPE"}})"},
      {"no pieces", std::string("\x12\x02\x18\x02", 4)},  // a trainer_spec saying BPE, nothing else
  };
  for (const auto& [what, bytes] : bad) {
    SCOPED_TRACE(what);
    TempDir dir;
    write_file(dir / "tokenizer.model", bytes);
    const std::string message = error_of([&] { load_tokenizer(dir.path()); });
    EXPECT_NE(message.find("tokenizer.model"), std::string::npos) << message;
  }
}

TEST(SentencePieceErrors, CorruptModelBehindTokenizerJson) {
  TempDir dir;
  std::filesystem::copy_file(spm_dir() / "tokenizer.json", dir / "tokenizer.json");
  write_file(dir / "tokenizer.model", "garbage");
  const std::string message = error_of([&] { load_tokenizer(dir.path()); });
  EXPECT_NE(message.find("reading tokenizer.model instead failed"), std::string::npos) << message;
}

TEST(SentencePieceErrors, UnigramModelIsRefused) {
  // The fixture with its trainer_spec's model_type overridden to UNIGRAM (protobuf: a later
  // occurrence of an embedded message merges into the earlier one).
  TempDir dir;
  write_file(dir / "tokenizer.model", read_text_file(spm_dir() / "tokenizer.model") + std::string("\x12\x02\x18\x01", 4));
  const std::string message = error_of([&] { load_tokenizer(dir.path()); });
  EXPECT_NE(message.find("Unigram model is not supported"), std::string::npos) << message;
}

TEST(SentencePieceErrors, OtherTokenizerClassesAreRefused) {
  TempDir dir;
  json config = spm_reference().at("llama2").at("tokenizer_config");
  config["tokenizer_class"] = "T5Tokenizer";
  write_model_folder(dir, config);
  const std::string message = error_of([&] { load_tokenizer(dir.path()); });
  EXPECT_NE(message.find("tokenizer_class \"T5Tokenizer\" is not supported"), std::string::npos) << message;
}

TEST(SentencePieceErrors, BadConfigValues) {
  for (const char* patch : {R"({"legacy": "yes"})", R"({"add_bos_token": 1})"}) {
    SCOPED_TRACE(patch);
    TempDir dir;
    json config = spm_reference().at("llama2").at("tokenizer_config");
    config.update(json::parse(patch));
    write_model_folder(dir, config);
    const std::string message = error_of([&] { load_tokenizer(dir.path()); });
    EXPECT_NE(message.find("must be true or false"), std::string::npos) << message;
  }
}

}  // namespace
}  // namespace fineserve
