// `fineserve quantize`: a Hugging Face checkpoint in, a FineQuant checkpoint out.
#include <cstdio>
#include <exception>
#include <fstream>
#include <memory>
#include <string>

#include "kernels/base.h"
#include "models/checkpoint/util.h"
#include "models/tokenizer/tokenizer.h"
#include "quant/calibration/activation_stats.h"
#include "quant/convert.h"
#include "server/commands.h"
#include "server/progress.h"

namespace fineserve {

void add_quantize_command(CLI::App& app) {
  struct Flags {
    std::string model, out;
    int bits = 4;
    int expert_bits = 0;
    double alpha = 0, tolerance = 0, error_cap = 0, target_bits = 0;
    std::string scale_rule = "search";
    bool no_search = false;
    int64_t group = 0;
    double max_rel_error = 0;
    std::vector<std::string> keep;
    std::vector<std::string> salience;
    std::string calibration;
    int64_t calibration_tokens = 8192;
    bool quantize_embeddings = false;
    double shard_gb = 4;
    bool force = false;
    bool quiet = false;
  };
  auto f = std::make_shared<Flags>();
  CLI::App* cmd = app.add_subcommand("quantize", "Quantize a Hugging Face checkpoint with FineQuant");
  cmd->add_option("--model", f->model, "Source checkpoint directory (config.json + *.safetensors)")->required();
  cmd->add_option("--out", f->out, "Output directory (created; must not exist unless --force)")->required();
  cmd->add_option("--bits", f->bits, "Code width: 8 or 4")->check(CLI::IsMember({8, 4}));
  cmd->add_option("--expert-bits", f->expert_bits,
                  "Code width of MoE expert matrices (block_sparse_moe.experts.*): 8 or 4, e.g. --bits 8 "
                  "--expert-bits 4 (default: --bits). MoE routers always stay in 16 bits")
      ->check(CLI::IsMember({8, 4}));
  auto* tolerance = cmd->add_option("--tolerance", f->tolerance,
                                    "Adaptive group size (default): the coarsest group whose error is at most this "
                                    "many times what i.i.d. Gaussian weights give at the same group (default 1.1)");
  auto* cap = cmd->add_option("--error-cap", f->error_cap,
                              "Adaptive group size: only groups where i.i.d. Gaussian weights stay within this "
                              "relative error (or the matrix itself does) are candidates (default 0.086, llama.cpp Q4_0's "
                              "error on Gaussian weights: int4 at 32 unless lighter-tailed, int8 any group)");
  auto* alpha = cmd->add_option("--alpha", f->alpha,
                                "The paper's α rule instead: refine while the mean group range shrinks by more "
                                "than this factor when the group is halved (1.1 is its default)");
  auto* group = cmd->add_option("--group", f->group, "Fixed group size for every matrix (-1 = K, column-wise)");
  auto* err = cmd->add_option("--max-rel-error", f->max_rel_error,
                              "Coarsest group whose relative Frobenius error is <= this target");
  auto* target = cmd->add_option("--target-bits", f->target_bits,
                                 "Bit budget: choose each matrix's bits (8/4) and group to minimise the weighted "
                                 "quantization error at this average of bits per weight, scales included (e.g. 4.5)");
  alpha->excludes(group)->excludes(err)->excludes(tolerance)->excludes(cap)->excludes(target);
  tolerance->excludes(group)->excludes(err)->excludes(target);
  cap->excludes(group)->excludes(err)->excludes(target);
  group->excludes(err)->excludes(target);
  cmd->add_option("--salience", f->salience,
                  "With --target-bits: weight the error of matrices matching REGEX by W (REGEX=W, repeatable; "
                  "weights of several matches multiply; by default every matrix weighs 1)")
      ->needs(target);
  err->excludes(target);
  auto* calibration = cmd->add_option(
      "--calibration", f->calibration,
      "Optional calibration text (UTF-8): run the source model on it and weight each input column's "
      "quantization error by the mean square of its activations (the calibrated search; with --target-bits also "
      "the allocation). Default: data-free")->check(CLI::ExistingFile);
  cmd->add_option("--calibration-tokens", f->calibration_tokens,
                  "Use at most this many tokens of the calibration text (default 8192)")
      ->check(CLI::PositiveNumber)
      ->needs(calibration);
  auto* rule = cmd->add_option("--scale-rule", f->scale_rule,
                               "How each group's scale is chosen: search (default: clipping ratios and the "
                               "sign-aware scale, least squared error), signed-absmax (the extreme maps to -8 / "
                               "-128), absmax (absmax / 7 or / 127, quantizer version 1)")
                   ->check(CLI::IsMember({"search", "signed-absmax", "absmax"}));
  cmd->add_flag("--no-search", f->no_search, "Plain absmax scales (= --scale-rule absmax)")->excludes(rule);
  cmd->add_option("--keep", f->keep,
                  "Regex of linear weights to keep in 16 bits (repeatable; replaces the default: embed, "
                  "lm_head, norm, MoE routers)");
  cmd->add_flag("--quantize-embeddings", f->quantize_embeddings,
                "Also quantize the token embedding and LM head matrices");
  cmd->add_option("--shard-gb", f->shard_gb, "Maximum shard size in GB")->check(CLI::PositiveNumber);
  cmd->add_flag("--force", f->force, "Replace an existing output directory");
  cmd->add_flag("-q,--quiet", f->quiet, "Do not print the per-matrix table");
  cmd->callback([f, group, err, alpha] {
    quant::ConvertOptions o;
    o.model = f->model;
    o.out = f->out;
    o.group.bits = f->bits;
    o.expert_bits = f->expert_bits;
    if (*group) {
      o.group.mode = quant::GroupMode::Fixed;
      if (f->group != -1 && f->group <= 0) throw Error("--group must be positive or -1 (column-wise)");
      o.group.group = f->group;
    } else if (*err) {
      o.group.mode = quant::GroupMode::MaxRelError;
      o.group.max_rel_error = f->max_rel_error;
    } else if (*alpha) {
      o.group.mode = quant::GroupMode::Alpha;
      o.group.alpha = f->alpha;
    } else {
      o.group.mode = quant::GroupMode::Adaptive;
      o.group.tolerance = f->tolerance;
      o.group.error_cap = f->error_cap;
    }
    o.target_bits = f->target_bits;
    if (!f->salience.empty()) {
      o.salience.clear();
      for (const std::string& s : f->salience) {
        const size_t eq = s.rfind('=');
        if (eq == std::string::npos || eq == 0) throw Error("--salience takes REGEX=WEIGHT, got '" + s + "'");
        double w = 0;
        try {
          size_t used = 0;
          w = std::stod(s.substr(eq + 1), &used);
          if (used != s.size() - eq - 1) w = 0;
        } catch (const std::exception&) {
          w = 0;
        }
        if (!(w > 0)) throw Error("--salience " + s + ": the weight must be a positive number");
        o.salience.push_back({s.substr(0, eq), w});
      }
    }
    const std::string rule_name = f->no_search ? "absmax" : f->scale_rule;
    o.group.scale = rule_name == "absmax"          ? quant::ScaleRule::Absmax
                    : rule_name == "signed-absmax" ? quant::ScaleRule::SignedAbsmax
                                                   : quant::ScaleRule::Search;
    o.keep = !f->keep.empty()           ? f->keep
             : f->quantize_embeddings ? quant::keep_patterns_quantizing_embeddings()
                                      : quant::default_keep_patterns();
    o.max_shard_bytes = static_cast<uint64_t>(f->shard_gb * 1e9);
    o.overwrite = f->force;

    if (!f->calibration.empty()) {
      const std::vector<int32_t> ids = load_tokenizer(f->model)->encode(ckpt::read_file(f->calibration));
      const quant::ActivationStats stats =
          quant::collect_activation_stats(f->model, ids, {.ctx = 512, .max_tokens = f->calibration_tokens});
      o.importance = stats.mean_sq;
      o.calibration = f->calibration + ", " + std::to_string(stats.tokens) + " tokens";
    }
    ProgressBar bar("quantize");
    const quant::ConvertReport report = quant::convert_checkpoint(o, [&](const quant::Progress& p) {
      bar.update(p.bytes_total ? static_cast<double>(p.bytes_done) / static_cast<double>(p.bytes_total) : 0.0,
                 std::to_string(p.tensors_done) + "/" + std::to_string(p.tensors_total) + " " + p.current);
    });
    bar.done();
    if (!f->quiet) std::fputs(quant::format_report(report).c_str(), stdout);
    std::printf("wrote %s (report: %s/quant_report.json)\n", f->out.c_str(), f->out.c_str());
  });
}

}  // namespace fineserve
