// In-memory synthetic checkpoints (models/synthetic.h): they load through every architecture's
// usual path; dense ones hold exactly the tensors write_synthetic writes (identical logits);
// quantized ones are laid out as `fineserve quantize` writes a checkpoint and give finite logits;
// the values do not depend on the thread count; bad requests are errors.
#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <regex>
#include <set>
#include <span>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "kernels/backend.h"
#include "kernels/base.h"
#include "kernels/half.h"
#include "models/checkpoint/config.h"
#include "models/checkpoint/safetensors.h"
#include "models/model.h"
#include "models/synthetic.h"
#include "quant/convert.h"
#include "tests/models/golden_util.h"

namespace fineserve {
namespace {
namespace fs = std::filesystem;

const fs::path& kGolden = testing::kGoldenDir;
using testing::Scratch;

// The small configs of the golden tests: OPT (pre-LN, tied head), Llama (GQA, untied head) and
// Mixtral (4 experts, top 2), all with K = 64 or more so that group 32 is allowed.
const char* const kArchitectures[] = {"opt-preln", "llama-gqa", "mixtral-moe"};

nlohmann::json small_config(const std::string& arch) {
  return synthetic_config(kGolden / arch / "config.json", DType::F16);
}

const std::vector<int32_t> kPrompt = {1, 5, 9, 200, 17, 3, 42};

std::vector<float> logits_of(Model& model) { return testing::prefill_logits(model, kPrompt); }

bool all_finite(const std::vector<float>& v) {
  return std::all_of(v.begin(), v.end(), [](float x) { return std::isfinite(x); });
}

// Not a constant vector: the model computed something from its weights.
bool varies(const std::vector<float>& v) {
  return std::any_of(v.begin(), v.end(), [&](float x) { return x != v.front(); });
}

class SyntheticMemory : public ::testing::TestWithParam<const char*> {};

// Dense (fast generator): the in-memory checkpoint and the same tensors written to disk (sharded)
// load into models with bit-identical logits on the CPU; the weights look like N(0, stddev²).
TEST_P(SyntheticMemory, DenseGivesTheLogitsOfItsCopyOnDisk) {
  const std::string arch = GetParam();
  Scratch tmp;
  SyntheticWeights w;
  w.seed = 3;
  w.stddev = 0.1;
  SyntheticCheckpoint mem = make_synthetic_checkpoint(small_config(arch), w, "synthetic:" + arch);
  {
    std::vector<std::string> names;
    for (const ckpt::TensorInfo* t : mem.checkpoint->tensors()) names.push_back(t->name);
    ckpt::CheckpointWriter writer(tmp.path(), names, mem.checkpoint->metadata(), 64 << 10);
    for (const ckpt::TensorInfo* t : mem.checkpoint->tensors()) {
      const ckpt::TensorView v = mem.checkpoint->get(t->name);
      writer.add(t->name, v.dtype(), v.shape(), std::span<const std::byte>(v.data, v.nbytes()));
    }
    writer.finish();
    std::ofstream(tmp.path() / "config.json") << mem.config.dump(2);
  }
  ASSERT_GT(ckpt::Checkpoint::open(tmp.path()).files().size(), 1u);

  // The weights: mean 0, standard deviation 0.1, within ±3.47 standard deviations.
  const ckpt::TensorView e = mem.checkpoint->get(arch == "opt-preln" ? "model.decoder.embed_tokens.weight"
                                                                     : "model.embed_tokens.weight");
  ASSERT_EQ(e.dtype(), DType::F16);
  double sum = 0, sum2 = 0, maxabs = 0;
  for (int64_t i = 0; i < e.numel(); ++i) {
    uint16_t h;
    std::memcpy(&h, e.data + 2 * i, 2);
    const double x = half_to_float(h);
    sum += x;
    sum2 += x * x;
    maxabs = std::max(maxabs, std::abs(x));
  }
  const double n = static_cast<double>(e.numel());
  EXPECT_NEAR(sum / n, 0.0, 0.005);
  EXPECT_NEAR(std::sqrt(sum2 / n), 0.1, 0.003);
  EXPECT_LE(maxabs, 0.347);
  EXPECT_GE(maxabs, 0.25);

  auto backend = make_cpu_backend();
  auto from_disk = load_model(tmp.path(), *backend);
  auto from_memory = load_synthetic_model(std::move(mem), *backend);
  EXPECT_EQ(from_memory->info().architecture, from_disk->info().architecture);
  EXPECT_EQ(from_memory->info().weight_bytes, from_disk->info().weight_bytes);
  const std::vector<float> want = logits_of(*from_disk), got = logits_of(*from_memory);
  ASSERT_TRUE(all_finite(want));
  ASSERT_TRUE(varies(want));
  EXPECT_EQ(got, want);
}

// Quantized: the tensors, metadata and quantization_config are those `fineserve quantize` writes
// with a fixed group (only the values differ: compared at int4, the format with packing), and the
// model loads and gives finite logits (int8 and int4).
TEST_P(SyntheticMemory, QuantizedIsLaidOutAsTheQuantizerWritesIt) {
  const std::string arch = GetParam();
  Scratch tmp;
  SynthOptions so;
  so.config = kGolden / arch / "config.json";
  so.out = tmp.path() / "dense";
  write_synthetic(so);
  {
    SyntheticWeights w;
    w.bits = 8;
    w.group = -1;
    auto backend = make_cpu_backend();
    auto model = load_synthetic_model(make_synthetic_checkpoint(small_config(arch), w), *backend);
    EXPECT_EQ(model->info().quantization, "finequant-int8");
    const std::vector<float> logits = logits_of(*model);
    EXPECT_TRUE(all_finite(logits));
    EXPECT_TRUE(varies(logits));
  }
  for (int bits : {4}) {
    SCOPED_TRACE("bits " + std::to_string(bits));
    quant::ConvertOptions o;
    o.model = so.out;
    o.out = tmp.path() / ("q" + std::to_string(bits));
    o.group.bits = bits;
    o.group.mode = quant::GroupMode::Fixed;
    o.group.group = 32;
    o.keep = quant::default_keep_patterns();
    quant::convert_checkpoint(o);
    const ckpt::Checkpoint real = ckpt::Checkpoint::open(o.out);
    const nlohmann::json real_config = ckpt::read_json_file(o.out / "config.json");

    SyntheticWeights w;
    w.bits = bits;
    w.group = 32;
    SyntheticCheckpoint mem = make_synthetic_checkpoint(small_config(arch), w, "synthetic:" + arch);
    ASSERT_EQ(mem.checkpoint->tensors().size(), real.tensors().size());
    for (const ckpt::TensorInfo* t : real.tensors()) {
      const ckpt::TensorInfo* m = mem.checkpoint->find(t->name);
      ASSERT_NE(m, nullptr) << t->name;
      EXPECT_EQ(m->dtype, t->dtype) << t->name;
      EXPECT_EQ(m->shape, t->shape) << t->name;
    }
    const ckpt::Metadata& rm = real.metadata();
    const ckpt::Metadata& mm = mem.checkpoint->metadata();
    for (const char* key : {"format", "quantizer_version", "bits", "group_mode", "groups"})
      EXPECT_EQ(mm.at(key), rm.at(key)) << key;
    EXPECT_TRUE(mm.count("source_fingerprint"));
    nlohmann::json qc = mem.config.at("quantization_config"), rqc = real_config.at("quantization_config");
    qc.erase("source_fingerprint");
    rqc.erase("source_fingerprint");
    EXPECT_EQ(qc, rqc);

    auto backend = make_cpu_backend();
    auto model = load_synthetic_model(std::move(mem), *backend);
    EXPECT_EQ(model->info().quantization, "finequant-int" + std::to_string(bits));
    const std::vector<float> logits = logits_of(*model);
    EXPECT_TRUE(all_finite(logits));
    EXPECT_TRUE(varies(logits));
  }
}

INSTANTIATE_TEST_SUITE_P(Architectures, SyntheticMemory, ::testing::ValuesIn(kArchitectures));

// Dense (exact_gaussian): the in-memory checkpoint holds byte for byte the tensors write_synthetic
// writes for the same config and seed, and the two load into models with bit-identical logits.
// (OPT: biases and LayerNorms; Mixtral: experts and the router. Llama adds no kind of tensor.)
void expect_exact_gaussian_matches_write_synthetic(const std::string& arch) {
  SCOPED_TRACE(arch);
  Scratch tmp;
  SynthOptions so;
  so.config = kGolden / arch / "config.json";
  so.out = tmp.path() / "disk";
  so.seed = 11;
  so.stddev = 0.1;
  write_synthetic(so);

  SyntheticWeights w;
  w.seed = 11;
  w.stddev = 0.1;
  w.exact_gaussian = true;
  SyntheticCheckpoint mem = make_synthetic_checkpoint(small_config(arch), w, "synthetic:" + arch);
  EXPECT_EQ(mem.config, ckpt::read_json_file(so.out / "config.json"));
  const ckpt::Checkpoint disk = ckpt::Checkpoint::open(so.out);
  ASSERT_EQ(mem.checkpoint->tensors().size(), disk.tensors().size());
  for (const ckpt::TensorInfo* t : disk.tensors()) {
    ASSERT_TRUE(mem.checkpoint->has(t->name)) << t->name;
    const ckpt::TensorView a = mem.checkpoint->get(t->name), b = disk.get(t->name);
    EXPECT_EQ(a.dtype(), b.dtype()) << t->name;
    EXPECT_EQ(a.shape(), b.shape()) << t->name;
    ASSERT_EQ(a.nbytes(), b.nbytes()) << t->name;
    EXPECT_EQ(std::memcmp(a.data, b.data, a.nbytes()), 0) << t->name;
  }
  EXPECT_EQ(synthetic_checkpoint_bytes(small_config(arch), w), mem.checkpoint->total_bytes() -
                                                                   (mem.checkpoint->files().front()->header_json().size() + 8));

  auto backend = make_cpu_backend();
  auto from_disk = load_model(so.out, *backend);
  auto from_memory = load_synthetic_model(std::move(mem), *backend);
  EXPECT_EQ(from_memory->info().quantization, "none");
  EXPECT_EQ(from_memory->info().weight_bytes, from_disk->info().weight_bytes);
  const std::vector<float> want = logits_of(*from_disk), got = logits_of(*from_memory);
  ASSERT_TRUE(all_finite(want));
  ASSERT_TRUE(varies(want));
  EXPECT_EQ(got, want);
}

TEST(SyntheticMemoryExact, OptMatchesWriteSynthetic) { expect_exact_gaussian_matches_write_synthetic("opt-preln"); }
TEST(SyntheticMemoryExact, MixtralMatchesWriteSynthetic) { expect_exact_gaussian_matches_write_synthetic("mixtral-moe"); }

// Mixed precisions on the MoE: int8 attention with int4 experts records matrix_bits as
// `quantize --expert-bits 4` does; 16-bit attention with int4 experts quantizes only the experts.
TEST(SyntheticMemoryMoe, ExpertBits) {
  {
    SyntheticWeights w;
    w.bits = 8;
    w.expert_bits = 4;
    w.group = -1;  // column-wise
    SyntheticCheckpoint mem = make_synthetic_checkpoint(small_config("mixtral-moe"), w);
    const ckpt::Checkpoint& c = *mem.checkpoint;
    EXPECT_EQ(c.metadata().at("bits"), "8");
    EXPECT_EQ(c.metadata().at("expert_bits"), "4");
    const nlohmann::json mb = nlohmann::json::parse(c.metadata().at("matrix_bits"));
    EXPECT_EQ(mb.at("model.layers.0.self_attn.q_proj"), 8);
    EXPECT_EQ(mb.at("model.layers.1.block_sparse_moe.experts.3.w2"), 4);
    EXPECT_EQ(c.find("model.layers.0.self_attn.q_proj.qweight")->dtype, DType::I8);
    EXPECT_EQ(c.find("model.layers.0.block_sparse_moe.experts.0.w1.qweight")->dtype, DType::U8);
    EXPECT_EQ(c.find("model.layers.0.block_sparse_moe.experts.0.w1.scales")->shape, (std::vector<int64_t>{64, 1}));
    EXPECT_TRUE(c.has("model.layers.0.block_sparse_moe.gate.weight"));  // the router stays 16-bit
    EXPECT_TRUE(c.has("lm_head.weight"));
    auto backend = make_cpu_backend();
    auto model = load_synthetic_model(std::move(mem), *backend);
    EXPECT_EQ(model->info().quantization, "finequant-int8,experts-int4");
    EXPECT_TRUE(all_finite(logits_of(*model)));
  }
  {
    SyntheticWeights w;
    w.bits = 0;
    w.expert_bits = 4;
    w.group = 32;
    SyntheticCheckpoint mem = make_synthetic_checkpoint(small_config("mixtral-moe"), w);
    const ckpt::Checkpoint& c = *mem.checkpoint;
    EXPECT_EQ(c.metadata().at("bits"), "4");
    EXPECT_EQ(c.metadata().count("matrix_bits"), 0u);
    EXPECT_TRUE(c.has("model.layers.0.self_attn.q_proj.weight"));
    EXPECT_TRUE(c.has("model.layers.0.block_sparse_moe.experts.0.w2.qweight"));
    auto backend = make_cpu_backend();
    auto model = load_synthetic_model(std::move(mem), *backend);
    EXPECT_EQ(model->info().quantization, "finequant-int4");
    EXPECT_TRUE(all_finite(logits_of(*model)));
  }
}

// Codes are in the storage format's range and not constant; scales are positive and finite.
TEST(SyntheticMemoryValues, CodesAndScalesArePlausible) {
  for (int bits : {8, 4}) {
    SyntheticWeights w;
    w.bits = bits;
    w.group = 32;
    SyntheticCheckpoint mem = make_synthetic_checkpoint(small_config("llama-gqa"), w);
    const ckpt::TensorView q = mem.checkpoint->get("model.layers.1.mlp.down_proj.qweight");
    std::set<int> seen;
    for (uint64_t i = 0; i < q.nbytes(); ++i) {
      const auto b = static_cast<uint8_t>(q.data[i]);
      if (bits == 8) {
        const int code = static_cast<int8_t>(b);
        ASSERT_GE(code, -127);
        seen.insert(code);
      } else {
        ASSERT_GE(b & 0xf, 1);
        ASSERT_GE(b >> 4, 1);
        seen.insert(b & 0xf);
        seen.insert(b >> 4);
      }
    }
    EXPECT_GE(seen.size(), bits == 8 ? 200u : 15u);  // every int4 code appears; most int8 ones
    const ckpt::TensorView s = mem.checkpoint->get("model.layers.1.mlp.down_proj.scales");
    std::set<uint16_t> scales;
    for (int64_t i = 0; i < s.numel(); ++i) {
      uint16_t h;
      std::memcpy(&h, s.data + 2 * i, 2);
      const float f = half_to_float(h);
      ASSERT_TRUE(std::isfinite(f) && f > 0) << f;
      ASSERT_LT(f, 0.02f * 5 / 7) << "a scale far above a Gaussian group's absmax / qmax";
      scales.insert(h);
    }
    EXPECT_GT(scales.size(), 10u);
  }
}

// The generated bytes depend on the seed and the config, not on the number of threads.
TEST(SyntheticMemoryValues, IndependentOfThreadCount) {
  auto image = [](int threads, int bits, bool exact, uint64_t seed) {
    const int saved = omp_get_max_threads();
    omp_set_num_threads(threads);
    SyntheticWeights w;
    w.bits = bits;
    w.group = 32;
    w.seed = seed;
    w.exact_gaussian = exact;
    // Tensors large enough to be generated by several threads: the embedding spans several
    // chunks of either Gaussian generator, fc1/fc2 more than 8192 words of codes and scales.
    nlohmann::json config = small_config("opt-preln");
    config["vocab_size"] = 1100;
    config["ffn_dim"] = 4096;
    config["num_hidden_layers"] = 1;
    SyntheticCheckpoint mem = make_synthetic_checkpoint(config, w);
    omp_set_num_threads(saved);
    std::vector<std::byte> all;
    for (const ckpt::TensorInfo* t : mem.checkpoint->tensors()) {
      const ckpt::TensorView v = mem.checkpoint->get(t->name);
      all.insert(all.end(), v.data, v.data + v.nbytes());
    }
    return all;
  };
  for (const auto& [bits, exact] : {std::pair{0, false}, std::pair{0, true}, std::pair{8, false}, std::pair{4, false}}) {
    SCOPED_TRACE("bits " + std::to_string(bits) + (exact ? " exact" : ""));
    const auto one = image(1, bits, exact, 5);
    EXPECT_EQ(image(3, bits, exact, 5), one);
    EXPECT_NE(image(2, bits, exact, 6), one);  // the seed matters
    EXPECT_TRUE(std::any_of(one.begin(), one.end(), [](std::byte b) { return b != std::byte{0}; }));
  }
}

TEST(SyntheticMemoryErrors, BadRequests) {
  const nlohmann::json config = small_config("llama-gqa");  // hidden 64, intermediate 128
  auto expect_error = [&](const SyntheticWeights& w, const std::string& needle, const nlohmann::json& c) {
    try {
      (void)make_synthetic_checkpoint(c, w);
      ADD_FAILURE() << "expected an Error mentioning '" << needle << "'";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
    EXPECT_THROW((void)synthetic_checkpoint_bytes(c, w), Error);
  };
  SyntheticWeights w;
  w.bits = 3;
  expect_error(w, "bits", config);
  w = {};
  w.bits = 8;
  w.expert_bits = 2;
  expect_error(w, "expert bits", config);
  w = {};
  w.bits = 4;
  w.group = 128;  // does not divide K = 64 of q_proj
  expect_error(w, "group 128 is not allowed", config);
  w.group = 48;  // not a power of two
  expect_error(w, "group 48", config);
  w.group = 0;
  expect_error(w, "group", config);
  w = {};
  w.keep = {"("};
  expect_error(w, "keep pattern", config);
  w = {};
  w.dtype = DType::I8;
  expect_error(w, "F32, F16 or BF16", config);
  w = {};
  nlohmann::json gpt = config;
  gpt["model_type"] = "gpt2";
  expect_error(w, "gpt2", gpt);
  nlohmann::json bad = config;
  bad["num_attention_heads"] = 5;  // does not divide hidden_size
  EXPECT_THROW((void)make_synthetic_checkpoint(bad, w), Error);
  // A dense model with a group that fits nothing is fine: nothing is quantized.
  w.group = 48;
  EXPECT_NO_THROW((void)make_synthetic_checkpoint(config, w));
}

}  // namespace
}  // namespace fineserve
