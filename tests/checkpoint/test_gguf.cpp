// GGUF: parsing and validation (files built here byte by byte), dequantization against llama.cpp's
// gguf-py (tests/checkpoint/make_gguf_fixtures.py), and import into a Hugging Face checkpoint.
#include "models/checkpoint/gguf.h"

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <numbers>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "kernels/half.h"
#include "models/checkpoint/config.h"
#include "models/checkpoint/gguf_import.h"
#include "models/checkpoint/safetensors.h"
#include "models/checkpoint/util.h"
#include "tests/checkpoint/gguf_test_writer.h"
#include "tests/checkpoint/test_util.h"

namespace fineserve::ckpt {
namespace {

namespace fs = std::filesystem;
using testing::expect_error;
using testing::TempDir;
using gguf::GgmlType;
using gguf::ValueType;
using namespace gguf_testing;

const fs::path kData = fs::path(FINESERVE_TEST_DATA);
const fs::path kDequant = kData / "gguf" / "dequant.gguf";
const fs::path kTinyLlama = kData / "gguf" / "tiny-llama.gguf";
const fs::path kTinyLlamaSpm = kData / "gguf" / "tiny-llama-spm.gguf";

std::span<const std::byte> bytes_of(const std::string& s) {
  return {reinterpret_cast<const std::byte*>(s.data()), s.size()};
}

Model small_model() {
  Model m;
  m.metadata.emplace_back("general.architecture", str_value("test"));
  m.metadata.emplace_back("count", int_value(ValueType::U32, 7));
  gguf::Value arr;
  arr.type = ValueType::Array;
  arr.elem_type = ValueType::String;
  arr.data = std::vector<gguf::Value>{str_value("a"), str_value("bc")};
  m.metadata.emplace_back("list", arr);
  m.add_tensor("w", {32, 2}, GgmlType::Q8_0);
  m.add_tensor("b", {3}, GgmlType::F32, std::string(12, '\x01'));
  return m;
}

void expect_parse_error(const std::string& file, std::initializer_list<std::string> parts) {
  expect_error([&] { gguf::parse(bytes_of(file), "x.gguf"); }, parts);
}

// ---- parsing ------------------------------------------------------------------------------------

TEST(GgufParse, ReadsMetadataAndTensors) {
  Model m = small_model();
  m.metadata.emplace_back("big", int_value(ValueType::I64, -5));
  const std::string file = m.build();
  const gguf::Header h = gguf::parse(bytes_of(file), "x.gguf");
  EXPECT_EQ(h.version, 3u);
  EXPECT_EQ(h.find("general.architecture")->as_string("k"), "test");
  EXPECT_EQ(h.find("count")->as_int("k"), 7);
  EXPECT_EQ(h.find("big")->as_int("k"), -5);
  EXPECT_EQ(h.find("list")->as_array("k").size(), 2u);
  EXPECT_EQ(h.find("list")->as_array("k")[1].as_string("k"), "bc");
  ASSERT_EQ(h.tensors.size(), 2u);
  EXPECT_EQ(h.tensors[0].shape(), (std::vector<int64_t>{2, 32}));
  EXPECT_EQ(h.tensors[0].nbytes, 2u * 34u);
  EXPECT_EQ(h.tensors[1].offset % 32, 0u);
  EXPECT_EQ(h.data_start % 32, 0u);
  expect_error([&] { h.find("count")->as_string("x.gguf: key count"); }, {"x.gguf: key count", "string", "uint32"});
}

TEST(GgufParse, FixtureFromGgufPy) {
  const auto f = gguf::File::open(kTinyLlama);
  const gguf::Header& h = f->header();
  EXPECT_EQ(h.find("general.architecture")->as_string("k"), "llama");
  EXPECT_EQ(h.find("llama.block_count")->as_int("k"), 2);
  EXPECT_EQ(h.find("tokenizer.ggml.tokens")->as_array("k").size(), 512u);
  const gguf::TensorInfo* q = h.find_tensor("blk.0.attn_q.weight");
  ASSERT_NE(q, nullptr);
  EXPECT_EQ(q->shape(), (std::vector<int64_t>{64, 64}));
  EXPECT_EQ(q->type, static_cast<uint32_t>(GgmlType::F16));
  EXPECT_EQ(h.find_tensor("blk.0.attn_k.weight")->shape(), (std::vector<int64_t>{32, 64}));
}

TEST(GgufParse, BadHeadersAreClearErrors) {
  std::string file = small_model().build();
  std::string bad = file;
  bad[0] = 'X';
  expect_parse_error(bad, {"x.gguf", "not a GGUF file", "magic"});
  expect_parse_error("GG", {"x.gguf", "not a GGUF file"});
  Model m = small_model();
  m.version = 1;
  expect_parse_error(m.build(), {"x.gguf", "version 1 is not supported"});
  m.version = 7;
  expect_parse_error(m.build(), {"unsupported GGUF version 7"});
  m.version = 0x03000000;
  expect_parse_error(m.build(), {"big-endian"});
}

TEST(GgufParse, EveryTruncationIsAnError) {
  const std::string file = small_model().build();
  EXPECT_NO_THROW(gguf::parse(bytes_of(file), "x.gguf"));
  // The file ends with the data of tensor "b": every shorter prefix is missing something.
  for (size_t n = 0; n < file.size(); ++n) {
    const std::string cut = file.substr(0, n);
    try {
      gguf::parse(bytes_of(cut), "x.gguf");
      ADD_FAILURE() << "a file cut to " << n << " bytes parsed";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("x.gguf"), std::string::npos) << e.what();
    }
  }
}

TEST(GgufParse, CountsAndLengthsPastTheEnd) {
  std::string file = small_model().build();
  std::string bad = file;
  const uint64_t huge = 1ull << 60;
  std::memcpy(bad.data() + 8, &huge, 8);  // tensor count
  expect_parse_error(bad, {"truncated", "tensors cannot fit"});
  bad = file;
  std::memcpy(bad.data() + 16, &huge, 8);  // metadata count
  expect_parse_error(bad, {"truncated", "metadata entries cannot fit"});
  bad = file;
  std::memcpy(bad.data() + 24, &huge, 8);  // the first key's length
  expect_parse_error(bad, {"truncated", "string of"});

  Model m = small_model();
  gguf::Value arr;
  arr.type = ValueType::Array;
  arr.elem_type = ValueType::U64;
  arr.data = std::vector<gguf::Value>{int_value(ValueType::U64, 1)};
  m.metadata.emplace_back("arr", arr);
  std::string with_array = m.build();
  // The array's count sits 8 bytes before its single element, right after its element type.
  const size_t key_at = with_array.find("arr");
  const size_t count_at = key_at + 3 + 4 + 4;
  std::memcpy(with_array.data() + count_at, &huge, 8);
  expect_parse_error(with_array, {"truncated", "'arr'", "elements"});
}

TEST(GgufParse, BadValuesAreClearErrors) {
  // An unknown value type: write the file with a valid type, then patch the number.
  Model m = small_model();
  std::string f = m.build();
  const size_t count_type = f.find("count") + 5;
  uint32_t bad_type = 99;
  std::memcpy(f.data() + count_type, &bad_type, 4);
  expect_parse_error(f, {"'count'", "unknown value type 99"});

  m = small_model();
  m.metadata.emplace_back("count", int_value(ValueType::U8, 1));
  expect_parse_error(m.build(), {"duplicate metadata key 'count'"});

  m = small_model();
  gguf::Value flag;
  flag.type = ValueType::Bool;
  flag.data = true;
  m.metadata.emplace_back("flag", flag);
  f = m.build();
  f[f.find("flag") + 4 + 4] = 2;
  expect_parse_error(f, {"'flag'", "must be 0 or 1"});

  m = small_model();
  m.metadata.emplace_back("general.alignment", int_value(ValueType::U32, 24));
  expect_parse_error(m.build(), {"general.alignment 24 is not a power of two"});

  // Arrays nested deeper than the parser allows.
  gguf::Value v = int_value(ValueType::U8, 1);
  for (int i = 0; i < 12; ++i) {
    gguf::Value outer;
    outer.type = ValueType::Array;
    outer.elem_type = v.type;
    outer.data = std::vector<gguf::Value>{v};
    v = outer;
  }
  m = small_model();
  m.metadata.emplace_back("deep", v);
  expect_parse_error(m.build(), {"'deep'", "nests arrays deeper"});
}

TEST(GgufParse, BadTensorsAreClearErrors) {
  Model m = small_model();
  m.tensors[0].type = 77;
  m.data[0] = std::string(68, '\0');
  expect_parse_error(m.build(), {"tensor 'w'", "unknown ggml type 77"});

  m = small_model();
  m.add_tensor("w", {4}, GgmlType::F32);
  expect_parse_error(m.build(), {"duplicate tensor 'w'"});

  m = small_model();
  m.tensors[0].dims = {48, 2};  // Q8_0 rows must be whole blocks of 32
  expect_parse_error(m.build(), {"tensor 'w'", "Q8_0", "not a multiple of its block of 32"});

  m = small_model();
  m.tensors[0].dims = {32, 1, 1, 1, 2};
  expect_parse_error(m.build(), {"tensor 'w'", "5 dimensions"});

  m = small_model();
  m.tensors[0].dims = {1ll << 40, 1ll << 40};
  expect_parse_error(m.build(), {"tensor 'w'", "64 bits"});

  m = small_model();
  m.build();
  m.tensors[1].offset = 8;  // misaligned
  expect_parse_error(m.build(true), {"tensor 'b'", "not a multiple of the alignment 32"});

  m = small_model();
  m.build();
  m.tensors[1].offset = 4096;  // past the end
  const std::string past = m.build(true).substr(0, 300);
  expect_parse_error(past, {"tensor 'b'", "extends past the end"});

  m = small_model();
  m.build();
  m.tensors[1].offset = 64;  // inside w's 68 bytes
  expect_parse_error(m.build(true), {"tensors 'w' and 'b' overlap"});
}

TEST(GgufParse, NamesInMessagesAreEscaped) {
  Model m = small_model();
  m.tensors[0].type = 77;
  m.tensors[0].name = std::string("a\x1b[31mb", 7);
  try {
    gguf::parse(bytes_of(m.build()), "x.gguf");
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("a\\x1b[31mb"), std::string::npos) << e.what();
  }
}

