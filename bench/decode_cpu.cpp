// `fineserve bench decode`: CPU decode tokens/s of synthetic OPT-shaped models with fp16, int8
// and int4 weights at batch 1 and 8, with the weight bandwidth they reach next to this machine's
// read bandwidth measured in the same run.
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <thread>

#include "bench/membw.h"
#include "bench/report.h"
#include "engine/engine.h"
#include "kernels/backend.h"
#include "models/model.h"
#include "models/synthetic.h"
#include "quant/convert.h"

namespace fineserve::bench {
namespace {
namespace fs = std::filesystem;

struct Run {
  double tokens_per_s = 0;
  double steps_per_s = 0;
  uint64_t weight_bytes = 0;
};

// Decode steps/s of `batch` sequences after an 8-token prefill, greedy, EOS ignored.
Run measure(const fs::path& model_dir, int batch, int new_tokens) {
  auto backend = make_cpu_backend();
  auto model = load_model(model_dir, *backend);
  EngineConfig ec;
  ec.kv_cache_bytes = 512ull << 20;
  ec.max_seqs = batch;
  Engine engine(*model, nullptr, ec);
  std::vector<GenerationRequest> reqs;
  for (int b = 0; b < batch; ++b) {
    GenerationRequest r;
    for (int t = 0; t < 8; ++t) r.prompt.push_back(100 + 37 * t + b);
    r.stop.max_new_tokens = new_tokens;
    r.ignore_eos = true;
    reqs.push_back(r);
  }
  for (auto& r : reqs) engine.add(r);
  engine.step();  // prefill + first token
  int steps = 0;
  const auto t0 = std::chrono::steady_clock::now();
  while (!engine.idle()) {
    engine.step();
    ++steps;
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  Run r;
  r.steps_per_s = steps / s;
  r.tokens_per_s = r.steps_per_s * batch;
  r.weight_bytes = model->info().weight_bytes;
  return r;
}

void setup(CLI::App& group) {
  struct Flags {
    std::vector<std::string> models = {"opt-125m", "opt-350m", "opt-1.3b"};
    std::vector<int> batches = {1, 8};
    int new_tokens = 32;
    std::string work;
    std::string out = "docs/results/decode_cpu.json";
  };
  auto f = std::make_shared<Flags>();
  CLI::App* cmd = group.add_subcommand("decode", "CPU decode tokens/s: fp16 vs int8 vs int4, batch 1 and 8");
  cmd->add_option("--models", f->models, "Config names under configs/models");
  cmd->add_option("--batches", f->batches);
  cmd->add_option("--new-tokens", f->new_tokens)->check(CLI::PositiveNumber);
  cmd->add_option("--work", f->work, "Scratch directory for the synthetic checkpoints (kept for reuse)");
  cmd->add_option("--out", f->out, "JSON result path");
  cmd->callback([f] {
    const fs::path work = f->work.empty() ? fs::temp_directory_path() / "fineserve-bench-decode" : fs::path(f->work);
    fs::create_directories(work);
    const double bw = measure_read_bandwidth_gbs(static_cast<int>(std::thread::hardware_concurrency()));
    std::printf("measured read bandwidth: %.1f GB/s (%u threads)\n", bw, std::thread::hardware_concurrency());
    Table table({"model", "weights", "batch", "tokens/s", "weight GB/step", "weight GB/s", "% of read bw", "vs fp16"});
    nlohmann::json results = nlohmann::json::array();
    for (const std::string& name : f->models) {
      const fs::path fp16 = work / name;
      if (!fs::exists(fp16)) {
        std::printf("writing synthetic %s ...\n", name.c_str());
        SynthOptions so;
        so.config = fs::path("configs/models") / (name + ".json");
        so.out = fp16;
        write_synthetic_opt(so);
      }
      for (int bits : {8, 4}) {
        const fs::path q = work / (name + "-int" + std::to_string(bits));
        if (fs::exists(q)) continue;
        quant::ConvertOptions o;
        o.model = fp16;
        o.out = q;
        o.group.bits = bits;
        o.keep = quant::default_keep_patterns();
        quant::convert_checkpoint(o);
      }
      for (int batch : f->batches) {
        double fp16_tps = 0;
        for (const std::string variant : {"fp16", "int8", "int4"}) {
          const fs::path dir = variant == "fp16" ? fp16 : work / (name + "-" + variant);
          const Run r = measure(dir, batch, f->new_tokens);
          if (variant == "fp16") fp16_tps = r.tokens_per_s;
          const double gb_step = static_cast<double>(r.weight_bytes) / 1e9;
          const double gbs = gb_step * r.steps_per_s;
          table.add_row({name, variant, std::to_string(batch), fmt(r.tokens_per_s, 1), fmt(gb_step, 3), fmt(gbs, 1),
                         fmt(100 * gbs / bw, 0) + "%", fmt(r.tokens_per_s / fp16_tps) + "x"});
          results.push_back({{"model", name}, {"weights", variant}, {"batch", batch}, {"tokens_per_s", r.tokens_per_s},
                             {"weight_gb_per_step", gb_step}, {"weight_gbs", gbs}, {"fraction_of_read_bw", gbs / bw},
                             {"speedup_vs_fp16", r.tokens_per_s / fp16_tps}});
        }
      }
    }
    table.print();
    write_result(f->out, "decode_cpu", cpu_name(), {{"read_bandwidth_gbs", bw}, {"runs", results}});
  });
}

const Registrar registrar(setup);

}  // namespace
}  // namespace fineserve::bench
