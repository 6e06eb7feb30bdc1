// `fineserve synth`: writes a synthetic checkpoint of a real shape (OPT, Llama, Mistral, Mixtral) for
// tests and benchmarks.
#include <cstdio>
#include <memory>

#include "kernels/base.h"
#include "models/synthetic.h"
#include "server/commands.h"
#include "server/progress.h"

namespace fineserve {

void add_synth_command(CLI::App& app) {
  auto o = std::make_shared<SynthOptions>();
  auto dtype = std::make_shared<std::string>("f16");
  auto shard_gb = std::make_shared<double>(4.0);
  auto sets = std::make_shared<std::vector<std::string>>();
  CLI::App* cmd = app.add_subcommand("synth", "Write a synthetic checkpoint (OPT, Llama, Mistral, Mixtral) with Gaussian weights");
  cmd->add_option("--config", o->config, "config.json, e.g. configs/models/opt-1.3b.json or mixtral-8x7b.json")->required();
  cmd->add_option("--out", o->out, "Checkpoint directory to create")->required();
  cmd->add_option("--dtype", *dtype, "f16, bf16 or f32")->check(CLI::IsMember({"f16", "bf16", "f32"}));
  cmd->add_option("--seed", o->seed, "Random seed");
  cmd->add_option("--std", o->stddev, "Standard deviation of the weights")->check(CLI::PositiveNumber);
  cmd->add_option("--layers", o->num_layers, "Override num_hidden_layers (a shallow model of real width)");
  cmd->add_option("--set", *sets,
                  "Override a config field, KEY=VALUE with VALUE as JSON (repeatable), e.g. --set hidden_size=512 "
                  "--set num_local_experts=4 for a small-shaped model");
  cmd->add_option("--outlier-channels", o->outlier_channels, "Number of planted outlier input channels");
  cmd->add_option("--outlier-scale", o->outlier_scale, "Scale of the planted outlier channels");
  cmd->add_option("--outlier-pattern", o->outlier_pattern, "Regex of the matrices that get the outlier channels");
  cmd->add_option("--shard-gb", *shard_gb, "Maximum shard size in GB")->check(CLI::PositiveNumber);
  cmd->add_flag("--force", o->overwrite, "Replace an existing output directory");
  cmd->callback([o, dtype, shard_gb, sets] {
    o->dtype = *dtype == "f32" ? DType::F32 : *dtype == "bf16" ? DType::BF16 : DType::F16;
    for (const std::string& kv : *sets) {
      const size_t eq = kv.find('=');
      if (eq == std::string::npos || eq == 0) throw Error("--set expects KEY=VALUE, got '" + kv + "'");
      const std::string value = kv.substr(eq + 1);
      nlohmann::json v = nlohmann::json::parse(value, nullptr, /*allow_exceptions=*/false);
      o->overrides[kv.substr(0, eq)] = v.is_discarded() ? nlohmann::json(value) : v;  // bare words are strings
    }
    o->max_shard_bytes = static_cast<uint64_t>(*shard_gb * 1e9);
    ProgressBar bar("synth");
    write_synthetic(*o, [&](size_t done, size_t total) {
      bar.update(static_cast<double>(done) / static_cast<double>(total), std::to_string(done) + "/" + std::to_string(total));
    });
    bar.done();
    std::printf("wrote %s\n", o->out.string().c_str());
  });
}

}  // namespace fineserve
