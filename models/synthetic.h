// Synthetic Hugging Face checkpoints of real shapes (configs/models/*.json: OPT, Llama, Mistral,
// Mixtral) with Gaussian weights: for tests and benchmarks, since real weights cannot be
// downloaded here. Two forms:
//  - on disk (write_synthetic): a checkpoint directory, optionally with planted outlier input
//    channels, which `fineserve quantize` can then convert;
//  - in memory (make_synthetic_checkpoint): generated, never written, dense or directly as
//    FineQuant codes + scales, for models too large to write and quantize in a benchmark's time
//    (OPT-30B, Mixtral-8x7B). It is an ordinary ckpt::Checkpoint over a safetensors image in
//    memory, so every model loads it through its usual path.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "kernels/backend.h"
#include "kernels/dtype.h"
#include "models/checkpoint/safetensors.h"
#include "models/model.h"

namespace fineserve {

struct SynthOptions {
  std::filesystem::path config;  // a config.json (write_synthetic_opt: an OPT one)
  std::filesystem::path out;     // the checkpoint directory to create
  DType dtype = DType::F16;
  uint64_t seed = 0;
  double stddev = 0.02;
  int64_t num_layers = -1;  // > 0: override num_hidden_layers (a shallow model of real width)
  // config.json fields to override (e.g. {"hidden_size": 256, "intermediate_size": 512} for a
  // small-shaped model of a real architecture); applied before num_layers.
  nlohmann::json overrides = nlohmann::json::object();
  // Planted outliers: `outlier_channels` input channels (the same ones in every matching matrix, as
  // in real LLMs where outliers sit in fixed hidden dimensions) are scaled by `outlier_scale` in
  // every linear weight whose name matches `outlier_pattern` (ECMAScript regex).
  int outlier_channels = 0;
  double outlier_scale = 20.0;
  std::string outlier_pattern = "fc1|self_attn\\.(q|k|v)_proj";
  uint64_t max_shard_bytes = 4ull << 30;
  bool overwrite = false;
};

// Writes config.json and the safetensors files; reports (tensors done, total) through `progress`.
// write_synthetic picks the layout from model_type (opt, llama, mistral, mixtral);
// write_synthetic_opt accepts only OPT configs.
void write_synthetic(const SynthOptions& options, const std::function<void(size_t done, size_t total)>& progress = {});
void write_synthetic_opt(const SynthOptions& options,
                         const std::function<void(size_t done, size_t total)>& progress = {});

// The config.json a synthetic model gets: the one at `config_path` with `overrides` (a JSON
// object) applied, then num_hidden_layers = num_layers when num_layers > 0, and torch_dtype set to
// `dtype` (F32, F16 or BF16). write_synthetic writes exactly this.
nlohmann::json synthetic_config(const std::filesystem::path& config_path, DType dtype,
                                const nlohmann::json& overrides = nlohmann::json::object(), int64_t num_layers = -1);

// Fills dst[0..n) with N(0, stddev²) values, deterministic in (seed, n) whatever the thread count.
void fill_gaussian(float* dst, int64_t n, double stddev, uint64_t seed);

// ---- in memory ----------------------------------------------------------------------------------

// What the weights of an in-memory synthetic checkpoint are.
struct SyntheticWeights {
  // 0: every tensor dense of `dtype`: random weights of standard deviation `stddev` (see
  //    exact_gaussian), ones for norm weights, zeros for biases.
  // 8 or 4: every linear weight not matched by `keep` is FineQuant codes + fp16 scales as
  //    `fineserve quantize --bits B --group-mode fixed --group G` stores them (metadata and
  //    config.json's quantization_config included): uniformly random codes in [-qmax, qmax] and
  //    per-(row, group) scales of a Gaussian group's absmax (stddev * sqrt(2 ln group), ±25%).
  //    Their values are not those of any dense model: they are for speed and loading, not accuracy.
  int bits = 0;
  // > 0: the bits (8 or 4) of MoE expert matrices (quant::kExpertPattern), as `quantize
  // --expert-bits`; with bits = 0 only the experts are quantized (16-bit attention).
  int expert_bits = 0;
  // Quantized matrices' group size along K: a power of two >= 32 dividing K, or -1 for K itself
  // (one scale per output row). A group not allowed for some matrix's K is an error.
  int64_t group = 128;
  // Linear weights whose names match one of these (ECMAScript regex, searched) stay dense; MoE
  // routers always do. Empty: quant::default_keep_patterns() (embeddings, LM head, norms, routers).
  std::vector<std::string> keep;
  DType dtype = DType::F16;  // of the dense tensors: F32, F16 or BF16
  double stddev = 0.02;
  uint64_t seed = 0;
  // Dense weights: false draws them from a fast bell-shaped approximation of N(0, stddev²) (a sum
  // of four uniforms, within ±3.46 standard deviations; about 2 ns a value on one core); true
  // draws write_synthetic's exact Gaussian stream, so that the tensors are the very ones
  // write_synthetic writes for the same config and seed (without outliers), at about 25 ns a value.
  bool exact_gaussian = false;
};

struct SyntheticCheckpoint {
  nlohmann::json config;                         // config.json (+ quantization_config when quantized)
  std::unique_ptr<ckpt::Checkpoint> checkpoint;  // one safetensors image in memory
};

// Generates the checkpoint of `config` (opt, llama, mistral or mixtral; synthetic_config makes one
// from a preset) in memory, multi-threaded; the values depend on the seed and the config only, not
// on the thread count. `label` names the checkpoint in messages (its dir()). Throws fineserve::Error
// for unsupported bits, a group not allowed for some matrix, an invalid keep pattern, an unknown
// model_type or a config the architecture rejects, or when the memory cannot be had.
SyntheticCheckpoint make_synthetic_checkpoint(const nlohmann::json& config, const SyntheticWeights& weights,
                                              const std::string& label = "synthetic");

// The bytes make_synthetic_checkpoint would allocate (all tensors), without generating anything:
// to tell in advance whether a model fits a device. Throws as make_synthetic_checkpoint does.
uint64_t synthetic_checkpoint_bytes(const nlohmann::json& config, const SyntheticWeights& weights);

// Loads an in-memory checkpoint onto `backend` as load_model loads a directory (config.json's
// model_type picks the architecture). The model owns the checkpoint (the CPU backend may point
// into it); `backend` must outlive the model.
std::unique_ptr<Model> load_synthetic_model(SyntheticCheckpoint checkpoint, Backend& backend);

}  // namespace fineserve
