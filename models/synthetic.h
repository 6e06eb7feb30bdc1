// Synthetic Hugging Face checkpoints of real shapes (configs/models/*.json: OPT, Llama, Mistral,
// Mixtral) with Gaussian weights and, optionally, planted outlier input channels: for tests and
// benchmarks, since real weights cannot be downloaded here.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <string>

#include <nlohmann/json.hpp>

#include "kernels/dtype.h"

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

// Fills dst[0..n) with N(0, stddev²) values, deterministic in (seed, n) whatever the thread count.
void fill_gaussian(float* dst, int64_t n, double stddev, uint64_t seed);

}  // namespace fineserve
