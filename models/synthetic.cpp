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

void write_synthetic_opt(const SynthOptions& o, const std::function<void(size_t, size_t)>& progress) {
  nlohmann::json config = ckpt::read_json_file(o.config);
  if (o.num_layers > 0) config["num_hidden_layers"] = o.num_layers;
  config["torch_dtype"] = o.dtype == DType::F32 ? "float32" : o.dtype == DType::BF16 ? "bfloat16" : "float16";
  const ckpt::OptConfig c = ckpt::parse_opt_config(config, o.config.string());
  if (!is_float(o.dtype)) throw Error("synthetic weights must be F32, F16 or BF16");
  if (o.outlier_channels < 0 || o.outlier_channels > c.hidden_size)
    throw Error("--outlier-channels must be between 0 and hidden_size");

  const std::vector<TensorSpec> specs = opt_tensor_specs(c);
  std::vector<std::string> names;
  for (const auto& s : specs) names.push_back(s.name);

  // The planted outlier channels: chosen once, shared by every matching matrix.
  std::vector<int64_t> outliers;
  {
    std::mt19937_64 rng(o.seed ^ 0x6f75746c69657273ull);
    std::vector<int64_t> all(static_cast<size_t>(c.hidden_size));
    for (int64_t i = 0; i < c.hidden_size; ++i) all[static_cast<size_t>(i)] = i;
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
  ckpt::Metadata meta{{"format", "pt"}, {"fineserve.synthetic", "opt seed=" + std::to_string(o.seed)}};
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
    if (s.linear && !outliers.empty() && std::regex_search(s.name, outlier_re) && s.shape[1] == c.hidden_size) {
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

}  // namespace fineserve
