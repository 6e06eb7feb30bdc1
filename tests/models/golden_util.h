// Helpers shared by the golden-logit tests of tests/models/: the fixtures that
// tests/models/make_golden*.py write (golden.json + golden.safetensors), running a model over them,
// and comparing logits.
#pragma once

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <span>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "engine/engine.h"
#include "kernels/base.h"
#include "kernels/half.h"
#include "models/checkpoint/safetensors.h"
#include "models/model.h"
#include "models/tokenizer/tokenizer.h"
#include "quant/convert.h"
#include "quant/quantizer.h"
#include "tests/scratch_dir.h"

namespace fineserve::testing {

inline const std::filesystem::path kGoldenDir = std::filesystem::path(FINESERVE_TEST_DATA) / "golden";

// A fixture: per prompt, transformers' token ids, logits of every position and greedy tokens.
struct Golden {
  struct Prompt {
    std::string text;
    std::vector<int32_t> ids;
    std::vector<int32_t> greedy;
    std::vector<float> logits;  // [ids.size(), vocab]
  };
  std::vector<Prompt> prompts;
  int64_t vocab = 0;
};

inline Golden read_golden(const std::filesystem::path& dir) {
  Golden g;
  const nlohmann::json j = nlohmann::json::parse(std::ifstream(dir / "golden.json"));
  const ckpt::Checkpoint logits = ckpt::Checkpoint::open(dir / "golden.safetensors");
  for (size_t i = 0; i < j["prompts"].size(); ++i) {
    Golden::Prompt p;
    p.text = j["prompts"][i]["text"];
    p.ids = j["prompts"][i]["ids"].get<std::vector<int32_t>>();
    p.greedy = j["prompts"][i]["greedy"].get<std::vector<int32_t>>();
    const ckpt::TensorView t = logits.get("logits." + std::to_string(i));
    g.vocab = t.shape()[1];
    p.logits.resize(static_cast<size_t>(t.numel()));
    std::memcpy(p.logits.data(), t.data, t.nbytes());
    g.prompts.push_back(std::move(p));
  }
  return g;
}

// Just the fixture's prompt token ids, from golden.json alone (which the quantizer copies into
// the checkpoints it writes; golden.safetensors it does not).
inline std::vector<std::vector<int32_t>> golden_prompt_ids(const std::filesystem::path& dir) {
  std::vector<std::vector<int32_t>> out;
  const nlohmann::json j = nlohmann::json::parse(std::ifstream(dir / "golden.json"));
  for (const auto& p : j["prompts"]) out.push_back(p["ids"].get<std::vector<int32_t>>());
  return out;
}

using Scratch = ScratchDir;  // tests/scratch_dir.h

// Logits of every prompt position in one prefill step.
inline std::vector<float> prefill_logits(Model& model, const std::vector<int32_t>& ids) {
  model.allocate_kv_cache(64, 16);
  StepInput s;
  s.token_ids = ids;
  for (size_t i = 0; i < ids.size(); ++i) {
    s.positions.push_back(static_cast<int32_t>(i));
    s.logit_rows.push_back(static_cast<int32_t>(i));
  }
  s.query_start = {0, static_cast<int32_t>(ids.size())};
  s.context_len = {static_cast<int32_t>(ids.size())};
  s.max_blocks = static_cast<int>((ids.size() + 15) / 16);
  for (int b = 0; b < s.max_blocks; ++b) s.block_table.push_back(b);
  std::vector<float> out(ids.size() * static_cast<size_t>(model.info().vocab_size), NAN);
  model.forward(s, out.data());
  return out;
}

// Greedy continuations (new_tokens each, EOS ignored) of every prompt, all in one engine batch
// with prefill chunks of at most max_batch_tokens. `tok` may be null.
inline std::vector<std::vector<int32_t>> greedy(Model& model, const std::vector<std::vector<int32_t>>& prompts,
                                                int new_tokens, int max_batch_tokens, const Tokenizer* tok = nullptr) {
  EngineConfig ec;
  ec.num_blocks = 64;
  ec.max_batch_tokens = max_batch_tokens;
  Engine engine(model, tok, ec);
  std::vector<GenerationRequest> reqs;
  for (const auto& p : prompts) {
    GenerationRequest r;
    r.prompt = p;
    r.stop.max_new_tokens = new_tokens;
    r.ignore_eos = true;
    reqs.push_back(r);
  }
  std::vector<std::vector<int32_t>> out;
  for (auto& r : engine.generate(reqs)) out.push_back(r.tokens);
  return out;
}

// The same for a fixture's prompts, as many tokens as its greedy continuations hold.
inline std::vector<std::vector<int32_t>> greedy(Model& model, const Tokenizer* tok, const Golden& g,
                                                int max_batch_tokens) {
  std::vector<std::vector<int32_t>> prompts;
  for (const auto& p : g.prompts) {
    FS_ASSERT(p.greedy.size() == g.prompts.front().greedy.size(), "fixture continuations differ in length");
    prompts.push_back(p.ids);
  }
  const int n = g.prompts.empty() ? 0 : static_cast<int>(g.prompts.front().greedy.size());
  return greedy(model, prompts, n, max_batch_tokens, tok);
}

// max |a - b| / max |b|: the error relative to the logits' scale.
inline double rel_max_error(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num = std::max(num, std::abs(static_cast<double>(a[i]) - b[i]));
    den = std::max(den, std::abs(static_cast<double>(b[i])));
  }
  return num / den;
}