TEST(GgufFile, OpenErrorsNameThePath) {
  TempDir dir;
  expect_error([&] { gguf::File::open(dir / "missing.gguf"); }, {"missing.gguf"});
  testing::write_bytes(dir / "empty.gguf", "");
  expect_error([&] { gguf::File::open(dir / "empty.gguf"); }, {"empty.gguf", "not a GGUF file"});
  expect_error([&] { gguf::File::open(dir.path()); }, {"not a regular file"});
}

// ---- dequantization -----------------------------------------------------------------------------

TEST(GgufDequantize, MatchesGgufPy) {
  const auto f = gguf::File::open(kDequant);
  int checked = 0;
  for (const auto& t : f->header().tensors) {
    if (t.name.ends_with(".expected")) continue;
    const gguf::TensorInfo* e = f->header().find_tensor(t.name + ".expected");
    ASSERT_NE(e, nullptr) << t.name;
    ASSERT_EQ(e->numel, t.numel);
    ASSERT_TRUE(gguf::can_dequantize(t.type)) << gguf::ggml_type_name(t.type);
    std::vector<float> got(static_cast<size_t>(t.numel)), want(static_cast<size_t>(t.numel));
    gguf::dequantize(t.type, f->data(t), t.numel, got.data(), t.name);
    std::memcpy(want.data(), f->data(*e).data(), want.size() * 4);
    double scale = 0;
    for (float w : want) scale = std::max(scale, std::abs(static_cast<double>(w)));
    for (size_t i = 0; i < got.size(); ++i)
      ASSERT_NEAR(got[i], want[i], 1e-6 * scale) << t.name << " element " << i;
    ++checked;
  }
  EXPECT_EQ(checked, 11);
}

