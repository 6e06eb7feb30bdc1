#include "models/synthetic.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <random>
#include <regex>
#include <vector>

#include "kernels/base.h"
#include "kernels/cpu/convert.h"
#include "models/checkpoint/atomic_dir.h"
#include "models/checkpoint/config.h"
#include "models/registry.h"
#include "quant/adaptive.h"
#include "quant/convert.h"
#include "quant/format.h"
#include "quant/quantizer.h"

namespace fineserve {
namespace {

uint64_t splitmix64(uint64_t& x) {
  uint64_t z = (x += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// A counter-based generator: word `counter` of the stream `key`, a pure function of both, so that
// any thread can produce any part of a tensor and the result does not depend on how work is split.
uint64_t random_word(uint64_t key, uint64_t counter) {
  uint64_t x = key ^ (counter * 0xd1b54a32d192ed03ull);
  return splitmix64(x);
}

uint64_t hash_name(const std::string& s) {
  uint64_t h = 1469598103934665603ull;  // FNV-1a
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  return h;
}

// The Gaussian stream is cut into fixed-size chunks, each with its own generator seeded from
// (seed, chunk index), so the values do not depend on how OpenMP splits the loop.
constexpr int64_t kGaussianChunk = 1 << 16;

// Values [c * kGaussianChunk, min(n, (c + 1) * kGaussianChunk)) of the stream `seed`, into out[0..).
void gaussian_chunk(float* out, int64_t n, int64_t c, double stddev, uint64_t seed) {
  uint64_t s = seed ^ (static_cast<uint64_t>(c) * 0xd1b54a32d192ed03ull);
  uint64_t state = splitmix64(s);
  const int64_t count = std::min(n - c * kGaussianChunk, kGaussianChunk);
  for (int64_t i = 0; i < count; i += 2) {
    // Box-Muller on two 53-bit uniforms.
    const double u1 = (static_cast<double>(splitmix64(state) >> 11) + 1.0) * 0x1.0p-53;
    const double u2 = static_cast<double>(splitmix64(state) >> 11) * 0x1.0p-53;
    const double r = std::sqrt(-2.0 * std::log(u1)) * stddev;
    out[i] = static_cast<float>(r * std::cos(2.0 * M_PI * u2));
    if (i + 1 < count) out[i + 1] = static_cast<float>(r * std::sin(2.0 * M_PI * u2));
  }
}

// fill_gaussian's values converted to `dtype` (as cpu::from_f32 rounds them), chunk by chunk so
// that no fp32 copy of a whole (multi-GB) tensor is ever held.
void fill_gaussian_as(std::byte* dst, DType dtype, int64_t n, double stddev, uint64_t seed) {
  const int64_t chunks = (n + kGaussianChunk - 1) / kGaussianChunk;
  const size_t esize = dtype_size(dtype);
  // Threads only for tensors of several chunks: waking a team per small bias or norm costs more
  // than it saves.
#pragma omp parallel if (chunks > 1)
  {
    std::vector<float> buf(static_cast<size_t>(kGaussianChunk));
#pragma omp for schedule(static)
    for (int64_t c = 0; c < chunks; ++c) {
      gaussian_chunk(buf.data(), n, c, stddev, seed);
      const int64_t count = std::min(n - c * kGaussianChunk, kGaussianChunk);
      cpu::from_f32(buf.data(), count, dtype, dst + static_cast<size_t>(c * kGaussianChunk) * esize);
    }
  }
}

// Approximately normal values, fast: value i is the sum of the four 16-bit quarters of word i of
// the stream `key` (Irwin-Hall with n = 4), centred and scaled to variance stddev². Bell-shaped
// within ±2√3 standard deviations; one hash per value instead of Box-Muller's logarithm, square
// root and sine (about ten times faster: what makes tens of GB of weights quick to generate).
void fill_fast_normal_as(std::byte* dst, DType dtype, int64_t n, double stddev, uint64_t key) {
  constexpr int64_t kChunk = 1 << 14;  // values converted at a time (a thread-local fp32 buffer)
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  const size_t esize = dtype_size(dtype);
  // sum of 4 uniforms on [0, 65535]: mean 2 * 65535, variance 4 * (65536² - 1) / 12.
  const double mean = 2.0 * 65535.0, scale = stddev / std::sqrt(4.0 * (65536.0 * 65536.0 - 1.0) / 12.0);
#pragma omp parallel if (chunks > 1)
  {
    std::vector<float> buf(static_cast<size_t>(kChunk));
#pragma omp for schedule(static)
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t begin = c * kChunk, count = std::min(n - begin, kChunk);
      for (int64_t i = 0; i < count; ++i) {
        const uint64_t r = random_word(key, static_cast<uint64_t>(begin + i));
        const double sum = static_cast<double>((r & 0xffff) + ((r >> 16) & 0xffff) + ((r >> 32) & 0xffff) + (r >> 48));
        buf[static_cast<size_t>(i)] = static_cast<float>((sum - mean) * scale);
      }
      cpu::from_f32(buf.data(), count, dtype, dst + static_cast<size_t>(begin) * esize);
    }
  }
}

void fill_constant(std::byte* dst, DType dtype, int64_t n, float value) {
  std::vector<std::byte> one(dtype_size(dtype));
  cpu::from_f32(&value, 1, dtype, one.data());
  for (int64_t i = 0; i < n; ++i) std::copy(one.begin(), one.end(), dst + static_cast<size_t>(i) * one.size());
}

// Random FineQuant codes in the storage format of quant/quantizer.h: `bytes` bytes, each from 8
// bits of the stream `key`. int8: a code in [-127, 127]; int4: two nibbles, each code + 8 in
// [1, 15] (code in [-7, 7]). (b * range) >> bits maps b uniformly enough without a division.
void fill_codes(std::byte* dst, int bits, uint64_t bytes, uint64_t key) {
  const auto words = static_cast<int64_t>((bytes + 7) / 8);
#pragma omp parallel for schedule(static) if (words > 8192)
  for (int64_t w = 0; w < words; ++w) {
    const uint64_t r = random_word(key, static_cast<uint64_t>(w));
    const uint64_t begin = static_cast<uint64_t>(w) * 8, end = std::min(bytes, begin + 8);
    for (uint64_t i = begin; i < end; ++i) {
      const uint32_t b = static_cast<uint32_t>(r >> (8 * (i - begin))) & 0xffu;
      uint8_t out;
      if (bits == 8) {
        out = static_cast<uint8_t>(static_cast<int8_t>(static_cast<int>((b * 255u) >> 8) - 127));
      } else {
        const uint32_t lo = 1 + (((b & 0xfu) * 15u) >> 4), hi = 1 + (((b >> 4) * 15u) >> 4);
        out = static_cast<uint8_t>(lo | (hi << 4));
      }
      dst[i] = static_cast<std::byte>(out);
    }
  }
}

// fp16 scales [n] as the quantizer computes them from a group's absmax, for absmax around what a
// group of `group` N(0, stddev²) weights has (the expected maximum of |x| is about
// sqrt(2 ln group) standard deviations), jittered by ±25% so that no two groups are alike.
void fill_scales(std::byte* dst, int bits, int64_t group, double stddev, int64_t n, uint64_t key) {
  const double typical = stddev * std::sqrt(2.0 * std::log(static_cast<double>(std::max<int64_t>(group, 2))));
#pragma omp parallel for schedule(static) if (n > 8192)
  for (int64_t i = 0; i < n; ++i) {
    const double u = static_cast<double>(random_word(key, static_cast<uint64_t>(i)) >> 11) * 0x1.0p-53;
    const uint16_t s = quant::scale_for_absmax(static_cast<float>(typical * (0.75 + 0.5 * u)), bits);
    std::memcpy(dst + 2 * i, &s, 2);
  }
}

// The tensors of the architecture `config` names, in the order HF writes them.
std::vector<TensorSpec> tensor_specs(const nlohmann::json& config, const std::string& label, int64_t* hidden) {
  const Architecture& arch = find_architecture(config, label);
  if (hidden) *hidden = arch.shape(config, label).hidden_size;
  return arch.tensor_specs(config, label);
}

const char* torch_dtype_name(DType d) {
  return d == DType::F32 ? "float32" : d == DType::BF16 ? "bfloat16" : "float16";
}

// ---- the in-memory plan -------------------------------------------------------------------------

struct PlannedTensor {
  enum class Fill { Normal, Ones, Zeros, Codes, Scales } fill = Fill::Normal;
  ckpt::TensorDecl decl;
  uint64_t key = 0;  // the random stream (Normal, Codes, Scales)
  int bits = 0;      // Codes, Scales
  int64_t group = 0;  // Scales
};

struct Plan {
  nlohmann::json config;
  std::vector<PlannedTensor> tensors;
  ckpt::Metadata metadata;
};

std::string stem_of(const std::string& weight_name) {  // "x.fc1.weight" -> "x.fc1"
  return weight_name.substr(0, weight_name.size() - std::string(".weight").size());
}

Plan plan_synthetic(const nlohmann::json& config_in, const SyntheticWeights& w, const std::string& label) {
  if (w.bits != 0 && !quant::is_valid_bits(w.bits))
    throw Error("synthetic weights: bits must be 0 (dense), 8 or 4, got " + std::to_string(w.bits));
  if (w.expert_bits != 0 && !quant::is_valid_bits(w.expert_bits))
    throw Error("synthetic weights: expert bits must be 0, 8 or 4, got " + std::to_string(w.expert_bits));
  if (!is_float(w.dtype)) throw Error("synthetic weights: dense tensors must be F32, F16 or BF16");
  if (!(w.stddev > 0) || !std::isfinite(w.stddev)) throw Error("synthetic weights: stddev must be positive");
  if (w.group != -1 && w.group <= 0)
    throw Error("synthetic weights: group must be positive or -1 (K), got " + std::to_string(w.group));
  const std::vector<std::string> keep_patterns = w.keep.empty() ? quant::default_keep_patterns() : w.keep;
  std::vector<std::regex> keep;
  for (const std::string& p : keep_patterns) {
    try {
      keep.emplace_back(p);
    } catch (const std::regex_error& e) {
      throw Error("synthetic weights: invalid keep pattern '" + p + "': " + e.what());
    }
  }
  const std::regex expert_re(quant::kExpertPattern), router_re(quant::kRouterPattern);

  Plan plan;
  plan.config = config_in;
  plan.config["torch_dtype"] = torch_dtype_name(w.dtype);
  plan.config.erase("dtype");  // transformers 5's name for torch_dtype, which would win over it
  const std::vector<TensorSpec> specs = tensor_specs(plan.config, label, nullptr);
  const int meta_bits = w.bits ? w.bits : w.expert_bits;  // what "bits" records (0: dense)

  quant::FormatMetadata format;  // what `fineserve quantize --group-mode fixed` writes (quant/format.h)
  format.bits = meta_bits;
  format.expert_bits = w.expert_bits;
  format.group_mode = "fixed";
  format.alpha = quant::kDefaultAlpha;
  format.source_fingerprint = "synthetic:" + label + ":seed=" + std::to_string(w.seed);
  format.extra["fineserve.synthetic"] = label + " seed=" + std::to_string(w.seed);
  for (const TensorSpec& s : specs) {
    int bits = 0;
    if (s.linear && !std::regex_search(s.name, router_re) &&
        std::none_of(keep.begin(), keep.end(), [&](const std::regex& r) { return std::regex_search(s.name, r); }))
      bits = w.expert_bits && std::regex_search(s.name, expert_re) ? w.expert_bits : w.bits;
    const int64_t k = s.shape.size() == 2 ? s.shape[1] : 0;
    if (bits == 4 && k % 2 != 0) bits = 0;  // odd K cannot be packed as int4: kept, as quantize does
    if (bits == 0) {
      PlannedTensor t;
      t.decl = {s.name, w.dtype, s.shape};
      t.fill = s.init == TensorSpec::Init::Normal ? PlannedTensor::Fill::Normal
               : s.init == TensorSpec::Init::Ones ? PlannedTensor::Fill::Ones
                                                  : PlannedTensor::Fill::Zeros;
      t.key = w.seed ^ hash_name(s.name);  // write_synthetic's stream for this tensor
      plan.tensors.push_back(std::move(t));
      continue;
    }
    const int64_t group = w.group == -1 ? k : w.group;
    if (!quant::is_allowed_group(k, group)) {
      std::string allowed;
      for (int64_t g : quant::allowed_groups(k)) allowed += (allowed.empty() ? "" : ", ") + std::to_string(g);
      throw Error("synthetic weights: group " + std::to_string(group) + " is not allowed for " + s.name + " (K = " +
                  std::to_string(k) + "; allowed: " + allowed + ")");
    }
    const std::string stem = stem_of(s.name);
    const quant::MatrixFormat mf{bits, group};
    PlannedTensor codes;
    codes.fill = PlannedTensor::Fill::Codes;
    codes.decl = {quant::codes_name(stem), mf.code_dtype(), {s.shape[0], mf.code_row_bytes(k)}};
    codes.key = w.seed ^ hash_name(codes.decl.name);
    codes.bits = bits;
    PlannedTensor scales;
    scales.fill = PlannedTensor::Fill::Scales;
    scales.decl = {quant::scales_name(stem), DType::F16, {s.shape[0], mf.groups_per_row(k)}};
    scales.key = w.seed ^ hash_name(scales.decl.name);
    scales.bits = bits;
    scales.group = group;
    plan.tensors.push_back(std::move(codes));
    plan.tensors.push_back(std::move(scales));
    format.groups[stem] = group;
    format.matrix_bits[stem] = bits;
  }

  plan.metadata = {{"format", "pt"}, {"fineserve.synthetic", format.extra["fineserve.synthetic"]}};
  if (!format.groups.empty()) {
    plan.metadata = quant::to_header_metadata(format);
    plan.config["quantization_config"] = quant::to_quantization_config(format);
  }
  return plan;
}

}  // namespace

void fill_gaussian(float* dst, int64_t n, double stddev, uint64_t seed) {
  const int64_t chunks = (n + kGaussianChunk - 1) / kGaussianChunk;
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < chunks; ++c) gaussian_chunk(dst + c * kGaussianChunk, n, c, stddev, seed);
}

nlohmann::json synthetic_config(const std::filesystem::path& config_path, DType dtype, const nlohmann::json& overrides,
                                int64_t num_layers) {
  if (!is_float(dtype)) throw Error("synthetic weights must be F32, F16 or BF16");
  nlohmann::json config = ckpt::read_json_file(config_path);
  if (!config.is_object()) throw Error(config_path.string() + ": must be a JSON object");
  if (!overrides.is_object()) throw Error("synthetic config overrides must be a JSON object");
  for (const auto& [key, value] : overrides.items()) config[key] = value;
  if (num_layers > 0) config["num_hidden_layers"] = num_layers;
  config["torch_dtype"] = torch_dtype_name(dtype);
  config.erase("dtype");  // transformers 5's name for torch_dtype, which would win over it
  return config;
}

void write_synthetic(const SynthOptions& o, const std::function<void(size_t, size_t)>& progress) {
  const nlohmann::json config = synthetic_config(o.config, o.dtype, o.overrides, o.num_layers);
  const std::string type = ckpt::model_type(config, o.config.string());  // names the weights' origin
  int64_t hidden = 0;
  const std::vector<TensorSpec> specs = tensor_specs(config, o.config.string(), &hidden);
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

// ---- in memory ----------------------------------------------------------------------------------

uint64_t synthetic_checkpoint_bytes(const nlohmann::json& config, const SyntheticWeights& weights) {
  const Plan plan = plan_synthetic(config, weights, "synthetic");
  uint64_t total = 0;
  for (const PlannedTensor& t : plan.tensors) {
    const auto n = ckpt::tensor_nbytes(t.decl.dtype, t.decl.shape);
    if (!n) throw Error("synthetic weights: tensor " + t.decl.name + " is too large");
    total += *n;
  }
  return total;
}

SyntheticCheckpoint make_synthetic_checkpoint(const nlohmann::json& config, const SyntheticWeights& w,
                                              const std::string& label) {
  Plan plan = plan_synthetic(config, w, label);
  std::vector<ckpt::TensorDecl> decls;
  decls.reserve(plan.tensors.size());
  for (const PlannedTensor& t : plan.tensors) decls.push_back(t.decl);
  size_t next = 0;  // build_in_memory fills in declaration order
  auto fill = [&](const ckpt::TensorInfo& info, std::byte* dst) {
    const PlannedTensor& t = plan.tensors[next++];
    FS_ASSERT(t.decl.name == info.name);
    const int64_t n = info.numel();
    switch (t.fill) {
      case PlannedTensor::Fill::Normal:
        if (w.exact_gaussian) {
          fill_gaussian_as(dst, info.dtype, n, w.stddev, t.key);
        } else {
          fill_fast_normal_as(dst, info.dtype, n, w.stddev, t.key);
        }
        break;
      case PlannedTensor::Fill::Ones: fill_constant(dst, info.dtype, n, 1.0f); break;
      case PlannedTensor::Fill::Zeros: fill_constant(dst, info.dtype, n, 0.0f); break;
      case PlannedTensor::Fill::Codes: fill_codes(dst, t.bits, info.nbytes(), t.key); break;
      case PlannedTensor::Fill::Scales: fill_scales(dst, t.bits, t.group, w.stddev, n, t.key); break;
    }
  };
  std::vector<std::unique_ptr<ckpt::SafetensorsFile>> files;
  files.push_back(ckpt::SafetensorsFile::build_in_memory(label, decls, plan.metadata, fill));
  SyntheticCheckpoint out;
  out.config = std::move(plan.config);
  out.checkpoint = std::make_unique<ckpt::Checkpoint>(ckpt::Checkpoint::from_files(label, std::move(files)));
  return out;
}

std::unique_ptr<Model> load_synthetic_model(SyntheticCheckpoint s, Backend& backend) {
  FS_ASSERT(s.checkpoint != nullptr);
  const std::string label = s.checkpoint->dir().string();
  return find_architecture(s.config, label).load(std::move(s.checkpoint), s.config, label, backend, {}, nullptr);
}

}  // namespace fineserve
