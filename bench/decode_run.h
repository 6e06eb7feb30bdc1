// What the decode benchmarks (`bench decode`, `bench moe`) share: the device a run uses and its
// bandwidth yardstick, synthetic models generated in memory or written to disk and quantized, the
// engine's own step loop timed as the server runs it, and device-memory accounting.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "kernels/backend.h"
#include "models/model.h"
#include "models/synthetic.h"

namespace fineserve::bench {

enum class Device { Cpu, Cuda };

struct DeviceContext {
  Device device = Device::Cpu;
  int gpu = 0;                  // CUDA device index
  std::string name;             // the CPU model or the GPU name
  double bandwidth_gbs = 0;     // measured in this run
  std::string bandwidth_probe;  // what was measured, for tables and JSON
};

// Parses `device` ("cpu" or "cuda"), names the device and measures its bandwidth: CPU read
// bandwidth (bench/membw.h), or GPU device-to-device copy bandwidth (bench/cuda_probe.h). Throws
// fineserve::Error for an unknown device, or for cuda in a build without the CUDA backend.
DeviceContext open_device(const std::string& device, int gpu);

// A fresh backend for one model: a backend owns the weights uploaded to it until it is destroyed,
// so models measured one after another each get their own (destroy the model first).
std::unique_ptr<Backend> make_backend(const DeviceContext& dev);

// Device memory free and in use now; on the CPU nothing is tracked (free: unlimited, used: 0).
uint64_t device_free_bytes(const DeviceContext& dev);
uint64_t device_used_bytes(const DeviceContext& dev);
// now - before, or 0 when memory shrank (other processes share the device).
inline uint64_t grown_since(uint64_t before, uint64_t now) { return now > before ? now - before : 0; }

// One weight precision of a benchmark: "fp16", "int8", "int4", "int8+int4-experts" (int8
// attention, int4 MoE experts) or "fp16+int4-experts" (16-bit attention, int4 experts). Groups
// along K: `group_int4` for int4 matrices and the mixed variants, `group_int8` for "int8"; -1 = K.
// Throws fineserve::Error for an unknown name.
SyntheticWeights variant_weights(const std::string& variant, int64_t group_int4, int64_t group_int8);
// A group-size flag: a positive integer, or "K" (column-wise) as -1. Throws fineserve::Error
// naming `flag` otherwise.
int64_t parse_group(const std::string& text, const char* flag);
// "g128", or "gK" for column-wise; "" for dense.
std::string group_label(const SyntheticWeights& w);

// A synthetic model to measure.
struct ModelSpec {
  std::string label;           // e.g. "opt-13b"; names the on-disk cache folder too
  nlohmann::json config;       // config.json (synthetic_config)
  SyntheticWeights weights;
};

// Where weights come from: generated in memory (no disk; quantized ones directly as codes), or
// written under `work` as a dense checkpoint and converted by the quantization pipeline with a
// fixed group (kept for reuse: the folder's name includes a hash of the config).
struct WeightSource {
  bool in_memory = true;
  std::filesystem::path work;
};

// Loads `spec` onto `backend`; reports the seconds spent generating (or writing and quantizing)
// and loading through `prepare_s` and `load_s`.
std::unique_ptr<Model> load_spec(const ModelSpec& spec, const WeightSource& source, Backend& backend,
                                 double* prepare_s = nullptr, double* load_s = nullptr);

// Device bytes a model needs for its weights plus a KV cache of `kv_tokens` tokens (16-bit) and a
// margin for activations and library workspaces: to tell before loading whether it fits.
uint64_t estimate_device_bytes(const ModelSpec& spec, int64_t kv_tokens);

struct DecodeTiming {
  int timed_steps = 0;
  double ms_per_step = 0;
  double tokens_per_s = 0;
  uint64_t device_used = 0;  // device memory in use after the run (see device_used_bytes)
};

// Decodes `batch` sequences of `prompt_tokens` tokens, `new_tokens` new tokens each (greedy, EOS
// ignored), through Engine::step, the loop the server runs, with a KV cache just large enough.
// The prefill step and the first decode step warm up; the remaining new_tokens - 2 steps are
// timed (each decodes one token of every sequence). Needs new_tokens >= 3.
DecodeTiming time_decode(Model& model, const DeviceContext& dev, int batch, int prompt_tokens, int new_tokens);

struct PrefillTiming {
  double ms_median = 0;     // one prompt of prompt_tokens tokens, batch 1
  double tokens_per_s = 0;  // prompt_tokens / the median
};

// Prefills one sequence of `prompt_tokens` tokens in a single Engine::step (the step also samples
// the first new token, as the server's prefill does), `reps` times after one untimed warm-up;
// reports the median step. Needs prompt_tokens, reps >= 1.
PrefillTiming time_prefill(Model& model, int prompt_tokens, int reps);

// `--set KEY=VALUE` overrides of config.json fields (VALUE as JSON, else a bare string).
nlohmann::json parse_overrides(const std::vector<std::string>& sets);

// The flags `bench decode` and `bench moe` share.
struct RunFlags {
  std::string device = "cpu";
  int gpu = 0;
  int prompt_tokens = 8;
  int new_tokens = 0;  // default: cpu 32, cuda 64
  std::string group_int4 = "128", group_int8 = "K";
  bool in_memory = false, on_disk = false;  // neither: in memory on cuda, on disk on cpu
  std::vector<std::string> sets;
  std::string work;
  std::string out;
};

// Registers RunFlags' options on `cmd`; `bench` ("decode", "moe") names the default scratch folder
// and result file.
void add_run_options(CLI::App& cmd, RunFlags& f, const std::string& bench);

// RunFlags resolved once the device is open: the defaults that depend on the device filled in.
struct RunSetup {
  DeviceContext dev;
  int new_tokens = 0;
  int64_t group_int4 = 0, group_int8 = 0;  // -1 = K (column-wise)
  WeightSource source;
  nlohmann::json overrides;  // from --set
  std::string out;           // the JSON result path
};

// Opens the device and resolves `f`; throws fineserve::Error for a bad flag value.
RunSetup resolve_run(const RunFlags& f, const std::string& bench);

constexpr double kGB = 1e9;

}  // namespace fineserve::bench
