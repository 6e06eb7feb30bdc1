// `fineserve bench moe`: decode tokens/s of a synthetic Mixtral-8x7B-shaped model
// (configs/models/mixtral-8x7b.json: hidden 4096, 32 layers, 8 experts top 2, FFN 14336, GQA 32/8)
// with 16-bit weights against int4 experts (with int8 or 16-bit attention) and all-int4, at batch
// 1 and 8, on the CPU or one GPU, through the engine's own step loop.
//
// fp16 Mixtral-8x7B (~93 GB) does not fit one 80 GB GPU, so the model is measured at a reduced
// depth of real width (--layers L) and at depth 1; the difference gives the per-layer time and
// memory, and the full-depth figures are extrapolated from them: full = depth-1 + (layers - 1) x
// per-layer. They are labelled as extrapolations. On the CPU the default is a smaller-width model
// (--hidden 1024 --ffn 3584, 4 layers) so that it runs in seconds.
//
// "weight GB/token" is what one token reads: attention, the router, top_k of the experts, the LM
// head. A step of several tokens reads more experts than that (up to all of them).
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>

#include "bench/decode_run.h"
#include "bench/report.h"
#include "kernels/base.h"

namespace fineserve::bench {
namespace {
namespace fs = std::filesystem;

struct Flags : RunFlags {
  std::string config = "configs/models/mixtral-8x7b.json";
  // 0: the config's value, except on the CPU where hidden and ffn default to 1024 and 3584.
  int64_t hidden = 0, ffn = 0, experts = 0, top_k = 0, vocab = 0;
  int64_t layers = 0;  // 0: cpu 4, cuda 8
  std::vector<std::string> weights;  // default: by device
  std::vector<int> batches = {1, 8};
  bool no_extrapolation = false;
};

// One model depth of one variant, every batch.
struct DepthRun {
  bool ok = false;
  std::string note;
  uint64_t weight_bytes = 0;  // one token reads
  uint64_t device_weights = 0;
  std::map<int, DecodeTiming> by_batch;
  std::map<int, uint64_t> device_total;  // by batch
};

void run(const Flags& f) {
  const RunSetup setup = resolve_run(f, "moe");
  const DeviceContext& dev = setup.dev;
  const bool cuda = dev.device == Device::Cuda;
  const int new_tokens = setup.new_tokens;
  const std::vector<std::string> variants =
      !f.weights.empty() ? f.weights
      : cuda ? std::vector<std::string>{"fp16", "fp16+int4-experts", "int8+int4-experts", "int4"}
             : std::vector<std::string>{"fp16", "int8", "int8+int4-experts", "int4"};
  const int64_t g4 = setup.group_int4, g8 = setup.group_int8;
  const WeightSource& source = setup.source;
  const std::string& out = setup.out;
  for (int b : f.batches)
    if (b < 1) throw Error("--batches must be positive");
  const int max_batch = *std::max_element(f.batches.begin(), f.batches.end());

  // The config: the preset, --set, then the shape flags.
  nlohmann::json overrides = setup.overrides;
  const int64_t hidden = f.hidden ? f.hidden : cuda ? 0 : 1024;
  const int64_t ffn = f.ffn ? f.ffn : cuda ? 0 : 3584;
  if (hidden) {
    overrides["hidden_size"] = hidden;
    // Mixtral's head_dim 128 and 4 query heads per KV head, unless --set says otherwise.
    if (!overrides.contains("num_attention_heads")) overrides["num_attention_heads"] = std::max<int64_t>(1, hidden / 128);
    if (!overrides.contains("num_key_value_heads")) overrides["num_key_value_heads"] = std::max<int64_t>(1, hidden / 512);
  }
  if (ffn) overrides["intermediate_size"] = ffn;
  if (f.experts) overrides["num_local_experts"] = f.experts;
  if (f.top_k) overrides["num_experts_per_tok"] = f.top_k;
  if (f.vocab) overrides["vocab_size"] = f.vocab;
  const nlohmann::json full_config = synthetic_config(f.config, DType::F16, overrides);
  const int64_t full_layers = full_config.value("num_hidden_layers", int64_t{0});
  if (full_layers < 1) throw Error(f.config + ": num_hidden_layers must be positive");
  const int64_t layers = std::min(full_layers, f.layers > 0 ? f.layers : cuda ? 8 : 4);
  const bool extrapolate = !f.no_extrapolation && layers > 1 && layers < full_layers;
  const std::string shape = "mixtral h" + std::to_string(full_config.value("hidden_size", 0)) + " f" +
                            std::to_string(full_config.value("intermediate_size", 0)) + " e" +
                            std::to_string(full_config.value("num_local_experts", 0)) + " top" +
                            std::to_string(full_config.value("num_experts_per_tok", 0));

  std::printf("device: %s\nbandwidth probe: %.1f GB/s (%s)\nmodel: %s, %lld of %lld layers measured%s\n"
              "weights: %s; prompt %d tokens, %d new tokens\n",
              dev.name.c_str(), dev.bandwidth_gbs, dev.bandwidth_probe.c_str(), shape.c_str(),
              static_cast<long long>(layers), static_cast<long long>(full_layers),
              extrapolate ? " (and 1 layer, to extrapolate to full depth)" : "",
              source.in_memory ? "synthetic, generated in memory" : "synthetic, written to disk and quantized",
              f.prompt_tokens, new_tokens);
  std::fflush(stdout);

  std::vector<int64_t> depths = {layers};
  if (extrapolate) depths.insert(depths.begin(), 1);
  std::map<std::pair<std::string, int64_t>, DepthRun> runs;  // (variant, depth)
  std::vector<std::string> names;
  nlohmann::json loads = nlohmann::json::array();
  for (const std::string& variant : variants) {
    ModelSpec spec;
    spec.weights = variant_weights(variant, g4, g8);
    const std::string wname = variant + (group_label(spec.weights).empty() ? "" : " " + group_label(spec.weights));
    names.push_back(wname);
    for (int64_t depth : depths) {
      spec.label = "mixtral-" + std::to_string(depth) + "L";
      spec.config = full_config;
      spec.config["num_hidden_layers"] = depth;
      DepthRun& r = runs[{wname, depth}];
      auto backend = make_backend(dev);
      const uint64_t free_before = device_free_bytes(dev), used_before = device_used_bytes(dev);
      double prepare_s = 0, load_s = 0;
      std::unique_ptr<Model> model;
      try {
        if (cuda) {  // a model that cannot fit is reported without generating tens of GB for nothing
          const uint64_t need =
              estimate_device_bytes(spec, static_cast<int64_t>(max_batch) * (f.prompt_tokens + new_tokens + 16));
          if (need > free_before) {
            r.note = "does not fit: needs about " + fmt(static_cast<double>(need) / kGB, 1) + " GB, " +
                     fmt(static_cast<double>(free_before) / kGB, 1) + " GB free";
            std::printf("%s %lld layers: %s\n", wname.c_str(), static_cast<long long>(depth), r.note.c_str());
            continue;
          }
        }
        model = load_spec(spec, source, *backend, &prepare_s, &load_s);
      } catch (const Error& e) {
        r.note = std::string("load failed: ") + e.what();
        std::printf("%s %lld layers: %s\n", wname.c_str(), static_cast<long long>(depth), r.note.c_str());
        continue;
      }
      r.device_weights = grown_since(used_before, device_used_bytes(dev));
      r.weight_bytes = model->info().weight_bytes;
      std::printf("%s %lld layers (%s): %s in %.1f s, loaded in %.1f s%s\n", wname.c_str(), static_cast<long long>(depth),
                  model->info().quantization.c_str(), source.in_memory ? "generated" : "prepared", prepare_s, load_s,
                  cuda ? (", " + fmt(static_cast<double>(r.device_weights) / kGB, 2) + " GB on the GPU").c_str() : "");
      std::fflush(stdout);
      loads.push_back({{"weights", wname}, {"layers", depth}, {"quantization", model->info().quantization},
                       {"prepare_s", prepare_s}, {"load_s", load_s}});
      r.ok = true;
      try {
        for (int b : f.batches) {
          r.by_batch[b] = time_decode(*model, dev, b, f.prompt_tokens, new_tokens);
          r.device_total[b] = grown_since(used_before, r.by_batch[b].device_used);
        }
      } catch (const Error& e) {
        r.ok = false;
        r.note = std::string("failed: ") + e.what();
      }
      model.reset();  // before its backend
    }
  }

  // Full-depth figures: measured when `layers` is the full depth, else extrapolated.
  struct Full {
    double ms = 0, per_layer_ms = 0, weight_gb = 0, device_gb = 0;
  };
  // Empty, with `why` set, when there is no figure.
  auto full_depth = [&](const std::string& wname, int batch, std::string* why = nullptr) -> std::optional<Full> {
    const DepthRun& deep = runs[{wname, layers}];
    if (why) *why = deep.note;
    if (!deep.ok) return std::nullopt;
    const double ms_l = deep.by_batch.at(batch).ms_per_step;
    const double wb_l = static_cast<double>(deep.weight_bytes), mem_l = static_cast<double>(deep.device_total.at(batch));
    if (!extrapolate) {
      return Full{ms_l, ms_l / static_cast<double>(layers), wb_l / kGB, mem_l / kGB};
    }
    const DepthRun& one = runs[{wname, 1}];
    if (why) *why = one.note;
    if (!one.ok) return std::nullopt;
    const double n = static_cast<double>(layers - 1), rest = static_cast<double>(full_layers - 1);
    const double ms_1 = one.by_batch.at(batch).ms_per_step;
    const double wb_1 = static_cast<double>(one.weight_bytes), mem_1 = static_cast<double>(one.device_total.at(batch));
    const double per_layer = (ms_l - ms_1) / n;
    if (per_layer <= 0) {  // the deeper model was not slower: timing noise swamps the layers
      if (why) *why = "no extrapolation: " + std::to_string(layers) + " layers measured no slower than 1 (noise)";
      return std::nullopt;
    }
    return Full{ms_1 + rest * per_layer, per_layer, (wb_1 + rest * (wb_l - wb_1) / n) / kGB,
                (mem_1 + rest * (mem_l - mem_1) / n) / kGB};
  };

  const std::string full_label = extrapolate ? " (extrap.)" : "";
  const std::string depth_label = "@" + std::to_string(layers) + "L";
  const std::string full_depth_label = std::to_string(full_layers) + "L" + full_label;
  Table table({"weights", "batch", "tok/s " + depth_label, "ms/step " + depth_label, "vs fp16 " + depth_label,
               "GPU GB " + depth_label, "ms/layer", "tok/s " + full_depth_label, "vs fp16 " + full_depth_label,
               "weight GB/token " + full_depth_label, "GB/s " + full_depth_label, "% of bw",
               "GPU GB " + full_depth_label});
  nlohmann::json rows = nlohmann::json::array();
  for (int b : f.batches) {
    const DepthRun& fp16_deep = runs[{"fp16", layers}];
    const auto fp16_full = full_depth("fp16", b);
    for (const std::string& wname : names) {
      const DepthRun& deep = runs[{wname, layers}];
      nlohmann::json j = {{"weights", wname}, {"batch", b}, {"layers_measured", layers}, {"full_layers", full_layers}};
      if (!deep.ok) {
        table.add_row({wname, std::to_string(b), deep.note});
        j["note"] = deep.note;
        rows.push_back(j);
        continue;
      }
      // Measured at `layers` layers.
      const DecodeTiming& t = deep.by_batch.at(b);
      const double speedup = fp16_deep.ok ? fp16_deep.by_batch.at(b).ms_per_step / t.ms_per_step : 0;
      const double gpu_gb = static_cast<double>(deep.device_total.at(b)) / kGB;
      std::vector<std::string> row = {wname, std::to_string(b), fmt(t.tokens_per_s, 1), fmt(t.ms_per_step, 2),
                                      speedup > 0 ? fmt(speedup) + "x" : "-", cuda ? fmt(gpu_gb, 2) : "-"};
      j.update({{"tokens_per_s_measured", t.tokens_per_s}, {"ms_per_step_measured", t.ms_per_step}});
      if (speedup > 0) j["speedup_vs_fp16_measured"] = speedup;
      if (cuda) j["gpu_gb_measured"] = gpu_gb;
      // Full depth (extrapolated unless `layers` is the full depth).
      std::string why;
      const auto full = full_depth(wname, b, &why);
      if (!full) {
        row.push_back(why);
        j["full_depth_note"] = why;
      } else {
        const double full_tps = b * 1e3 / full->ms;
        const double full_speedup = fp16_full ? fp16_full->ms / full->ms : 0;
        // Bandwidth from the top-k share of the weights: exact at batch 1, a lower bound above it.
        const double gbs = full->weight_gb * 1e3 / full->ms;
        row.insert(row.end(), {fmt(full->per_layer_ms, 3), fmt(full_tps, 1), full_speedup > 0 ? fmt(full_speedup) + "x" : "-",
                               fmt(full->weight_gb, 3), (b == 1 ? "" : ">=") + fmt(gbs, 1),
                               fmt(100 * gbs / dev.bandwidth_gbs, 0) + "%", cuda ? fmt(full->device_gb, 1) : "-"});
        j.update({{"ms_per_layer", full->per_layer_ms},
                  {"full_depth_extrapolated", extrapolate},
                  {"full_depth_ms_per_step", full->ms},
                  {"full_depth_tokens_per_s", full_tps},
                  {"full_depth_weight_gb_per_token", full->weight_gb},
                  {"full_depth_weight_gbs", gbs},
                  {"fraction_of_bandwidth", gbs / dev.bandwidth_gbs}});
        if (full_speedup > 0) j["full_depth_speedup_vs_fp16"] = full_speedup;
        if (cuda) j["full_depth_gpu_gb"] = full->device_gb;
      }
      table.add_row(row);
      rows.push_back(j);
    }
  }
  table.print();
  if (extrapolate)
    std::printf("(extrap.): full depth = the 1-layer model + %lld x the per-layer cost measured between 1 and %lld "
                "layers; not measured\n",
                static_cast<long long>(full_layers - 1), static_cast<long long>(layers));

  write_result(out, cuda ? "moe_cuda" : "moe_cpu", dev.name,
               {{"device_kind", cuda ? "cuda" : "cpu"},
                {"bandwidth_gbs", dev.bandwidth_gbs},
                {"bandwidth_probe", dev.bandwidth_probe},
                {"model", shape},
                {"config", f.config},
                {"config_overrides", overrides},
                {"layers_measured", layers},
                {"full_layers", full_layers},
                {"weights_source", source.in_memory ? "in-memory synthetic" : "on-disk synthetic, quantized"},
                {"prompt_tokens", f.prompt_tokens},
                {"new_tokens", new_tokens},
                {"loads", loads},
                {"runs", rows}});
}

void setup(CLI::App& group) {
  auto f = std::make_shared<Flags>();
  CLI::App* cmd = group.add_subcommand(
      "moe", "Decode tokens/s of a synthetic Mixtral-8x7B-shaped MoE: fp16 vs int4 experts, on the CPU or a GPU");
  cmd->add_option("--config", f->config, "The MoE config.json to shape the model after");
  cmd->add_option("--hidden", f->hidden, "hidden_size (default: the config's on cuda, 1024 on cpu)")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--ffn", f->ffn, "intermediate_size per expert (default: the config's on cuda, 3584 on cpu)")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--experts", f->experts, "num_local_experts")->check(CLI::PositiveNumber);
  cmd->add_option("--top-k", f->top_k, "num_experts_per_tok")->check(CLI::PositiveNumber);
  cmd->add_option("--vocab", f->vocab, "vocab_size")->check(CLI::PositiveNumber);
  cmd->add_option("--layers", f->layers,
                  "Layers to measure (default: cpu 4, cuda 8); with fewer than the config's, a 1-layer model is "
                  "measured too and the full depth extrapolated")
      ->check(CLI::PositiveNumber);
  cmd->add_flag("--no-extrapolation", f->no_extrapolation, "Measure only --layers; report no full-depth figures");
  cmd->add_option("--weights", f->weights,
                  "Variants: fp16 int8 int4 int8+int4-experts fp16+int4-experts (default: cpu fp16 int8 "
                  "int8+int4-experts int4; cuda fp16 fp16+int4-experts int8+int4-experts int4)");
  cmd->add_option("--batches", f->batches, "Batch sizes");
  add_run_options(*cmd, *f, "moe");
  cmd->callback([f] { run(*f); });
}

const Registrar registrar(setup);

}  // namespace
}  // namespace fineserve::bench