TEST(GgufDequantize, HandWrittenBlocks) {
  // Q4_0: d = 0.5, low nibble j and high nibble 15 - j -> elements (j - 8) * d and (7 - j) * d.
  std::string q4(18, '\0');
  const uint16_t half = float_to_half(0.5f);
  std::memcpy(q4.data(), &half, 2);
  for (int j = 0; j < 16; ++j) q4[2 + j] = static_cast<char>(j | ((15 - j) << 4));
  std::vector<float> y(32);
  gguf::dequantize(static_cast<uint32_t>(GgmlType::Q4_0), bytes_of(q4), 32, y.data(), "q4");
  for (int j = 0; j < 16; ++j) {
    EXPECT_EQ(y[j], (j - 8) * 0.5f);
    EXPECT_EQ(y[j + 16], (7 - j) * 0.5f);
  }
  // Q4_1: x = q * d + m.
  std::string q41(20, '\0');
  const uint16_t m = float_to_half(-1.0f);
  std::memcpy(q41.data(), &half, 2);
  std::memcpy(q41.data() + 2, &m, 2);
  for (int j = 0; j < 16; ++j) q41[4 + j] = static_cast<char>(j | ((15 - j) << 4));
  gguf::dequantize(static_cast<uint32_t>(GgmlType::Q4_1), bytes_of(q41), 32, y.data(), "q41");
  for (int j = 0; j < 16; ++j) {
    EXPECT_EQ(y[j], j * 0.5f - 1.0f);
    EXPECT_EQ(y[j + 16], (15 - j) * 0.5f - 1.0f);
  }
  // Q8_0: x = q * d.
  std::string q8(34, '\0');
  std::memcpy(q8.data(), &half, 2);
  for (int j = 0; j < 32; ++j) q8[2 + j] = static_cast<char>(static_cast<int8_t>(j * 8 - 128));
  gguf::dequantize(static_cast<uint32_t>(GgmlType::Q8_0), bytes_of(q8), 32, y.data(), "q8");
  for (int j = 0; j < 32; ++j) EXPECT_EQ(y[j], static_cast<float>(j * 8 - 128) * 0.5f);
}

