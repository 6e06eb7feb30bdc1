// `fineserve bench decode`: decode tokens/s of synthetic OPT-shaped models (configs/models) with
// fp16, int8 and int4 weights at several batch sizes, on the CPU or one GPU, through the engine's
// own step loop. Beside each figure: the weight bytes one step reads, the bandwidth that makes,
// its share of the device's bandwidth measured in the same run (CPU: streaming read; GPU:
// device-to-device copy), the speedup over fp16 and, on a GPU, the device memory the model and its
// KV cache take. A model that cannot fit the GPU gets a "does not fit" row instead of a crash.
//
// Weights are synthetic: generated in memory (--in-memory, the default on CUDA: quantized weights
// directly as random FineQuant codes with plausible scales, so OPT-30B needs no disk and no
// quantization pass), or written to disk and converted by the quantization pipeline (--on-disk,
// the default on the CPU). Either way only the speed is meaningful, not the text.
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <map>
#include <memory>

#include "bench/decode_run.h"
#include "bench/report.h"
#include "configs/cpu_env.h"
#include "kernels/base.h"

namespace fineserve::bench {
namespace {
namespace fs = std::filesystem;

struct Flags : RunFlags {
  std::vector<std::string> models;   // default: by device
  std::vector<std::string> weights = {"fp16", "int8", "int4"};
  std::vector<int> batches;          // default: by device
  int64_t layers = -1;
};

fs::path config_path(const std::string& name) {
  if (name.find('/') != std::string::npos || fs::path(name).extension() == ".json") return name;
  return fs::path("configs/models") / (name + ".json");
}

struct Measured {
  std::string model, weights;
  int batch = 0;
  bool ok = false;
  std::string note;  // why there is no figure
  DecodeTiming timing;
  uint64_t weight_bytes = 0;     // one step reads
  uint64_t device_weights = 0;   // device memory after loading minus before
  uint64_t device_total = 0;     // after the run minus before loading (weights, KV, activations)
};

void run(const Flags& f) {
  const RunSetup setup = resolve_run(f, "decode");
  const DeviceContext& dev = setup.dev;
  const bool cuda = dev.device == Device::Cuda;
  const std::vector<std::string> models =
      !f.models.empty() ? f.models
      : cuda            ? std::vector<std::string>{"opt-13b", "opt-30b"}
                        : std::vector<std::string>{"opt-125m", "opt-350m", "opt-1.3b"};
  const std::vector<int> batches = !f.batches.empty() ? f.batches : cuda ? std::vector<int>{1, 8, 32} : std::vector<int>{1, 8};
  for (int b : batches)
    if (b < 1) throw Error("--batches must be positive");
  const int new_tokens = setup.new_tokens;
  const int64_t g4 = setup.group_int4, g8 = setup.group_int8;
  const WeightSource& source = setup.source;
  const nlohmann::json& overrides = setup.overrides;
  const std::string& out = setup.out;
  const int max_batch = *std::max_element(batches.begin(), batches.end());

  std::printf("device: %s\nbandwidth probe: %.1f GB/s (%s)\nweights: %s; prompt %d tokens, %d new tokens\n",
              dev.name.c_str(), dev.bandwidth_gbs, dev.bandwidth_probe.c_str(),
              source.in_memory ? "synthetic, generated in memory" : "synthetic, written to disk and quantized",
              f.prompt_tokens, new_tokens);
  std::fflush(stdout);

  std::vector<Measured> rows;
  nlohmann::json loads = nlohmann::json::array();
  for (const std::string& name : models) {
    ModelSpec spec;
    spec.label = name + (f.layers > 0 ? "-" + std::to_string(f.layers) + "L" : "") + (overrides.empty() ? "" : "*");
    spec.config = synthetic_config(config_path(name), DType::F16, overrides, f.layers);
    for (const std::string& variant : f.weights) {
      spec.weights = variant_weights(variant, g4, g8);
      const std::string wname = variant + (group_label(spec.weights).empty() ? "" : " " + group_label(spec.weights));
      auto fail_all = [&](const std::string& note) {
        std::printf("%s %s: %s\n", spec.label.c_str(), wname.c_str(), note.c_str());
        for (int b : batches) rows.push_back({spec.label, wname, b, false, note, {}, 0, 0, 0});
      };
      auto backend = make_backend(dev);
      const uint64_t free_before = device_free_bytes(dev), used_before = device_used_bytes(dev);
      double prepare_s = 0, load_s = 0;
      std::unique_ptr<Model> model;
      try {
        if (cuda) {  // a model that cannot fit is reported without generating tens of GB for nothing
          const uint64_t need =
              estimate_device_bytes(spec, static_cast<int64_t>(max_batch) * (f.prompt_tokens + new_tokens + 16));
          if (need > free_before) {
            fail_all("does not fit: needs about " + fmt(static_cast<double>(need) / kGB, 1) +
                     " GB (weights + KV for batch " + std::to_string(max_batch) + "), " +
                     fmt(static_cast<double>(free_before) / kGB, 1) + " GB free");
            continue;
          }
        }
        model = load_spec(spec, source, *backend, &prepare_s, &load_s);
      } catch (const Error& e) {
        fail_all(std::string("load failed: ") + e.what());
        continue;
      }
      const uint64_t device_weights = grown_since(used_before, device_used_bytes(dev));
      std::printf("%s %s: %s in %.1f s, loaded in %.1f s%s\n", spec.label.c_str(), wname.c_str(),
                  source.in_memory ? "generated" : "prepared", prepare_s, load_s,
                  cuda ? (", " + fmt(static_cast<double>(device_weights) / kGB, 2) + " GB on the GPU").c_str() : "");
      std::fflush(stdout);
      loads.push_back({{"model", spec.label}, {"weights", wname}, {"prepare_s", prepare_s}, {"load_s", load_s},
                       {"quantization", model->info().quantization}});
      for (int b : batches) {
        Measured m{spec.label, wname, b, true, "", {}, model->info().weight_bytes, device_weights, 0};
        try {
          m.timing = time_decode(*model, dev, b, f.prompt_tokens, new_tokens);
          m.device_total = grown_since(used_before, m.timing.device_used);
        } catch (const Error& e) {
          m.ok = false;
          m.note = std::string("failed: ") + e.what();
        }
        rows.push_back(m);
      }
      model.reset();  // before its backend
    }
  }

  // fp16 tokens/s per (model, batch), for the speedups.
  std::map<std::pair<std::string, int>, double> fp16;
  for (const Measured& m : rows)
    if (m.ok && m.weights == "fp16") fp16[{m.model, m.batch}] = m.timing.tokens_per_s;

  Table table({"model", "weights", "batch", "tok/s", "ms/step", "weight GB/step", "GB/s", "% of bw", "vs fp16",
               "GPU weights GB", "GPU total GB"});
  nlohmann::json runs = nlohmann::json::array();
  for (const Measured& m : rows) {
    nlohmann::json j = {{"model", m.model}, {"weights", m.weights}, {"batch", m.batch}, {"ok", m.ok}};
    if (!m.ok) {
      table.add_row({m.model, m.weights, std::to_string(m.batch), m.note});
      j["note"] = m.note;
      runs.push_back(j);
      continue;
    }
    const double gb_step = static_cast<double>(m.weight_bytes) / kGB;
    const double gbs = gb_step * 1e3 / m.timing.ms_per_step;
    const auto base = fp16.find({m.model, m.batch});
    const double speedup = base == fp16.end() ? 0 : m.timing.tokens_per_s / base->second;
    table.add_row({m.model, m.weights, std::to_string(m.batch), fmt(m.timing.tokens_per_s, 1), fmt(m.timing.ms_per_step, 2),
                   fmt(gb_step, 3), fmt(gbs, 1), fmt(100 * gbs / dev.bandwidth_gbs, 0) + "%",
                   speedup > 0 ? fmt(speedup) + "x" : "-", cuda ? fmt(static_cast<double>(m.device_weights) / kGB, 2) : "-",
                   cuda ? fmt(static_cast<double>(m.device_total) / kGB, 2) : "-"});
    j.update({{"tokens_per_s", m.timing.tokens_per_s},
              {"ms_per_step", m.timing.ms_per_step},
              {"timed_steps", m.timing.timed_steps},
              {"weight_gb_per_step", gb_step},
              {"weight_gbs", gbs},
              {"fraction_of_bandwidth", gbs / dev.bandwidth_gbs}});
    if (speedup > 0) j["speedup_vs_fp16"] = speedup;
    if (cuda) {
      j["gpu_weights_gb"] = static_cast<double>(m.device_weights) / kGB;
      j["gpu_total_gb"] = static_cast<double>(m.device_total) / kGB;
    }
    runs.push_back(j);
  }
  table.print();

  // The target, as information: int4 at least 3x fp16 tokens/s at batch 1.
  nlohmann::json targets = nlohmann::json::array();
  for (const Measured& m : rows) {
    if (!m.ok || m.batch != 1 || m.weights.rfind("int4", 0) != 0) continue;
    const auto base = fp16.find({m.model, 1});
    if (base == fp16.end()) continue;
    const double x = m.timing.tokens_per_s / base->second;
    std::printf("target (information): int4 >= 3x fp16 tok/s at batch 1: %s %s %.2fx -> %s\n", m.model.c_str(),
                m.weights.c_str(), x, x >= 3 ? "met" : "not met");
    targets.push_back({{"model", m.model}, {"weights", m.weights}, {"int4_vs_fp16_batch1", x}, {"target", 3.0}, {"met", x >= 3}});
  }

  nlohmann::json results = {{"device_kind", cuda ? "cuda" : "cpu"},
                            {"bandwidth_gbs", dev.bandwidth_gbs},
                            {"bandwidth_probe", dev.bandwidth_probe},
                            {"weights_source", source.in_memory ? "in-memory synthetic" : "on-disk synthetic, quantized"},
                            {"prompt_tokens", f.prompt_tokens},
                            {"new_tokens", new_tokens},
                            {"config_overrides", overrides},
                            {"loads", loads},
                            {"runs", runs},
                            {"targets", targets}};
  if (!cuda) {
    results["read_bandwidth_gbs"] = dev.bandwidth_gbs;  // the name earlier CPU results used
    // Which CPU kernels ran (configs/cpu_env.h: FINESERVE_CPU_ISA / _INT8_ACT / _INT8_HEAD).
    const CpuOptions o = cpu_options_from_env();
    results["cpu_isa"] = cpu::isa_name(o.isa.value_or(cpu::best_isa()));
    results["cpu_int8_activations"] = o.int8_activations;
    results["cpu_int8_dense_weights"] = o.int8_dense_weights;
  }
  write_result(out, cuda ? "decode_cuda" : "decode_cpu", dev.name, results);
}

void setup(CLI::App& group) {
  auto f = std::make_shared<Flags>();
  CLI::App* cmd = group.add_subcommand(
      "decode", "Decode tokens/s of synthetic OPT models: fp16 vs int8 vs int4, on the CPU or a GPU");
  cmd->add_option("--models", f->models,
                  "Config names under configs/models, or config.json paths (default: cpu opt-125m opt-350m opt-1.3b; "
                  "cuda opt-13b opt-30b)");
  cmd->add_option("--weights", f->weights, "Weight precisions: fp16 int8 int4 (default: all three)");
  cmd->add_option("--batches", f->batches, "Batch sizes (default: cpu 1 8; cuda 1 8 32)");
  cmd->add_option("--layers", f->layers, "Override num_hidden_layers (a shallow model of real width)")
      ->check(CLI::PositiveNumber);
  add_run_options(*cmd, *f, "decode");
  cmd->callback([f] { run(*f); });
}

const Registrar registrar(setup);

}  // namespace
}  // namespace fineserve::bench
