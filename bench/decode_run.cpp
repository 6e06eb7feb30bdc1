#include "bench/decode_run.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <limits>
#include <thread>

#include "bench/cuda_probe.h"
#include "bench/membw.h"
#include "bench/report.h"
#include "configs/cpu_env.h"
#include "configs/cuda_env.h"
#include "engine/engine.h"
#include "kernels/base.h"
#include "models/registry.h"
#include "quant/convert.h"

#ifdef FINESERVE_HAVE_CUDA
#include "kernels/cuda/cuda_backend.h"
#endif

namespace fineserve::bench {
namespace fs = std::filesystem;
namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

std::string config_hash(const nlohmann::json& config) {
  uint64_t h = 1469598103934665603ull;  // FNV-1a
  for (unsigned char c : config.dump()) h = (h ^ c) * 1099511628211ull;
  char buf[17];
  std::snprintf(buf, sizeof buf, "%08llx", static_cast<unsigned long long>(h & 0xffffffffull));
  return buf;
}

// The dense checkpoint of `spec` on disk, written once.
fs::path dense_on_disk(const ModelSpec& spec, const fs::path& work) {
  const fs::path dir = work / (spec.label + "-" + config_hash(spec.config));
  const fs::path dense = dir / "fp16";
  if (fs::exists(dense)) return dense;
  fs::create_directories(dir);
  const fs::path config_path = dir / "config.json";
  {
    std::ofstream out(config_path);
    out << spec.config.dump(2) << "\n";
    if (!out) throw Error("cannot write " + config_path.string());
  }
  std::printf("writing synthetic %s to %s ...\n", spec.label.c_str(), dense.string().c_str());
  std::fflush(stdout);
  SynthOptions so;
  so.config = config_path;
  so.out = dense;
  so.dtype = spec.weights.dtype;
  so.seed = spec.weights.seed;
  so.stddev = spec.weights.stddev;
  write_synthetic(so);
  return dense;
}

// The checkpoint of `spec` on disk: the dense one, or it converted by the quantization pipeline
// with the spec's bits and a fixed group.
fs::path checkpoint_on_disk(const ModelSpec& spec, const fs::path& work) {
  const fs::path dense = dense_on_disk(spec, work);
  const SyntheticWeights& w = spec.weights;
  if (w.bits == 0 && w.expert_bits == 0) return dense;
  std::string name = "int" + std::to_string(w.bits ? w.bits : 16);
  if (w.expert_bits) name += "+int" + std::to_string(w.expert_bits) + "-experts";
  name += "-" + group_label(w);
  const fs::path out = dense.parent_path() / name;
  if (fs::exists(out)) return out;
  std::printf("quantizing %s to %s ...\n", spec.label.c_str(), name.c_str());
  std::fflush(stdout);
  quant::ConvertOptions o;
  o.model = dense;
  o.out = out;
  o.group.mode = quant::GroupMode::Fixed;
  o.group.group = w.group;
  o.keep = w.keep.empty() ? quant::default_keep_patterns() : w.keep;
  if (w.bits == 0) {  // 16-bit attention, quantized experts: everything else is kept
    o.group.bits = w.expert_bits;
    o.keep.push_back("self_attn");
  } else {
    o.group.bits = w.bits;
    o.expert_bits = w.expert_bits != w.bits ? w.expert_bits : 0;
  }
  quant::convert_checkpoint(o);
  return out;
}

}  // namespace

DeviceContext open_device(const std::string& device, int gpu) {
  DeviceContext dev;
  dev.gpu = gpu;
  if (device == "cpu") {
    dev.device = Device::Cpu;
    dev.name = cpu_name();
    const int threads = static_cast<int>(std::thread::hardware_concurrency());
    dev.bandwidth_gbs = measure_read_bandwidth_gbs(threads);
    dev.bandwidth_probe = "CPU streaming read, " + std::to_string(threads) + " threads";
  } else if (device == "cuda") {
    dev.device = Device::Cuda;
    if (!cuda_built())
      throw Error("--device cuda: this fineserve was built without the CUDA backend (configure with nvcc "
                  "available, -DFINESERVE_CUDA=ON, to build it)");
    dev.name = gpu_name(gpu);
    dev.bandwidth_gbs = measure_copy_bandwidth_gbs(gpu);
    dev.bandwidth_probe = "GPU device-to-device copy (read + write bytes), 1 GiB buffers";
  } else {
    throw Error("--device must be cpu or cuda, got '" + device + "'");
  }
  return dev;
}

std::unique_ptr<Backend> make_backend(const DeviceContext& dev) {
  if (dev.device == Device::Cpu) return make_cpu_backend(cpu_options_from_env());
#ifdef FINESERVE_HAVE_CUDA
  return make_cuda_backend(dev.gpu, DType::F16, cuda_options_from_env());
#else
  throw Error("--device cuda: this fineserve was built without the CUDA backend");
#endif
}