TEST(GgufDequantize, UnsupportedTypesNameTheType) {
  std::vector<float> y(256);
  const std::string block(66, '\0');
  expect_error([&] { gguf::dequantize(static_cast<uint32_t>(GgmlType::IQ2_XXS), bytes_of(block), 256, y.data(), "t.gguf: tensor x"); },
               {"t.gguf: tensor x", "IQ2_XXS", "cannot dequantize"});
  EXPECT_EQ(gguf::ggml_type_name(1234), "type 1234");
}

// ---- import -------------------------------------------------------------------------------------

std::vector<float> as_floats(const TensorView& v) {
  std::vector<float> out(static_cast<size_t>(v.numel()));
  for (size_t i = 0; i < out.size(); ++i) {
    uint16_t h;
    float f;
    switch (v.dtype()) {
      case DType::F16: std::memcpy(&h, v.data + 2 * i, 2); out[i] = half_to_float(h); break;
      case DType::BF16: std::memcpy(&h, v.data + 2 * i, 2); out[i] = bf16_to_float(h); break;
      default: std::memcpy(&f, v.data + 4 * i, 4); out[i] = f; break;
    }
  }
  return out;
}

TEST(GgufImport, TinyLlamaGivesBackTheHfCheckpoint) {
  TempDir dir;
  GgufImportOptions o;
  o.gguf = kTinyLlama;
  o.out = dir / "hf";
  const GgufImportReport r = import_gguf(o);
  EXPECT_EQ(r.architecture, "llama");
  EXPECT_EQ(r.model_name, "tiny llama-gqa");
  EXPECT_EQ(r.source_types.at("F16"), 16);
  EXPECT_EQ(r.source_types.at("F32"), 5);

  // Every tensor of the transformers checkpoint, bit for bit (q/k rows permuted back).
  const Checkpoint want = Checkpoint::open(kData / "golden" / "llama-gqa");
  const Checkpoint got = Checkpoint::open(o.out);
  EXPECT_EQ(got.tensors().size(), want.tensors().size());
  for (const TensorInfo* t : want.tensors()) {
    ASSERT_TRUE(got.has(t->name)) << t->name;
    const TensorView a = got.get(t->name), b = want.get(t->name);
    EXPECT_EQ(a.shape(), b.shape()) << t->name;
    EXPECT_EQ(a.dtype(), DType::F16);
    ASSERT_EQ(a.nbytes(), b.nbytes());
    EXPECT_EQ(std::memcmp(a.data, b.data, a.nbytes()), 0) << t->name;
  }

  // config.json describes the same model.
  const LlamaConfig c = parse_llama_config(read_json_file(o.out / "config.json"), "imported");
  const LlamaConfig w = parse_llama_config(read_json_file(kData / "golden" / "llama-gqa" / "config.json"), "golden");
  EXPECT_EQ(c.vocab_size, w.vocab_size);
  EXPECT_EQ(c.hidden_size, w.hidden_size);
  EXPECT_EQ(c.intermediate_size, w.intermediate_size);
  EXPECT_EQ(c.num_hidden_layers, w.num_hidden_layers);
  EXPECT_EQ(c.num_attention_heads, w.num_attention_heads);
  EXPECT_EQ(c.num_key_value_heads, w.num_key_value_heads);
  EXPECT_EQ(c.head_dim, w.head_dim);
  EXPECT_EQ(c.max_position_embeddings, w.max_position_embeddings);
  EXPECT_EQ(c.rms_norm_eps, w.rms_norm_eps);
  EXPECT_EQ(c.rope_theta, w.rope_theta);
  EXPECT_EQ(c.tie_word_embeddings, false);
  EXPECT_EQ(c.bos_token_id, 1);
  EXPECT_EQ(c.eos_token_ids, std::vector<int64_t>{2});

  const auto tc = read_json_file(o.out / "tokenizer_config.json");
  EXPECT_EQ(tc["bos_token"], "<s>");
  EXPECT_EQ(tc["eos_token"], "</s>");
  EXPECT_EQ(tc["unk_token"], "<unk>");
  EXPECT_EQ(tc["add_bos_token"], true);
  EXPECT_NE(tc["chat_template"].get<std::string>().find("messages"), std::string::npos);
  const auto tok = read_json_file(o.out / "tokenizer.json");
  const auto golden_tok = read_json_file(kData / "golden" / "llama-gqa" / "tokenizer.json");
  EXPECT_EQ(tok["model"]["vocab"], golden_tok["model"]["vocab"]);
  EXPECT_EQ(tok["model"]["merges"].size(), golden_tok["model"]["merges"].size());
  EXPECT_EQ(tok["added_tokens"].size(), 3u);
  EXPECT_EQ(tok["post_processor"]["type"], "TemplateProcessing");

  // No leftovers beside the output, and a second import refuses to overwrite it.
  size_t entries = 0;
  for ([[maybe_unused]] const auto& e : fs::directory_iterator(dir.path())) ++entries;
  EXPECT_EQ(entries, 1u);
  expect_error([&] { import_gguf(o); }, {"hf"});
}

