#include "models/synthetic.h"

#include <cmath>
#include <fstream>
#include <random>
#include <regex>
#include <vector>

#include "kernels/base.h"
#include "kernels/cpu/convert.h"
#include "models/checkpoint/atomic_dir.h"
#include "models/checkpoint/config.h"
#include "models/checkpoint/safetensors.h"
#include "models/llama_layout.h"
#include "models/opt_layout.h"

namespace fineserve {
namespace {

uint64_t splitmix64(uint64_t& x) {
  uint64_t z = (x += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

uint64_t hash_name(const std::string& s) {
  uint64_t h = 1469598103934665603ull;  // FNV-1a
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  return h;
}

}  // namespace

void fill_gaussian(float* dst, int64_t n, double stddev, uint64_t seed) {
  // Fixed-size chunks, each with its own generator seeded from (seed, chunk index), so the
  // values do not depend on how OpenMP splits the loop.
  constexpr int64_t kChunk = 1 << 16;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < chunks; ++c) {
    uint64_t s = seed ^ (static_cast<uint64_t>(c) * 0xd1b54a32d192ed03ull);
    uint64_t state = splitmix64(s);
    const int64_t begin = c * kChunk, end = std::min(n, begin + kChunk);
    for (int64_t i = begin; i < end; i += 2) {
      // Box-Muller on two 53-bit uniforms.
      const double u1 = (static_cast<double>(splitmix64(state) >> 11) + 1.0) * 0x1.0p-53;
      const double u2 = static_cast<double>(splitmix64(state) >> 11) * 0x1.0p-53;
      const double r = std::sqrt(-2.0 * std::log(u1)) * stddev;
      dst[i] = static_cast<float>(r * std::cos(2.0 * M_PI * u2));
      if (i + 1 < end) dst[i + 1] = static_cast<float>(r * std::sin(2.0 * M_PI * u2));
    }
  }
}

void write_synthetic(const SynthOptions& o, const std::function<void(size_t, size_t)>& progress) {
  nlohmann::json config = ckpt::read_json_file(o.config);
  if (!o.overrides.is_object()) throw Error("synthetic config overrides must be a JSON object");
  for (const auto& [key, value] : o.overrides.items()) config[key] = value;
  if (o.num_layers > 0) config["num_hidden_layers"] = o.num_layers;
  config["torch_dtype"] = o.dtype == DType::F32 ? "float32" : o.dtype == DType::BF16 ? "bfloat16" : "float16";
  config.erase("dtype");  // transformers 5's name for torch_dtype, which would win over it
  if (!is_float(o.dtype)) throw Error("synthetic weights must be F32, F16 or BF16");
  const std::string type = ckpt::model_type(config, o.config.string());
  std::vector<TensorSpec> specs;
  int64_t hidden = 0;
  if (type == "opt") {
    const ckpt::OptConfig c = ckpt::parse_opt_config(config, o.config.string());
    specs = opt_tensor_specs(c);
    hidden = c.hidden_size;
  } else if (type == "llama" || type == "mistral" || type == "mixtral") {
    const ckpt::LlamaConfig c = ckpt::parse_llama_config(config, o.config.string());
    specs = llama_tensor_specs(c);
    hidden = c.hidden_size;
  } else {
    throw Error(o.config.string() + ": model_type '" + type + "' has no synthetic layout (opt, llama, mistral, mixtral)");
  }
  if (o.outlier_channels < 0 || o.outlier_channels > hidden)
    throw Error("--outlier-channels must be between 0 and hidden_size");

  std::vector<std::string> names;
  for (const auto& s : specs) names.push_back(s.name);

  // The planted outlier channels: chosen once, shared by every matching matrix.
  std::vector<int64_t> outliers;
  {
    std::mt19937_64 rng(o.seed ^ 0x6f75746c69657273ull);
    std::vector<int64_t> all(static_cast<size_t>(hidden));
    for (int64_t i = 0; i < hidden; ++i) all[static_cast<size_t>(i)] = i;
    std::shuffle(all.begin(), all.end(), rng);
    outliers.assign(all.begin(), all.begin() + o.outlier_channels);
  }
  const std::regex outlier_re(o.outlier_pattern);

  ckpt::AtomicDirectory dir(o.out, o.overwrite);
  {
    std::ofstream cfg(dir.path() / "config.json");
    cfg << config.dump(2) << "\n";
    if (!cfg) throw Error("cannot write " + (dir.path() / "config.json").string());
  }
  ckpt::Metadata meta{{"format", "pt"}, {"fineserve.synthetic", type + " seed=" + std::to_string(o.seed)}};
  ckpt::CheckpointWriter writer(dir.path(), names, meta, o.max_shard_bytes);
  std::vector<float> values;
  std::vector<std::byte> bytes;
  for (size_t t = 0; t < specs.size(); ++t) {
    const TensorSpec& s = specs[t];
    int64_t n = 1;
    for (int64_t d : s.shape) n *= d;
    values.assign(static_cast<size_t>(n), 0.0f);
    switch (s.init) {
      case TensorSpec::Init::Normal: fill_gaussian(values.data(), n, o.stddev, o.seed ^ hash_name(s.name)); break;
      case TensorSpec::Init::Ones: std::fill(values.begin(), values.end(), 1.0f); break;
      case TensorSpec::Init::Zeros: break;
    }
    if (s.linear && !outliers.empty() && std::regex_search(s.name, outlier_re) && s.shape[1] == hidden) {
      for (int64_t r = 0; r < s.shape[0]; ++r)
        for (int64_t ch : outliers) values[static_cast<size_t>(r * s.shape[1] + ch)] *= static_cast<float>(o.outlier_scale);
    }
    bytes.resize(static_cast<size_t>(n) * dtype_size(o.dtype));
    cpu::from_f32(values.data(), n, o.dtype, bytes.data());
    writer.add(s.name, o.dtype, s.shape, bytes);
    if (progress) progress(t + 1, specs.size());
  }
  writer.finish();
  dir.commit();
}

void write_synthetic_opt(const SynthOptions& o, const std::function<void(size_t, size_t)>& progress) {
  const std::string type = ckpt::model_type(ckpt::read_json_file(o.config), o.config.string());
  if (type != "opt") throw Error(o.config.string() + ": model_type is '" + type + "', expected 'opt'");
  write_synthetic(o, progress);
}

}  // namespace fineserve