uint64_t device_free_bytes(const DeviceContext& dev) {
  return dev.device == Device::Cuda ? gpu_memory(dev.gpu).free : std::numeric_limits<uint64_t>::max();
}

uint64_t device_used_bytes(const DeviceContext& dev) {
  return dev.device == Device::Cuda ? gpu_memory(dev.gpu).used() : 0;
}

SyntheticWeights variant_weights(const std::string& variant, int64_t group_int4, int64_t group_int8) {
  SyntheticWeights w;
  if (variant == "fp16") return w;
  if (variant == "int8") {
    w.bits = 8;
    w.group = group_int8;
  } else if (variant == "int4") {
    w.bits = 4;
    w.group = group_int4;
  } else if (variant == "int8+int4-experts") {
    w.bits = 8;
    w.expert_bits = 4;
    w.group = group_int4;
  } else if (variant == "fp16+int4-experts") {
    w.expert_bits = 4;
    w.group = group_int4;
  } else {
    throw Error("unknown weights '" + variant + "' (fp16, int8, int4, int8+int4-experts, fp16+int4-experts)");
  }
  return w;
}

int64_t parse_group(const std::string& s, const char* flag) {
  if (s == "K" || s == "k") return -1;
  try {
    size_t used = 0;
    const long long v = std::stoll(s, &used);
    if (used == s.size() && v > 0) return v;
  } catch (const std::exception&) {  // not a number, or out of range: the message below
  }
  throw Error(std::string(flag) + " must be a positive group size or K, got '" + s + "'");
}

std::string group_label(const SyntheticWeights& w) {
  if (w.bits == 0 && w.expert_bits == 0) return "";
  return w.group == -1 ? "gK" : "g" + std::to_string(w.group);
}

std::unique_ptr<Model> load_spec(const ModelSpec& spec, const WeightSource& source, Backend& backend,
                                 double* prepare_s, double* load_s) {
  auto t0 = std::chrono::steady_clock::now();
  if (source.in_memory) {
    SyntheticCheckpoint ck = make_synthetic_checkpoint(spec.config, spec.weights, "synthetic:" + spec.label);
    if (prepare_s) *prepare_s = seconds_since(t0);
    t0 = std::chrono::steady_clock::now();
    auto model = load_synthetic_model(std::move(ck), backend);
    if (load_s) *load_s = seconds_since(t0);
    return model;
  }
  const fs::path dir = checkpoint_on_disk(spec, source.work);
  if (prepare_s) *prepare_s = seconds_since(t0);
  t0 = std::chrono::steady_clock::now();
  auto model = load_model(dir, backend);
  if (load_s) *load_s = seconds_since(t0);
  return model;
}

uint64_t estimate_device_bytes(const ModelSpec& spec, int64_t kv_tokens) {
  uint64_t bytes = synthetic_checkpoint_bytes(spec.config, spec.weights);
  const std::string label = "synthetic:" + spec.label;
  const ArchitectureShape shape = find_architecture(spec.config, label).shape(spec.config, label);
  const uint64_t kv_per_token = shape.kv_bytes_per_token(2);  // 16-bit KV cache
  // A tied LM head: a backend may hold a second, GEMM-ready fp16 copy of the embedding.
  bytes += static_cast<uint64_t>(shape.tied_head_elements) * 2;
  constexpr uint64_t kMargin = 1536ull << 20;  // activations, logits, cuBLAS workspace
  return bytes + kv_per_token * static_cast<uint64_t>(kv_tokens) + kMargin;
}

DecodeTiming time_decode(Model& model, const DeviceContext& dev, int batch, int prompt_tokens, int new_tokens) {
  FS_ASSERT(batch >= 1 && prompt_tokens >= 1 && new_tokens >= 3);
  const int vocab = static_cast<int>(model.info().vocab_size);
  EngineConfig ec;
  ec.block_size = 16;
  const int blocks_per_seq = (prompt_tokens + new_tokens + ec.block_size - 1) / ec.block_size;
  ec.num_blocks = batch * (blocks_per_seq + 1);
  ec.max_seqs = batch;
  ec.max_batch_tokens = std::max(512, batch * prompt_tokens);  // the whole prefill in one step
  Engine engine(model, nullptr, ec);
  for (int b = 0; b < batch; ++b) {
    GenerationRequest r;
    for (int t = 0; t < prompt_tokens; ++t) r.prompt.push_back((100 + 37 * t + 11 * b) % vocab);
    r.stop.max_new_tokens = new_tokens;
    r.ignore_eos = true;
    engine.add(r);
  }
  engine.step();  // prefill, and the first new token
  engine.step();  // the first decode step: buffers grow to the decode shape
  DecodeTiming t;
  const auto t0 = std::chrono::steady_clock::now();
  while (!engine.idle()) {
    engine.step();
    ++t.timed_steps;
  }
  const double s = seconds_since(t0);
  FS_ASSERT(t.timed_steps > 0);
  t.ms_per_step = 1e3 * s / t.timed_steps;
  t.tokens_per_s = t.timed_steps * static_cast<double>(batch) / s;
  t.device_used = device_used_bytes(dev);
  return t;
}