TEST(GgufImport, OtherDtypes) {
  TempDir dir;
  for (const auto& [dtype, name] : {std::pair{DType::BF16, "bf16"}, std::pair{DType::F32, "f32"}}) {
    GgufImportOptions o;
    o.gguf = kTinyLlama;
    o.out = dir / name;
    o.dtype = dtype;
    import_gguf(o);
    const Checkpoint got = Checkpoint::open(o.out);
    const Checkpoint want = Checkpoint::open(kData / "golden" / "llama-gqa");
    const TensorView a = got.get("model.layers.1.self_attn.k_proj.weight");
    EXPECT_EQ(a.dtype(), dtype);
    const std::vector<float> x = as_floats(a), y = as_floats(want.get("model.layers.1.self_attn.k_proj.weight"));
    for (size_t i = 0; i < x.size(); ++i)
      ASSERT_NEAR(x[i], y[i], dtype == DType::F32 ? 0.0 : std::abs(y[i]) / 128) << i;
    EXPECT_EQ(read_json_file(o.out / "config.json")["torch_dtype"], dtype == DType::F32 ? "float32" : "bfloat16");
  }
}

// Writes `m` next to the temp dir and imports it; returns the error message ("" on success).
std::string import_error(Model& m, const TempDir& dir) {
  const std::string file = m.build();
  testing::write_bytes(dir / "m.gguf", file);
  GgufImportOptions o;
  o.gguf = dir / "m.gguf";
  o.out = dir / "out";
  fs::remove_all(o.out);
  try {
    import_gguf(o);
  } catch (const Error& e) {
    EXPECT_FALSE(fs::exists(o.out)) << "a failed import left " << o.out;
    return e.what();
  }
  return "";
}

// Importing m fails with a message naming the file and containing every one of parts.
void expect_import_error(Model m, const TempDir& dir, std::initializer_list<std::string> parts) {
  const std::string msg = import_error(m, dir);
  ASSERT_FALSE(msg.empty()) << "imported without error";
  EXPECT_NE(msg.find("m.gguf"), std::string::npos) << msg;
  for (const auto& p : parts) EXPECT_NE(msg.find(p), std::string::npos) << "'" << p << "' not in: " << msg;
}