// ||a - b||_F / ||b||_F over all logits.
inline double rel_fro_error(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (static_cast<double>(a[i]) - b[i]) * (static_cast<double>(a[i]) - b[i]);
    den += static_cast<double>(b[i]) * b[i];
  }
  return std::sqrt(num / den);
}

// Fraction of positions whose argmax token agrees.
inline double top1_agreement(const std::vector<float>& a, const std::vector<float>& b, int64_t vocab) {
  const size_t rows = a.size() / static_cast<size_t>(vocab);
  size_t same = 0;
  for (size_t r = 0; r < rows; ++r) {
    const auto* pa = a.data() + r * vocab;
    const auto* pb = b.data() + r * vocab;
    same += std::max_element(pa, pa + vocab) - pa == std::max_element(pb, pb + vocab) - pb;
  }
  return static_cast<double>(same) / static_cast<double>(rows);
}

// FineQuant conversion of `model` into `out` at `bits` with the default (adaptive) groups, keeping
// quantize's default 16-bit tensors, or — with quantize_embeddings — quantizing the token embedding
// and LM head too (`quantize --quantize-embeddings`).
inline quant::ConvertOptions convert_options(const std::filesystem::path& model, const std::filesystem::path& out,
                                             int bits, bool quantize_embeddings = false) {
  quant::ConvertOptions o;
  o.model = model;
  o.out = out;
  o.group.bits = bits;
  o.keep = quantize_embeddings ? quant::keep_patterns_quantizing_embeddings() : quant::default_keep_patterns();
  return o;
}

// Writes FineQuant checkpoint `q` with every .qweight/.scales pair replaced by the dequantized fp32
// .weight; each matrix's bits come from its codes' dtype (I8: int8, U8: packed int4), so mixed
// bits (`quantize --expert-bits`) work.
//
// A quantized token embedding (`quantize --quantize-embeddings`) is what the models make of it:
// the lookup table dequantized and rounded to fp16, and — when tied — a separate fp32 lm_head
// (the tied head runs on the codes), so config.json gets tie_word_embeddings false.
inline void write_dequantized(const std::filesystem::path& q, const std::filesystem::path& out) {
  const ckpt::Checkpoint c = ckpt::Checkpoint::open(q);
  auto config = nlohmann::json::parse(std::ifstream(q / "config.json"));
  config.erase("quantization_config");
  const bool tied = config.value("tie_word_embeddings", true);
  std::vector<std::string> names;
  std::string untied_head;  // the tied quantized embedding's stem, whose head is written separately
  for (const auto* t : c.tensors()) {
    if (t->name.ends_with(".scales")) continue;
    const bool quantized = t->name.ends_with(".qweight");
    const std::string stem = quantized ? t->name.substr(0, t->name.size() - 8) : "";
    names.push_back(quantized ? stem + ".weight" : t->name);
    if (quantized && stem.ends_with("embed_tokens") && tied) {
      untied_head = stem;
      names.push_back("lm_head.weight");
    }
  }
  std::filesystem::create_directories(out);
  ckpt::CheckpointWriter w(out, names, {}, 1ull << 40);
  for (const auto* t : c.tensors()) {
    if (t->name.ends_with(".scales")) continue;
    const ckpt::TensorView v = c.get(t->name);
    if (!t->name.ends_with(".qweight")) {
      w.add(t->name, t->dtype, t->shape, std::span<const std::byte>(v.data, v.nbytes()));
      continue;
    }
    const std::string stem = t->name.substr(0, t->name.size() - 8);
    const ckpt::TensorView s = c.get(stem + ".scales");
    quant::QuantizedMatrix m;
    m.bits = t->dtype == DType::U8 ? 4 : 8;
    m.rows = t->shape[0];
    m.cols = m.bits == 4 ? t->shape[1] * 2 : t->shape[1];
    m.group = m.cols / s.shape()[1];
    m.codes.resize(v.nbytes());
    std::memcpy(m.codes.data(), v.data, v.nbytes());
    m.scales.resize(static_cast<size_t>(s.numel()));
    std::memcpy(m.scales.data(), s.data, s.nbytes());
    const std::vector<float> dense = quant::dequantize(m);
    if (!stem.ends_with("embed_tokens")) {
      w.add(stem + ".weight", DType::F32, {m.rows, m.cols}, std::as_bytes(std::span(dense)));
      continue;
    }
    std::vector<uint16_t> table(dense.size());
    for (size_t i = 0; i < dense.size(); ++i) table[i] = float_to_half(dense[i]);
    w.add(stem + ".weight", DType::F16, {m.rows, m.cols}, std::as_bytes(std::span(table)));
    if (stem == untied_head) w.add("lm_head.weight", DType::F32, {m.rows, m.cols}, std::as_bytes(std::span(dense)));
  }
  w.finish();
  if (!untied_head.empty()) config["tie_word_embeddings"] = false;
  std::ofstream(out / "config.json") << config.dump();
}

}  // namespace fineserve::testing
