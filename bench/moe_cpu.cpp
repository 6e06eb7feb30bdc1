// `fineserve bench moe`: CPU decode tokens/s of a small-shaped synthetic Mixtral (the real
// Mixtral-8x7B config with smaller widths, configs/models/mixtral-8x7b.json) with fp16 weights,
// int8, int4, and int8 attention with int4 experts, at batch 1 and 8. "weight GB/step" counts what
// one token reads (attention, the router, top_k of the experts, the LM head).
#include <chrono>
#include <cstdio>
#include <filesystem>

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
  uint64_t weight_bytes = 0;
};

// Decode tokens/s of `batch` sequences after an 8-token prefill, greedy, EOS ignored.
Run measure(const fs::path& model_dir, int batch, int new_tokens) {
  auto backend = make_cpu_backend();
  auto model = load_model(model_dir, *backend);
  EngineConfig ec;
  ec.kv_cache_bytes = 256ull << 20;
  ec.max_seqs = batch;
  Engine engine(*model, nullptr, ec);
  for (int b = 0; b < batch; ++b) {
    GenerationRequest r;
    for (int t = 0; t < 8; ++t) r.prompt.push_back(100 + 37 * t + b);
    r.stop.max_new_tokens = new_tokens;
    r.ignore_eos = true;
    engine.add(r);
  }
  engine.step();  // prefill + first token
  int steps = 0;
  const auto t0 = std::chrono::steady_clock::now();
  while (!engine.idle()) {
    engine.step();
    ++steps;
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return {steps * batch / s, model->info().weight_bytes};
}

void setup(CLI::App& group) {
  struct Flags {
    int hidden = 1024, ffn = 3584, layers = 4, experts = 8, top_k = 2;
    std::vector<int> batches = {1, 8};
    int new_tokens = 32;
    std::string work;
    std::string out = "docs/results/moe_cpu.json";
  };
  auto f = std::make_shared<Flags>();
  CLI::App* cmd = group.add_subcommand("moe", "CPU decode tokens/s of a small synthetic Mixtral: fp16, int8, int4, "
                                              "int8 + int4 experts");
  cmd->add_option("--hidden", f->hidden, "hidden_size (Mixtral-8x7B: 4096)");
  cmd->add_option("--ffn", f->ffn, "intermediate_size per expert (Mixtral-8x7B: 14336)");
  cmd->add_option("--layers", f->layers);
  cmd->add_option("--experts", f->experts);
  cmd->add_option("--top-k", f->top_k);
  cmd->add_option("--batches", f->batches);
  cmd->add_option("--new-tokens", f->new_tokens)->check(CLI::PositiveNumber);
  cmd->add_option("--work", f->work, "Scratch directory for the synthetic checkpoints (kept for reuse)");
  cmd->add_option("--out", f->out, "JSON result path");
  cmd->callback([f] {
    const std::string shape = "mixtral-h" + std::to_string(f->hidden) + "-f" + std::to_string(f->ffn) + "-l" +
                              std::to_string(f->layers) + "-e" + std::to_string(f->experts) + "k" +
                              std::to_string(f->top_k);
    const fs::path work = (f->work.empty() ? fs::temp_directory_path() / "fineserve-bench-moe" : fs::path(f->work)) / shape;
    fs::create_directories(work);
    const fs::path fp16 = work / "fp16";
    if (!fs::exists(fp16)) {
      std::printf("writing synthetic %s ...\n", shape.c_str());
      SynthOptions so;
      so.config = "configs/models/mixtral-8x7b.json";
      so.out = fp16;
      so.num_layers = f->layers;
      so.overrides = {{"hidden_size", f->hidden},
                      {"intermediate_size", f->ffn},
                      {"num_attention_heads", f->hidden / 128},
                      {"num_key_value_heads", std::max(1, f->hidden / 512)},
                      {"num_local_experts", f->experts},
                      {"num_experts_per_tok", f->top_k}};
      write_synthetic(so);
    }
    struct Variant {
      const char* name;
      int bits, expert_bits;
    };
    const Variant variants[] = {{"fp16", 0, 0}, {"int8", 8, 0}, {"int8+int4-experts", 8, 4}, {"int4", 4, 0}};
    for (const Variant& v : variants) {
      const fs::path q = work / v.name;
      if (v.bits == 0 || fs::exists(q)) continue;
      quant::ConvertOptions o;
      o.model = fp16;
      o.out = q;
      o.group.bits = v.bits;
      o.expert_bits = v.expert_bits;
      o.keep = quant::default_keep_patterns();
      quant::convert_checkpoint(o);
    }
    Table table({"model", "weights", "batch", "tokens/s", "weight GB/token", "vs fp16"});
    nlohmann::json results = nlohmann::json::array();
    for (int batch : f->batches) {
      double fp16_tps = 0;
      for (const Variant& v : variants) {
        const Run r = measure(work / v.name, batch, f->new_tokens);
        if (v.bits == 0) fp16_tps = r.tokens_per_s;
        const double gb = static_cast<double>(r.weight_bytes) / 1e9;
        table.add_row({shape, v.name, std::to_string(batch), fmt(r.tokens_per_s, 1), fmt(gb, 3),
                       fmt(r.tokens_per_s / fp16_tps) + "x"});
        results.push_back({{"model", shape}, {"weights", v.name}, {"batch", batch}, {"tokens_per_s", r.tokens_per_s},
                           {"weight_gb_per_token", gb}, {"speedup_vs_fp16", r.tokens_per_s / fp16_tps}});
      }
    }
    table.print();
    write_result(f->out, "moe_cpu", cpu_name(), {{"runs", results}});
  });
}

const Registrar registrar(setup);

}  // namespace
}  // namespace fineserve::bench