TEST(GgufImport, BadModelsAreClearErrors) {
  TempDir dir;
  auto expect_msg = [&](Model m, std::initializer_list<std::string> parts) { expect_import_error(std::move(m), dir, parts); };
  const Model base = model_of(kTinyLlama);
  {
    Model ok = base;
    EXPECT_EQ(import_error(ok, dir), "");
  }
  Model m = base;
  *m.find("general.architecture") = str_value("falcon");
  expect_msg(m, {"general.architecture 'falcon' is not supported"});

  m = base;
  m.metadata.emplace_back("llama.expert_count", int_value(ValueType::U32, 8));
  expect_msg(m, {"mixture-of-experts"});

  m = base;
  *m.find("tokenizer.ggml.model") = str_value("bert");
  expect_msg(m, {"tokenizer.ggml.model 'bert' is not supported", "'llama', SentencePiece"});

  m = base;  // a byte-level vocabulary labelled SentencePiece: it has no scores
  *m.find("tokenizer.ggml.model") = str_value("llama");
  expect_msg(m, {"missing metadata key tokenizer.ggml.scores"});

  m = base;
  *m.find("tokenizer.ggml.pre") = str_value("qwen2");
  expect_msg(m, {"tokenizer.ggml.pre 'qwen2'"});

  m = base;
  *m.find("llama.block_count") = int_value(ValueType::U32, 3);
  expect_msg(m, {"missing the tensor that becomes model.layers.2."});

  m = base;
  *m.find("llama.feed_forward_length") = int_value(ValueType::U32, 96);
  expect_msg(m, {"tensor blk.0.ffn_down.weight has shape [64, 128]", "metadata implies [64, 96]"});

  m = base;
  {
    const size_t i = m.tensor_index("blk.1.ffn_up.weight");
    m.tensors.erase(m.tensors.begin() + static_cast<std::ptrdiff_t>(i));
    m.data.erase(m.data.begin() + static_cast<std::ptrdiff_t>(i));
  }
  expect_msg(m, {"missing the tensor that becomes model.layers.1.mlp.up_proj.weight"});

  m = base;
  m.add_tensor("blk.0.attn_weird.weight", {4}, GgmlType::F32);
  expect_msg(m, {"tensor 'blk.0.attn_weird.weight' has no Llama counterpart"});

  m = base;
  {
    const size_t i = m.tensor_index("token_embd.weight");
    m.tensors[i].type = static_cast<uint32_t>(GgmlType::IQ4_NL);  // 64 -> 2 blocks of 18 bytes per row
    m.data[i] = std::string(512 * 2 * 18, '\0');
  }
  expect_msg(m, {"tensor token_embd.weight", "IQ4_NL", "cannot dequantize"});

  m = base;
  {
    const size_t i = m.tensor_index("output_norm.weight");
    const float big = 1e6f;
    std::memcpy(m.data[i].data(), &big, 4);
  }
  expect_msg(m, {"tensor output_norm.weight", "float16", "--dtype bf16"});

  m = base;
  std::get<std::vector<gguf::Value>>(m.find("tokenizer.ggml.tokens")->data)[5].data = std::string("a\xff");
  expect_msg(m, {"cannot write tokenizer.json", "UTF-8"});

  m = base;
  m.tensors.push_back(m.tensors[m.tensor_index("blk.0.attn_q.weight")]);
  m.tensors.back().name = "blk.0.attn_q.bias";
  m.tensors.back().dims = {64};
  m.data.push_back(std::string(64 * 2, '\0'));
  expect_msg(m, {"missing the tensor that becomes model.layers.0.self_attn.k_proj.bias"});
}

// A SentencePiece vocabulary (tokenizer.ggml.model "llama") becomes tokenizer.model; the tokenizer's
// behaviour is tested against transformers in tests/models/test_llama_gguf_spm.cpp.
TEST(GgufImport, SentencePieceVocabularyWritesTokenizerModel) {
  TempDir dir;
  GgufImportOptions o;
  o.gguf = kTinyLlamaSpm;
  o.out = dir / "hf";
  import_gguf(o);
  EXPECT_FALSE(fs::exists(o.out / "tokenizer.json"));
  const std::string model = read_file(o.out / "tokenizer.model");
  EXPECT_GT(model.size(), 512u * 8);
  const auto tc = read_json_file(o.out / "tokenizer_config.json");
  EXPECT_EQ(tc["tokenizer_class"], "LlamaTokenizer");
  EXPECT_EQ(tc["unk_token"], "<unk>");
  EXPECT_EQ(tc["add_prefix_space"], true);
  EXPECT_EQ(tc["added_tokens_decoder"].size(), 3u);  // <unk>, <s>, </s>
  EXPECT_EQ(tc["added_tokens_decoder"]["0"]["special"], true);
  const LlamaConfig c = parse_llama_config(read_json_file(o.out / "config.json"), "imported");
  EXPECT_EQ(c.vocab_size, 512);
  EXPECT_EQ(c.bos_token_id, 1);
}

