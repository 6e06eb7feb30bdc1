// Llama and Mistral against golden logits and greedy continuations from Hugging Face transformers
// (tests/models/make_golden_llama.py), dense and FineQuant int8 / int4.
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <numbers>
#include <cstring>
#include <filesystem>
#include <fstream>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "engine/engine.h"
#include "kernels/backend.h"
#include "kernels/base.h"
#include "models/checkpoint/config.h"
#include "models/checkpoint/safetensors.h"
#include "models/llama.h"
#include "models/llama_layout.h"
#include "models/model.h"
#include "models/tokenizer/tokenizer.h"
#include "quant/convert.h"
#include "quant/quantizer.h"
#include "tests/models/golden_util.h"

namespace fineserve {
namespace {
namespace fs = std::filesystem;
using testing::convert_options;
using testing::Golden;
using testing::Scratch;
using testing::greedy;
using testing::prefill_logits;
using testing::read_golden;
using testing::rel_fro_error;
using testing::rel_max_error;
using testing::write_dequantized;

const fs::path& kGolden = testing::kGoldenDir;
const char* const kFixtures[] = {"llama-gqa", "llama-rope3-bias", "mistral-swa"};

// Copies checkpoint `base` to `out`, taking the tensors whose names contain `pattern` from `other`
// instead (both FineQuant checkpoints of the same model with the same bits).
void write_hybrid(const fs::path& base, const fs::path& other, const std::string& pattern, const fs::path& out) {
  const ckpt::Checkpoint a = ckpt::Checkpoint::open(base), b = ckpt::Checkpoint::open(other);
  std::vector<std::string> names;
  for (const auto* t : a.tensors()) names.push_back(t->name);
  fs::create_directories(out);
  ckpt::CheckpointWriter w(out, names, a.metadata(), 1ull << 40);
  for (const auto* t : a.tensors()) {
    const ckpt::TensorView v = t->name.find(pattern) != std::string::npos ? b.get(t->name) : a.get(t->name);
    w.add(t->name, v.dtype(), v.shape(), std::span<const std::byte>(v.data, v.nbytes()));
  }
  w.finish();
  fs::copy_file(base / "config.json", out / "config.json");
}

class LlamaGolden : public ::testing::TestWithParam<std::string> {};

TEST_P(LlamaGolden, DenseLogitsAndGreedyMatchTransformers) {
  const fs::path dir = kGolden / GetParam();
  const Golden g = read_golden(dir);
  auto tok = load_tokenizer(dir);
  auto backend = make_cpu_backend();
  auto model = load_model(dir, *backend);
  ASSERT_EQ(model->info().vocab_size, g.vocab);
  EXPECT_EQ(model->info().architecture, GetParam().starts_with("mistral") ? "mistral" : "llama");
  EXPECT_EQ(model->info().quantization, "none");
  for (const auto& p : g.prompts) {
    EXPECT_EQ(tok->encode(p.text), p.ids) << p.text;
    const double err = rel_max_error(prefill_logits(*model, p.ids), p.logits);
    // fp32 math on both sides from the same fp16 weights: only summation order differs (~1e-6).
    EXPECT_LE(err, 1e-5) << GetParam() << ": " << p.text;
  }
  // Greedy continuations: the whole batch at once, and again with 3-token prefill chunks (which
  // also crosses mistral-swa's 5-position window between chunks).
  for (int chunk : {512, 3}) {
    const auto out = greedy(*model, tok.get(), g, chunk);
    for (size_t i = 0; i < g.prompts.size(); ++i) EXPECT_EQ(out[i], g.prompts[i].greedy) << "chunk " << chunk;
  }
}

// The quantized path is exact: the model on int8 / int4 codes gives the logits of the same model on
// the dequantized weights stored densely (fp32), up to accumulation order. Against transformers'
// fp16 logits the error stays within what the quantizer's noise explains (see test_opt_quantized).
TEST_P(LlamaGolden, QuantizedMatchesDequantizedDense) {
  const fs::path dir = kGolden / GetParam();
  const Golden g = read_golden(dir);
  for (bool quantize_embeddings : {false, true}) {
    for (int bits : {8, 4}) {
      const std::string what = GetParam() + " int" + std::to_string(bits) + (quantize_embeddings ? " +embeddings" : "");
      Scratch tmp;
      const quant::ConvertOptions o = convert_options(dir, tmp.path() / "q", bits, quantize_embeddings);
      quant::convert_checkpoint(o);
      // The embedding (and a tied LM head) quantized too, or kept in 16 bits.
      EXPECT_EQ(ckpt::Checkpoint::open(o.out).has("model.embed_tokens.qweight"), quantize_embeddings) << what;
      write_dequantized(o.out, tmp.path() / "deq");
      auto backend = make_cpu_backend();
      auto quantized = load_model(o.out, *backend);
      auto dense = load_model(tmp.path() / "deq", *backend);
      EXPECT_EQ(quantized->info().quantization, "finequant-int" + std::to_string(bits));
      EXPECT_LT(quantized->info().weight_bytes, dense->info().weight_bytes);
      for (const auto& p : g.prompts) {
        const std::vector<float> q = prefill_logits(*quantized, p.ids);
        EXPECT_LE(rel_max_error(q, prefill_logits(*dense, p.ids)), 1e-4) << what;
        const double fro = rel_fro_error(q, p.logits);
        EXPECT_LE(fro, bits == 8 ? 0.06 : 0.9) << what;
        std::printf("%s: logits vs transformers: rel Frobenius error %.4f\n", what.c_str(), fro);
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, LlamaGolden, ::testing::Values("llama-gqa", "llama-rope3-bias", "mistral-swa"));

// gate_proj and up_proj run as one fused matrix: halves quantized with different group sizes, and
// a quantized half beside a dense one, must still give the dequantized dense model's logits.
TEST(LlamaFusedGateUp, MixedGroupsAndMixedPrecision) {
  const fs::path dir = kGolden / "llama-gqa";
  const Golden g = read_golden(dir);
  Scratch tmp;
  quant::ConvertOptions g32 = convert_options(dir, tmp.path() / "g32", 4);
  g32.group.mode = quant::GroupMode::Fixed;
  g32.group.group = 32;
  quant::convert_checkpoint(g32);
  quant::ConvertOptions colwise = convert_options(dir, tmp.path() / "colwise", 4);
  colwise.group.mode = quant::GroupMode::Fixed;
  colwise.group.group = -1;
  quant::convert_checkpoint(colwise);
  write_hybrid(g32.out, colwise.out, "gate_proj", tmp.path() / "mixed-groups");

  quant::ConvertOptions half_dense = convert_options(dir, tmp.path() / "half-dense", 8);
  half_dense.keep.push_back("up_proj");
  quant::convert_checkpoint(half_dense);

  for (const fs::path& q : {tmp.path() / "mixed-groups", half_dense.out}) {
    const fs::path deq = tmp.path() / (q.filename().string() + "-deq");
    write_dequantized(q, deq);
    auto backend = make_cpu_backend();
    auto quantized = load_model(q, *backend);
    auto dense = load_model(deq, *backend);
    for (const auto& p : g.prompts)
      EXPECT_LE(rel_max_error(prefill_logits(*quantized, p.ids), prefill_logits(*dense, p.ids)), 1e-4) << q;
  }
}

TEST(LlamaInvFreq, ScalingVariants) {
  ckpt::LlamaConfig c;
  c.head_dim = 8;
  c.rope_theta = 10000;
  const std::vector<float> plain = llama_inv_freq(c);
  ASSERT_EQ(plain.size(), 4u);
  for (size_t i = 0; i < plain.size(); ++i)
    EXPECT_FLOAT_EQ(plain[i], static_cast<float>(std::pow(10000.0, -2.0 * static_cast<double>(i) / 8.0)));

  c.rope_scaling.type = "linear";
  c.rope_scaling.factor = 4;
  const std::vector<float> linear = llama_inv_freq(c);
  for (size_t i = 0; i < plain.size(); ++i) EXPECT_FLOAT_EQ(linear[i], plain[i] / 4);

  // llama3: wavelengths 2π, 2π·10, 2π·100, 2π·1000 against a context of 64 (low band > 64,
  // high band < 16): kept, smoothed, divided, divided.
  c.rope_scaling = {"llama3", 8.0, 1.0, 4.0, 64};
  const std::vector<float> l3 = llama_inv_freq(c);
  EXPECT_FLOAT_EQ(l3[0], plain[0]);
  const double wavelen = 2 * std::numbers::pi / plain[1], smooth = (64 / wavelen - 1.0) / 3.0;
  EXPECT_NEAR(l3[1], (1 - smooth) * plain[1] / 8 + smooth * plain[1], 1e-6);
  EXPECT_FLOAT_EQ(l3[2], plain[2] / 8);
  EXPECT_FLOAT_EQ(l3[3], plain[3] / 8);
}

// Wrong shapes and missing tensors are reported by name.
TEST(LlamaLoad, BadCheckpointsAreClearErrors) {
  const fs::path dir = kGolden / "llama-gqa";
  auto config = nlohmann::json::parse(std::ifstream(dir / "config.json"));
  Scratch tmp;
  auto try_config = [&](const nlohmann::json& cfg) -> std::string {
    fs::remove_all(tmp.path() / "m");
    fs::create_directories(tmp.path() / "m");
    fs::copy_file(dir / "model.safetensors", tmp.path() / "m" / "model.safetensors");
    std::ofstream(tmp.path() / "m" / "config.json") << cfg.dump();
    auto backend = make_cpu_backend();
    try {
      load_model(tmp.path() / "m", *backend);
    } catch (const Error& e) {
      return e.what();
    }
    return "";
  };
  auto wide = config;
  wide["intermediate_size"] = 96;
  EXPECT_NE(try_config(wide).find("gate_proj.weight"), std::string::npos) << try_config(wide);
  auto tied = config;
  tied["attention_bias"] = true;
  EXPECT_NE(try_config(tied).find("q_proj.bias"), std::string::npos) << try_config(tied);
  auto heads = config;
  heads["num_key_value_heads"] = 3;
  EXPECT_NE(try_config(heads).find("num_key_value_heads"), std::string::npos) << try_config(heads);
}

// The layout lists exactly the tensors the fixtures hold.
TEST(LlamaLayout, MatchesTransformersCheckpoints) {
  for (const char* name : kFixtures) {
    const fs::path dir = kGolden / name;
    const auto config = ckpt::parse_llama_config(ckpt::read_json_file(dir / "config.json"), name);
    const ckpt::Checkpoint c = ckpt::Checkpoint::open(dir);
    const auto specs = llama_tensor_specs(config);
    EXPECT_EQ(specs.size(), c.tensors().size()) << name;
    for (const TensorSpec& s : specs) {
      ASSERT_TRUE(c.has(s.name)) << name << ": " << s.name;
      EXPECT_EQ(c.get(s.name).shape(), s.shape) << name << ": " << s.name;
    }
  }
}

}  // namespace
}  // namespace fineserve
