// quant/gguf_convert.h: GGUF's Q4_0 / Q8_0 / Q4_1 blocks re-laid as FineQuant codes bit-exactly
// (against gguf-py's own dequantization, tests/checkpoint/make_gguf_fixtures.py), a whole model
// converted (against the dense import of the same file), the conversion cache of `serve --model
// FILE.gguf`, and bad files refused with clear errors.
#include "quant/gguf_convert.h"

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <thread>

#include <gtest/gtest.h>

#include "kernels/half.h"
#include "models/checkpoint/config.h"
#include "models/checkpoint/gguf.h"
#include "models/checkpoint/safetensors.h"
#include "quant/format.h"
#include "tests/checkpoint/test_util.h"

namespace fineserve::quant {
namespace {

namespace fs = std::filesystem;
using ckpt::testing::expect_error;
using ckpt::testing::TempDir;

const fs::path kData = fs::path(FINESERVE_TEST_DATA) / "gguf";

// Reads a FineQuant matrix `stem` of a checkpoint back into a QuantizedMatrix.
QuantizedMatrix read_matrix(const ckpt::Checkpoint& c, const std::string& stem, int bits, int64_t rows, int64_t cols,
                            int64_t group) {
  QuantizedMatrix q;
  q.rows = rows;
  q.cols = cols;
  q.bits = bits;
  q.group = group;
  const ckpt::TensorView codes = c.get(codes_name(stem)), scales = c.get(scales_name(stem));
  q.codes.resize(codes.nbytes());
  std::memcpy(q.codes.data(), codes.data, codes.nbytes());
  q.scales.resize(scales.nbytes() / 2);
  std::memcpy(q.scales.data(), scales.data, scales.nbytes());
  if (c.has(offsets_name(stem))) {
    const ckpt::TensorView o = c.get(offsets_name(stem));
    EXPECT_EQ(o.dtype(), kOffsetDType);
    q.offsets.resize(o.nbytes() / 4);
    std::memcpy(q.offsets.data(), o.data, o.nbytes());
  }
  return q;
}

std::vector<float> tensor_f32(const ckpt::TensorView& t) {
  std::vector<float> v(t.nbytes() / 4);
  std::memcpy(v.data(), t.data, t.nbytes());
  return v;
}
std::vector<float> gguf_f32(const ckpt::gguf::File& f, const ckpt::gguf::TensorInfo& t) {
  std::vector<float> v(static_cast<size_t>(t.numel));
  std::memcpy(v.data(), f.data(t).data(), v.size() * 4);
  return v;
}

TEST(GgufConvert, LegacyBlocksAreReLaidBitExactly) {
  const auto f = ckpt::gguf::File::open(kData / "dequant.gguf");
  int checked = 0;
  for (const char* name : {"q4_0", "q4_1", "q8_0"}) {
    SCOPED_TRACE(name);
    const ckpt::gguf::TensorInfo* t = f->header().find_tensor(name);
    const ckpt::gguf::TensorInfo* e = f->header().find_tensor(std::string(name) + ".expected");
    ASSERT_NE(t, nullptr);
    ASSERT_NE(e, nullptr);
    const int64_t rows = t->shape()[0], cols = t->shape()[1];
    const std::optional<QuantizedMatrix> q = relay_gguf_blocks(t->type, f->data(*t), rows, cols);
    ASSERT_TRUE(q.has_value());
    EXPECT_EQ(q->group, 32);
    EXPECT_EQ(q->bits, std::string(name) == "q8_0" ? 8 : 4);
    EXPECT_EQ(q->offsets.empty(), std::string(name) != "q4_1");  // only Q4_1 is asymmetric
    // Every scale is the block's fp16 d, bit for bit.
    const std::span<const std::byte> raw = f->data(*t);
    const int64_t block_bytes = ckpt::gguf::block_layout(t->type)->block_bytes;
    for (size_t g = 0; g < q->scales.size(); ++g) {
      uint16_t d;
      std::memcpy(&d, raw.data() + g * static_cast<size_t>(block_bytes), 2);
      ASSERT_EQ(q->scales[g], d) << "block " << g;
    }
    // And every weight is what gguf-py's dequantize() gives, exactly.
    const std::vector<float> got = dequantize(*q), want = gguf_f32(*f, *e);
    ASSERT_EQ(got.size(), want.size());
    for (size_t i = 0; i < got.size(); ++i) ASSERT_EQ(got[i], want[i]) << "element " << i;
    ++checked;
  }
  EXPECT_EQ(checked, 3);
  // Other types have no exact layout.
  const ckpt::gguf::TensorInfo* k = f->header().find_tensor("q4_k");
  ASSERT_NE(k, nullptr);
  EXPECT_FALSE(relay_gguf_blocks(k->type, f->data(*k), k->shape()[0], k->shape()[1]).has_value());
}

TEST(GgufConvert, WholeModelMatchesTheDenseImportExactly) {
  TempDir dir;
  GgufConvertOptions o;
  o.gguf = kData / "tiny-llama-q.gguf";
  o.out = dir / "native";
  const GgufConvertReport r = convert_gguf(o);
  EXPECT_EQ(r.import.architecture, "llama");
  EXPECT_EQ(r.exact, 15u);  // 2 layers x 7 matrices + the head + the embedding, less the Q5_0 one
  EXPECT_EQ(r.requantized, 1u);
  ASSERT_EQ(r.requantized_tensors.size(), 1u);
  EXPECT_EQ(r.requantized_tensors[0], "blk.1.ffn_up.weight");
  EXPECT_EQ(r.dense, 5u);  // the norms

  ckpt::GgufImportOptions d;
  d.gguf = o.gguf;
  d.out = dir / "dense";
  d.dtype = DType::F32;
  ckpt::import_gguf(d);

  const ckpt::Checkpoint got = ckpt::Checkpoint::open(o.out), want = ckpt::Checkpoint::open(d.out);
  const std::optional<FormatMetadata> fm = read_header_metadata(got.metadata(), "converted");
  ASSERT_TRUE(fm.has_value());
  EXPECT_EQ(fm->group_mode, "gguf");
  EXPECT_EQ(fm->source_format_of("model.layers.0.self_attn.q_proj"), "gguf:Q4_1");
  EXPECT_EQ(fm->source_format_of("model.layers.0.self_attn.k_proj"), "gguf:Q4_0");
  EXPECT_EQ(fm->source_format_of("model.layers.0.mlp.down_proj"), "gguf:Q8_0");
  EXPECT_EQ(fm->source_format_of("model.embed_tokens"), "gguf:Q8_0");
  EXPECT_EQ(fm->source_format_of("model.layers.1.mlp.up_proj"), "gguf:Q5_0/requantized");
  EXPECT_EQ(fm->bits_of("model.layers.1.mlp.up_proj"), 8);
  const nlohmann::json config = ckpt::read_json_file(o.out / "config.json");
  EXPECT_EQ(config.at("quantization_config").at("source_formats").at("lm_head"), "gguf:Q4_1");

  int exact = 0;
  for (const ckpt::TensorInfo* t : want.tensors()) {
    SCOPED_TRACE(t->name);
    const ckpt::TensorView dense = want.get(t->name);
    const std::vector<float> w = tensor_f32(dense);
    if (got.has(t->name)) {  // kept dense: the norms, F32 bit for bit
      const ckpt::TensorView g = got.get(t->name);
      EXPECT_EQ(g.dtype(), DType::F32);
      EXPECT_EQ(tensor_f32(g), w);
      continue;
    }
    const std::string stem = t->name.substr(0, t->name.size() - 7);
    const int64_t rows = dense.shape()[0], cols = dense.shape()[1];
    const QuantizedMatrix q = read_matrix(got, stem, fm->bits_of(stem), rows, cols, fm->groups.at(stem));
    const std::vector<float> v = dequantize(q);
    if (fm->source_format_of(stem).ends_with("/requantized")) {  // int8 g32 of the Q5_0 values
      double err = 0, norm = 0;
      for (size_t i = 0; i < v.size(); ++i) {
        err += (v[i] - w[i]) * (v[i] - w[i]);
        norm += w[i] * w[i];
      }
      EXPECT_LT(std::sqrt(err / norm), 0.01);
      continue;
    }
    // Exact: the FineQuant matrix dequantizes to the dense import's values (q/k rows permuted back
    // alike), bit for bit.
    ASSERT_EQ(v.size(), w.size());
    for (size_t i = 0; i < v.size(); ++i) ASSERT_EQ(v[i], w[i]) << "element " << i;
    ++exact;
  }
  EXPECT_EQ(exact, 15);
}

TEST(GgufConvert, ServingAGgufConvertsOnceAndReusesTheConversion) {
  TempDir dir;
  const fs::path gguf = dir / "model.gguf";
  fs::copy_file(kData / "tiny-llama-q.gguf", gguf);
  EXPECT_EQ(model_dir_for(dir.path()), dir.path());  // a directory: served as it is
  const fs::path out = model_dir_for(gguf);
  EXPECT_EQ(out, dir / "model.fineserve");
  ASSERT_TRUE(fs::exists(out / "config.json"));
  ASSERT_TRUE(fs::exists(out / "tokenizer.json"));
  const auto first = fs::last_write_time(out / "config.json");
  EXPECT_EQ(model_dir_for(gguf), out);  // reused: not written again
  EXPECT_EQ(fs::last_write_time(out / "config.json"), first);
  // A changed file (another modification time) is converted again.
  fs::last_write_time(gguf, fs::last_write_time(gguf) + std::chrono::seconds(5));
  EXPECT_EQ(model_dir_for(gguf), out);
  EXPECT_NE(fs::last_write_time(out / "config.json"), first);
}

TEST(GgufConvert, BadFilesAreClearErrors) {
  TempDir dir;
  // Truncated inside the tensor data: the parser names the file and what does not fit.
  const fs::path src = kData / "tiny-llama-q.gguf";
  const auto size = fs::file_size(src);
  for (uint64_t keep : {uint64_t{0}, uint64_t{3}, size / 3, size - 1}) {
    SCOPED_TRACE(keep);
    const fs::path cut = dir / ("cut-" + std::to_string(keep) + ".gguf");
    fs::copy_file(src, cut);
    fs::resize_file(cut, keep);
    GgufConvertOptions o;
    o.gguf = cut;
    o.out = dir / ("out-" + std::to_string(keep));
    expect_error([&] { convert_gguf(o); }, {cut.string()});
    EXPECT_FALSE(fs::exists(o.out));  // nothing half-written
    expect_error([&] { model_dir_for(cut); }, {cut.string()});
  }
  // Not a GGUF at all.
  const fs::path junk = dir / "junk.gguf";
  std::ofstream(junk) << "this is not a gguf file, just text that is long enough";
  GgufConvertOptions o;
  o.gguf = junk;
  o.out = dir / "junk-out";
  expect_error([&] { convert_gguf(o); }, {junk.string(), "magic"});
}

}  // namespace
}  // namespace fineserve::quant