TEST(GgufImport, BadSentencePieceVocabulariesAreClearErrors) {
  TempDir dir;
  auto expect_msg = [&](Model m, std::initializer_list<std::string> parts) { expect_import_error(std::move(m), dir, parts); };
  auto list = [](Model& m, const char* key) -> std::vector<gguf::Value>& {
    return std::get<std::vector<gguf::Value>>(m.find(key)->data);
  };
  auto erase = [](Model& m, const std::string& key) {
    std::erase_if(m.metadata, [&](const auto& kv) { return kv.first == key; });
  };
  const Model base = model_of(kTinyLlamaSpm);
  {
    Model ok = base;
    EXPECT_EQ(import_error(ok, dir), "");
  }
  Model m = base;
  list(m, "tokenizer.ggml.scores").pop_back();
  expect_msg(m, {"tokenizer.ggml.scores has 511 entries for 512 tokens"});

  m = base;
  list(m, "tokenizer.ggml.token_type").pop_back();
  expect_msg(m, {"tokenizer.ggml.token_type has 511 entries for 512 tokens"});

  m = base;
  erase(m, "tokenizer.ggml.scores");
  expect_msg(m, {"missing metadata key tokenizer.ggml.scores"});

  m = base;
  erase(m, "tokenizer.ggml.token_type");
  expect_msg(m, {"missing metadata key tokenizer.ggml.token_type"});

  m = base;
  *m.find("tokenizer.ggml.scores") = str_value("high");
  expect_msg(m, {"tokenizer.ggml.scores"});

  m = base;
  std::get<double>(list(m, "tokenizer.ggml.scores")[300].data) = std::nan("");
  expect_msg(m, {"tokenizer.ggml.scores", "token 300", "not a number"});

  m = base;
  list(m, "tokenizer.ggml.token_type")[300] = int_value(ValueType::I32, 7);
  expect_msg(m, {"tokenizer.ggml.token_type of token 300", "is 7"});

  m = base;
  list(m, "tokenizer.ggml.tokens")[300] = list(m, "tokenizer.ggml.tokens")[301];
  expect_msg(m, {"tokenizer.ggml.tokens holds", "twice (tokens 300 and 301)"});

  m = base;
  list(m, "tokenizer.ggml.tokens")[300] = str_value("");
  expect_msg(m, {"tokenizer.ggml.tokens: token 300 is empty"});

  m = base;
  list(m, "tokenizer.ggml.tokens")[13] = str_value("<0x0a>");  // upper-case hex only
  expect_msg(m, {"token 13 ('<0x0a>')", "spelled <0xNN>"});

  m = base;
  list(m, "tokenizer.ggml.token_type")[13] = int_value(ValueType::I32, 1);  // <0x0A> a normal piece
  expect_msg(m, {"byte tokens but no <0x0A>"});

  m = base;  // the converter's <unk> is CONTROL: without unknown_token_id there is no unknown piece
  erase(m, "tokenizer.ggml.unknown_token_id");
  expect_msg(m, {"no unknown token"});

  m = base;
  erase(m, "tokenizer.ggml.unknown_token_id");
  list(m, "tokenizer.ggml.token_type")[0] = int_value(ValueType::I32, 2);
  list(m, "tokenizer.ggml.token_type")[1] = int_value(ValueType::I32, 2);
  expect_msg(m, {"marks two tokens UNKNOWN (0 and 1)"});

  m = base;
  *m.find("tokenizer.ggml.unknown_token_id") = int_value(ValueType::U32, 9999);
  expect_msg(m, {"tokenizer.ggml.unknown_token_id = 9999 is past the 512 tokens"});

  m = base;
  erase(m, "tokenizer.ggml.bos_token_id");
  expect_msg(m, {"add_bos_token is set but there is no bos_token_id"});
  erase(m, "tokenizer.ggml.add_bos_token");  // then llama.cpp's default (add a BOS) needs none
  EXPECT_EQ(import_error(m, dir), "");
  EXPECT_EQ(read_json_file(dir / "out" / "tokenizer_config.json")["add_bos_token"], false);

  m = base;
  list(m, "tokenizer.ggml.tokens").clear();
  list(m, "tokenizer.ggml.scores").clear();
  list(m, "tokenizer.ggml.token_type").clear();
  expect_msg(m, {"tokenizer.ggml.tokens is empty"});
}

