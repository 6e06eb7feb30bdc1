// Mixtral (sparse MoE) against golden logits and greedy continuations from Hugging Face
// transformers (tests/models/make_golden_mixtral.py), dense and FineQuant int8 / int4 / int8
// attention with int4 experts (`quantize --expert-bits`), plus its config and layout.
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <tuple>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "engine/engine.h"
#include "kernels/backend.h"
#include "kernels/base.h"
#include "kernels/cpu/cpu_backend.h"
#include "models/checkpoint/config.h"
#include "models/checkpoint/safetensors.h"
#include "models/llama_layout.h"
#include "models/model.h"
#include "models/synthetic.h"
#include "models/tokenizer/tokenizer.h"
#include "quant/convert.h"
#include "quant/quantizer.h"
#include "tests/models/golden_util.h"

namespace fineserve {
namespace {
namespace fs = std::filesystem;
using testing::Golden;
using testing::Scratch;
using testing::greedy;
using testing::prefill_logits;
using testing::read_golden;
using testing::rel_fro_error;
using testing::rel_max_error;
using testing::write_dequantized;

const fs::path kDir = fs::path(FINESERVE_TEST_DATA) / "golden" / "mixtral-moe";

TEST(MixtralConfig, DefaultsAsTransformers) {
  nlohmann::json j = {{"model_type", "mixtral"}, {"vocab_size", 100}, {"hidden_size", 64},
                      {"intermediate_size", 96}, {"num_hidden_layers", 2}, {"num_attention_heads", 16}};
  const ckpt::LlamaConfig c = ckpt::parse_llama_config(j, "c.json");
  EXPECT_TRUE(c.is_moe());
  EXPECT_EQ(c.num_local_experts, 8);
  EXPECT_EQ(c.num_experts_per_tok, 2);
  EXPECT_EQ(c.num_key_value_heads, 8);
  EXPECT_EQ(c.sliding_window, 0);  // MixtralConfig: None
  EXPECT_EQ(c.rope_theta, 1e6);
  EXPECT_EQ(c.rms_norm_eps, 1e-5);
  EXPECT_FALSE(c.attention_bias);
  EXPECT_EQ(ckpt::parse_llama_config(ckpt::to_json(c), "round trip"), c);
  EXPECT_EQ(ckpt::to_json(c)["architectures"][0], "MixtralForCausalLM");

  j["sliding_window"] = 4096;
  j["num_local_experts"] = 4;
  j["num_experts_per_tok"] = 1;
  j["router_aux_loss_coef"] = 0.02;  // training only
  const ckpt::LlamaConfig d = ckpt::parse_llama_config(j, "d.json");
  EXPECT_EQ(d.sliding_window, 4096);
  EXPECT_EQ(d.num_local_experts, 4);
  EXPECT_EQ(d.num_experts_per_tok, 1);

  // A dense Llama config has no experts.
  j["model_type"] = "llama";
  EXPECT_FALSE(ckpt::parse_llama_config(j, "l.json").is_moe());
}

// configs/models/mixtral-8x7b.json holds the published Mixtral-8x7B shape.
TEST(MixtralConfig, PresetHasTheRealShape) {
  const fs::path path = fs::path(FINESERVE_TEST_DATA) / ".." / ".." / "configs" / "models" / "mixtral-8x7b.json";
  const ckpt::LlamaConfig c = ckpt::parse_llama_config(ckpt::read_json_file(path), path.string());
  EXPECT_EQ(c.model_type, "mixtral");
  EXPECT_EQ(std::make_tuple(c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
                            c.intermediate_size, c.vocab_size),
            std::make_tuple(4096, 32, 32, 8, 14336, 32000));
  EXPECT_EQ(c.num_local_experts, 8);
  EXPECT_EQ(c.num_experts_per_tok, 2);
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_EQ(c.rope_theta, 1e6);
  EXPECT_EQ(c.sliding_window, 0);
  EXPECT_EQ(c.max_position_embeddings, 32768);
  EXPECT_EQ(c.torch_dtype, DType::BF16);
}

TEST(MixtralConfig, BadExpertCountsAreClearErrors) {
  nlohmann::json j = {{"model_type", "mixtral"}, {"hidden_size", 64}, {"num_attention_heads", 8},
                      {"num_local_experts", 4},  {"num_experts_per_tok", 5}};
  auto message = [&](const nlohmann::json& cfg) -> std::string {
    try {
      ckpt::parse_llama_config(cfg, "m.json");
    } catch (const Error& e) {
      return e.what();
    }
    return "";
  };
  EXPECT_NE(message(j).find("num_experts_per_tok"), std::string::npos) << message(j);
  j["num_experts_per_tok"] = 0;
  EXPECT_NE(message(j).find("num_experts_per_tok"), std::string::npos) << message(j);
  j["num_local_experts"] = 0;
  EXPECT_NE(message(j).find("num_local_experts"), std::string::npos) << message(j);
}

// The layout lists exactly the tensors transformers wrote, in the hub's block_sparse_moe layout.
TEST(MixtralLayout, MatchesTransformersCheckpoint) {
  const auto config = ckpt::parse_llama_config(ckpt::read_json_file(kDir / "config.json"), "mixtral");
  const ckpt::Checkpoint c = ckpt::Checkpoint::open(kDir);
  const auto specs = llama_tensor_specs(config);
  EXPECT_EQ(specs.size(), c.tensors().size());
  for (const TensorSpec& s : specs) {
    ASSERT_TRUE(c.has(s.name)) << s.name;
    EXPECT_EQ(c.get(s.name).shape(), s.shape) << s.name;
  }
  EXPECT_TRUE(c.has("model.layers.1.block_sparse_moe.experts.3.w2.weight"));
}

TEST(MixtralGolden, DenseLogitsAndGreedyMatchTransformers) {
  const Golden g = read_golden(kDir);
  auto tok = load_tokenizer(kDir);
  // The fast CPU path and the scalar reference (which runs the reference MoE ops).
  for (bool reference : {false, true}) {
    auto backend = make_cpu_backend(CpuOptions{.reference = reference});
    auto model = load_model(kDir, *backend);
    ASSERT_EQ(model->info().vocab_size, g.vocab);
    EXPECT_EQ(model->info().architecture, "mixtral");
    EXPECT_EQ(model->info().quantization, "none");
    for (const auto& p : g.prompts) {
      EXPECT_EQ(tok->encode(p.text), p.ids) << p.text;
      const double err = rel_max_error(prefill_logits(*model, p.ids), p.logits);
      EXPECT_LE(err, 1e-3) << backend->name() << ": " << p.text;
      std::printf("%s dense: max |logit error| / max |logit| = %.2e\n", backend->name().c_str(), err);
    }
    // Greedy continuations: the whole batch at once (several sequences' tokens share each
    // expert's GEMM), and with 3-token prefill chunks (prefill and decode mixed in one step).
    for (int chunk : {512, 3}) {
      const auto out = greedy(*model, nullptr, g, chunk);
      for (size_t i = 0; i < g.prompts.size(); ++i) EXPECT_EQ(out[i], g.prompts[i].greedy) << "chunk " << chunk;
    }
  }
}

// FineQuant int8, int4, and int8 attention with int4 experts. The quantized path is exact: the
// model on the codes gives the logits of the same model on the dequantized weights stored densely,
// up to accumulation order. Against transformers the error is the quantizer's noise, which at
// int4 also moves some tokens to other experts.
TEST(MixtralGolden, QuantizedMatchesDequantizedDense) {
  const Golden g = read_golden(kDir);
  struct Variant {
    int bits, expert_bits;
    const char* quantization;
    double max_fro;  // rel. Frobenius error of all logits vs transformers
  };
  uint64_t bytes[3] = {};
  int v = 0;
  for (const Variant& var : {Variant{8, 0, "finequant-int8", 0.06}, Variant{8, 4, "finequant-int8,experts-int4", 0.3},
                             Variant{4, 0, "finequant-int4", 0.6}}) {
    Scratch tmp;
    quant::ConvertOptions o;
    o.model = kDir;
    o.out = tmp.path() / "q";
    o.group.bits = var.bits;
    o.expert_bits = var.expert_bits;
    o.keep = quant::default_keep_patterns();
    const quant::ConvertReport report = quant::convert_checkpoint(o);
    for (const auto& m : report.matrices) {
      const bool expert = m.name.find(".experts.") != std::string::npos;
      EXPECT_EQ(m.bits, expert && var.expert_bits ? var.expert_bits : var.bits) << m.name;
      EXPECT_EQ(m.name.find(".gate.weight"), std::string::npos) << "the router is never quantized";
    }
    const ckpt::Checkpoint q = ckpt::Checkpoint::open(o.out);
    EXPECT_EQ(q.get("model.layers.0.block_sparse_moe.gate.weight").dtype(), DType::F16);
    EXPECT_EQ(q.get("model.layers.0.block_sparse_moe.experts.1.w2.qweight").dtype(),
              (var.expert_bits ? var.expert_bits : var.bits) == 4 ? DType::U8 : DType::I8);
    EXPECT_EQ(q.get("model.layers.0.self_attn.q_proj.qweight").dtype(), var.bits == 4 ? DType::U8 : DType::I8);
    EXPECT_EQ(q.metadata().count("matrix_bits"), var.expert_bits ? 1u : 0u);

    write_dequantized(o.out, tmp.path() / "deq");
    auto backend = make_cpu_backend();
    auto quantized = load_model(o.out, *backend);
    auto dense = load_model(tmp.path() / "deq", *backend);
    EXPECT_EQ(quantized->info().quantization, var.quantization);
    bytes[v++] = quantized->info().weight_bytes;
    for (const auto& p : g.prompts) {
      const std::vector<float> logits = prefill_logits(*quantized, p.ids);
      const double exact = rel_max_error(logits, prefill_logits(*dense, p.ids));
      EXPECT_LE(exact, 1e-4) << var.quantization;
      const double fro = rel_fro_error(logits, p.logits);
      EXPECT_LE(fro, var.max_fro) << var.quantization;
      std::printf("%s: vs dequantized dense %.2e, vs transformers rel Frobenius %.4f\n", var.quantization, exact, fro);
    }
  }
  EXPECT_GT(bytes[0], bytes[1]);  // int8 > int8 + int4 experts > int4
  EXPECT_GT(bytes[1], bytes[2]);
}

// Missing or mis-shaped expert tensors are reported by name.
TEST(MixtralLoad, BadCheckpointsAreClearErrors) {
  auto config = nlohmann::json::parse(std::ifstream(kDir / "config.json"));
  Scratch tmp;
  auto try_config = [&](const nlohmann::json& cfg) -> std::string {
    fs::remove_all(tmp.path() / "m");
    fs::create_directories(tmp.path() / "m");
    fs::copy_file(kDir / "model.safetensors", tmp.path() / "m" / "model.safetensors");
    std::ofstream(tmp.path() / "m" / "config.json") << cfg.dump();
    auto backend = make_cpu_backend();
    try {
      load_model(tmp.path() / "m", *backend);
    } catch (const Error& e) {
      return e.what();
    }
    return "";
  };
  auto more = config;
  more["num_local_experts"] = 5;
  const std::string m1 = try_config(more);
  EXPECT_NE(m1.find("block_sparse_moe.gate.weight"), std::string::npos) << m1;
  auto wide = config;
  wide["intermediate_size"] = 96;
  const std::string m2 = try_config(wide);
  EXPECT_NE(m2.find("experts.0.w1.weight"), std::string::npos) << m2;
}

// A small-shaped synthetic Mixtral from the real Mixtral-8x7B config (the CPU smoke path of the
// benchmarks): it loads, decodes, and quantizes with int4 experts.
TEST(MixtralSynthetic, SmallShapeLoadsDecodesAndQuantizes) {
  Scratch tmp;
  SynthOptions so;
  so.config = fs::path(FINESERVE_TEST_DATA) / ".." / ".." / "configs" / "models" / "mixtral-8x7b.json";
  so.out = tmp.path() / "synth";
  so.num_layers = 2;
  so.overrides = {{"hidden_size", 64}, {"intermediate_size", 96}, {"num_attention_heads", 4},
                  {"num_key_value_heads", 2}, {"num_local_experts", 4}, {"vocab_size", 300}};
  so.stddev = 0.2;  // routing that differs between tokens
  write_synthetic(so);
  const auto config = ckpt::parse_llama_config(ckpt::read_json_file(so.out / "config.json"), "synth");
  EXPECT_EQ(config.num_local_experts, 4);
  EXPECT_EQ(config.num_experts_per_tok, 2);
  EXPECT_EQ(config.rope_theta, 1e6);
  EXPECT_EQ(config.torch_dtype, DType::F16);

  quant::ConvertOptions o;
  o.model = so.out;
  o.out = tmp.path() / "q";
  o.group.bits = 8;
  o.expert_bits = 4;
  o.keep = quant::default_keep_patterns();
  quant::convert_checkpoint(o);
  for (const fs::path& dir : {so.out, o.out}) {
    auto backend = make_cpu_backend();
    auto model = load_model(dir, *backend);
    EXPECT_EQ(model->info().architecture, "mixtral");
    Golden g;
    g.prompts.push_back({"", {1, 5, 9, 200, 17}, std::vector<int32_t>(6), {}});
    g.prompts.push_back({"", {1, 7}, std::vector<int32_t>(6), {}});
    // Batched decode equals each sequence decoded alone (tokens of different sequences share
    // expert GEMMs in the batch).
    const auto both = greedy(*model, nullptr, g, 512);
    for (size_t i = 0; i < g.prompts.size(); ++i) {
      Golden one;
      one.prompts.push_back(g.prompts[i]);
      EXPECT_EQ(greedy(*model, nullptr, one, 512)[0], both[i]) << dir;
      EXPECT_EQ(both[i].size(), 6u);
    }
  }
}

}  // namespace
}  // namespace fineserve