PrefillTiming time_prefill(Model& model, int prompt_tokens, int reps) {
  FS_ASSERT(prompt_tokens >= 1 && reps >= 1);
  const int vocab = static_cast<int>(model.info().vocab_size);
  EngineConfig ec;
  ec.block_size = 16;
  ec.num_blocks = (prompt_tokens + 1 + ec.block_size - 1) / ec.block_size + 1;
  ec.max_seqs = 1;
  ec.max_batch_tokens = prompt_tokens;  // the whole prompt in one step
  Engine engine(model, nullptr, ec);
  std::vector<double> ms;
  for (int rep = 0; rep <= reps; ++rep) {
    GenerationRequest r;
    for (int t = 0; t < prompt_tokens; ++t) r.prompt.push_back((100 + 37 * t + 11 * rep) % vocab);
    r.stop.max_new_tokens = 1;
    r.ignore_eos = true;
    engine.add(r);
    const auto t0 = std::chrono::steady_clock::now();
    engine.step();
    const double s = seconds_since(t0);
    FS_ASSERT(engine.idle());  // one step prefilled the prompt and finished the request
    if (rep > 0) ms.push_back(1e3 * s);  // rep 0 warms up
  }
  PrefillTiming t;
  t.ms_median = median(ms);
  t.tokens_per_s = prompt_tokens * 1e3 / t.ms_median;
  return t;
}

nlohmann::json parse_overrides(const std::vector<std::string>& sets) {
  nlohmann::json out = nlohmann::json::object();
  for (const std::string& kv : sets) {
    const size_t eq = kv.find('=');
    if (eq == std::string::npos || eq == 0) throw Error("--set expects KEY=VALUE, got '" + kv + "'");
    const std::string value = kv.substr(eq + 1);
    nlohmann::json v = nlohmann::json::parse(value, nullptr, /*allow_exceptions=*/false);
    out[kv.substr(0, eq)] = v.is_discarded() ? nlohmann::json(value) : v;  // bare words are strings
  }
  return out;
}

void add_run_options(CLI::App& cmd, RunFlags& f, const std::string& bench) {
  cmd.add_option("--device", f.device, "cpu or cuda")->check(CLI::IsMember({"cpu", "cuda"}));
  cmd.add_option("--gpu", f.gpu, "CUDA device index")->check(CLI::NonNegativeNumber);
  cmd.add_option("--prompt-tokens", f.prompt_tokens, "Prompt length of every sequence")->check(CLI::PositiveNumber);
  cmd.add_option("--new-tokens", f.new_tokens, "New tokens per sequence (default: cpu 32; cuda 64)")
      ->check(CLI::PositiveNumber);
  cmd.add_option("--group", f.group_int4,
                 "Group size of int4 weights (and of the mixed MoE variants) along K, or K (column-wise)");
  cmd.add_option("--group-int8", f.group_int8, "Group size of int8 weights along K, or K (column-wise)");
  CLI::Option* mem = cmd.add_flag("--in-memory", f.in_memory, "Generate the weights in memory (default on cuda)");
  cmd.add_flag("--on-disk", f.on_disk,
               "Write the weights to disk and quantize them with the quantization pipeline (default on cpu)")
      ->excludes(mem);
  cmd.add_option("--set", f.sets, "Override a config field, KEY=VALUE with VALUE as JSON (repeatable)");
  cmd.add_option("--work", f.work, "Scratch directory for on-disk checkpoints (kept for reuse)");
  cmd.add_option("--out", f.out, "JSON result path (default: docs/results/" + bench + "_<device>.json)");
}

RunSetup resolve_run(const RunFlags& f, const std::string& bench) {
  RunSetup r;
  r.dev = open_device(f.device, f.gpu);
  const bool cuda = r.dev.device == Device::Cuda;
  r.new_tokens = f.new_tokens > 0 ? f.new_tokens : cuda ? 64 : 32;
  if (r.new_tokens < 3) throw Error("--new-tokens must be at least 3 (two warm-up steps, then timed ones)");
  r.group_int4 = parse_group(f.group_int4, "--group");
  r.group_int8 = parse_group(f.group_int8, "--group-int8");
  r.source.in_memory = f.in_memory || (cuda && !f.on_disk);
  r.source.work = f.work.empty() ? std::filesystem::temp_directory_path() / ("fineserve-bench-" + bench)
                                 : std::filesystem::path(f.work);
  r.overrides = parse_overrides(f.sets);
  r.out = !f.out.empty() ? f.out : "docs/results/" + bench + (cuda ? "_cuda.json" : "_cpu.json");
  return r;
}

}  // namespace fineserve::bench