// llama.cpp keeps Llama 3.1's rope scaling as per-frequency divisors (rope_freqs.weight); the
// import recovers the config.json parameters from them.
TEST(GgufImport, Llama3RopeFactors) {
  TempDir dir;
  for (const int64_t old_ctx : {64, 16}) {  // two frequencies in the smoothed band, then one
    const double factor = 4, low = 1, high = 4, theta = 10000;
    std::string divisors;
    for (int i = 0; i < 8; ++i) {  // head_dim 16, as transformers computes the scaled frequencies
      const double inv = std::pow(theta, -2.0 * i / 16.0), wavelen = 2 * std::numbers::pi / inv;
      double scaled = inv;
      if (wavelen > static_cast<double>(old_ctx) / low) {
        scaled = inv / factor;
      } else if (wavelen >= static_cast<double>(old_ctx) / high) {
        const double smooth = (static_cast<double>(old_ctx) / wavelen - low) / (high - low);
        scaled = (1 - smooth) * inv / factor + smooth * inv;
      }
      put<float>(divisors, static_cast<float>(inv / scaled));
    }
    Model m = model_of(kTinyLlama);
    m.add_tensor("rope_freqs.weight", {8}, GgmlType::F32, divisors);
    m.metadata.emplace_back("llama.rope.scaling.original_context_length", int_value(ValueType::U32, old_ctx));
    ASSERT_EQ(import_error(m, dir), "");
    const LlamaConfig c = parse_llama_config(read_json_file(dir / "out" / "config.json"), "imported");
    EXPECT_EQ(c.rope_scaling.type, "llama3");
    EXPECT_NEAR(c.rope_scaling.factor, factor, 1e-6);
    EXPECT_NEAR(c.rope_scaling.low_freq_factor, low, 1e-3) << old_ctx;
    EXPECT_NEAR(c.rope_scaling.high_freq_factor, high, 1e-3) << old_ctx;
    EXPECT_EQ(c.rope_scaling.original_max_position_embeddings, old_ctx);
    EXPECT_FALSE(Checkpoint::open(dir / "out").has("rope_freqs.weight"));

    // Divisors of another shape of scaling are refused.
    const size_t i = m.tensor_index("rope_freqs.weight");
    const float odd = 2.5f;
    std::memcpy(m.data[i].data(), &odd, 4);
    const std::string msg = import_error(m, dir);
    EXPECT_NE(msg.find("rope_freqs.weight"), std::string::npos) << msg;
    EXPECT_NE(msg.find("does not match Llama 3 rope scaling"), std::string::npos) << msg;
  }
}

TEST(GgufImport, NameMapping) {
  EXPECT_EQ(gguf_to_hf_name("token_embd.weight"), "model.embed_tokens.weight");
  EXPECT_EQ(gguf_to_hf_name("output.weight"), "lm_head.weight");
  EXPECT_EQ(gguf_to_hf_name("blk.12.attn_output.weight"), "model.layers.12.self_attn.o_proj.weight");
  EXPECT_EQ(gguf_to_hf_name("blk.3.ffn_norm.weight"), "model.layers.3.post_attention_layernorm.weight");
  EXPECT_EQ(gguf_to_hf_name("blk.3.attn_k.bias"), "model.layers.3.self_attn.k_proj.bias");
  EXPECT_EQ(gguf_to_hf_name("blk.3.ffn_norm.bias"), "");
  EXPECT_EQ(gguf_to_hf_name("blk.99999999999.attn_q.weight"), "");
  EXPECT_EQ(gguf_to_hf_name("rope_freqs.weight"), "");
}

}  // namespace
}  // namespace fineserve::ckpt
