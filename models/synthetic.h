// Synthetic Hugging Face checkpoints of real OPT shapes (configs/models/opt-*.json) with Gaussian
// weights and, optionally, planted outlier input channels: for tests and benchmarks, since real
// weights cannot be downloaded here.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <string>

#include "kernels/dtype.h"

namespace fineserve {

struct SynthOptions {
  std::filesystem::path config;  // an OPT config.json
  std::filesystem::path out;     // the checkpoint directory to create
  DType dtype = DType::F16;
  uint64_t seed = 0;
  double stddev = 0.02;
  int64_t num_layers = -1;  // > 0: override num_hidden_layers (a shallow model of real width)
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
void write_synthetic_opt(const SynthOptions& options,
                         const std::function<void(size_t done, size_t total)>& progress = {});

// Fills dst[0..n) with N(0, stddev²) values, deterministic in (seed, n) whatever the thread count.
void fill_gaussian(float* dst, int64_t n, double stddev, uint64_t seed);

}  // namespace fineserve
