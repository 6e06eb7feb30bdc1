// `fineserve eval ppl`: perplexity of a checkpoint over a text file.
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <memory>

#include <nlohmann/json.hpp>

#include "kernels/base.h"
#include "models/model.h"
#include "quant/gguf_convert.h"
#include "models/perplexity.h"
#include "models/tokenizer/tokenizer.h"
#include "server/commands.h"
#include "server/progress.h"

namespace fineserve {

void add_eval_command(CLI::App& app) {
  struct Flags {
    std::string model, text, device = "cpu", dtype, json, reference;
    int ctx = 1024, stride = 0, chunk = 256;
    int64_t max_tokens = 0;
  };
  auto f = std::make_shared<Flags>();
  CLI::App* eval = app.add_subcommand("eval", "Evaluate a model");
  eval->require_subcommand(1);
  CLI::App* ppl = eval->add_subcommand("ppl", "Perplexity over a text file (sliding window)");
  ppl->add_option("--model", f->model, "Checkpoint directory (dense or FineQuant)")->required();
  ppl->add_option("--text", f->text, "UTF-8 text file")->required()->check(CLI::ExistingFile);
  ppl->add_option("--ctx", f->ctx, "Window length in tokens (capped at the model's context)")->check(CLI::Range(2, 1 << 20));
  ppl->add_option("--stride", f->stride, "Tokens between window starts (default: ctx / 2)")->check(CLI::PositiveNumber);
  ppl->add_option("--chunk", f->chunk, "Tokens per forward step")->check(CLI::PositiveNumber);
  ppl->add_option("--max-tokens", f->max_tokens, "Score only the first N tokens of the text")->check(CLI::PositiveNumber);
  ppl->add_option("--device", f->device, kDeviceHelp);
  ppl->add_option("--dtype", f->dtype, kDtypeHelp);
  ppl->add_option("--json", f->json, "Also write the result as JSON to this file");
  ppl->add_option("--reference", f->reference,
                  "A reference checkpoint (e.g. the unquantized model, same tokenizer): also report the mean KL "
                  "divergence KL(reference || model) of the next-token distributions");
  ppl->callback([f] {
    f->model = quant::model_dir_for(f->model).string();  // a .gguf file: its FineQuant conversion
    std::ifstream in(f->text, std::ios::binary);
    if (!in) throw Error("cannot read " + f->text);
    const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    auto tokenizer = load_tokenizer(f->model);
    auto backend = make_backend(f->device, f->dtype);
    auto model = load_model(f->model, *backend);
    std::unique_ptr<Backend> ref_backend;
    std::unique_ptr<Model> reference;
    if (!f->reference.empty()) {
      ref_backend = make_backend(f->device, f->dtype);
      reference = load_model(f->reference, *ref_backend);
    }
    std::vector<int32_t> ids = tokenizer->encode(text);
    if (f->max_tokens > 0 && static_cast<int64_t>(ids.size()) > f->max_tokens) ids.resize(static_cast<size_t>(f->max_tokens));
    PerplexityOptions o;
    o.ctx = static_cast<int>(std::min<int64_t>(f->ctx, model->info().max_context));
    o.stride = f->stride > 0 ? std::min(f->stride, o.ctx) : std::max(1, o.ctx / 2);
    o.chunk = f->chunk;
    ProgressBar bar("ppl");
    const auto t0 = std::chrono::steady_clock::now();
    auto report = [&](int64_t done, int64_t total) {
      bar.update(static_cast<double>(done) / static_cast<double>(total), std::to_string(done) + "/" + std::to_string(total) + " tokens");
    };
    const PerplexityResult r =
        reference ? perplexity_vs_reference(*model, *reference, ids, o, report) : perplexity(*model, ids, o, report);
    bar.done();
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("perplexity %.4f (%.4f bits/token) over %lld tokens of %s: %d windows of %d, stride %d, %s, %.1f s\n",
                r.ppl(), r.bits_per_token(), static_cast<long long>(r.tokens), f->text.c_str(), r.windows, o.ctx,
                o.stride, model->info().quantization.c_str(), seconds);
    if (reference) {
      std::printf("vs reference %s (perplexity %.4f): mean KL %.6f, max KL %.4f, same top token %.2f%%\n",
                  f->reference.c_str(), r.ref_ppl(), r.mean_kl(), r.kl_max, 100.0 * r.same_top_fraction());
    }
    if (!f->json.empty()) {
      nlohmann::json j = {{"model", f->model},         {"text", f->text},
                                {"quantization", model->info().quantization},
                                {"ctx", o.ctx},               {"stride", o.stride},
                                {"tokens", r.tokens},         {"windows", r.windows},
                                {"nll_sum", r.nll_sum},       {"perplexity", r.ppl()},
                                {"bits_per_token", r.bits_per_token()},
                                {"weight_bytes", model->info().weight_bytes},
                                {"seconds", seconds}};
      if (reference) {
        j["reference"] = f->reference;
        j["reference_perplexity"] = r.ref_ppl();
        j["mean_kl"] = r.mean_kl();
        j["max_kl"] = r.kl_max;
        j["same_top_fraction"] = r.same_top_fraction();
      }
      std::ofstream out(f->json);
      out << j.dump(2) << "\n";
      if (!out.flush()) throw Error("cannot write " + f->json);
    }
  });
}

}  // namespace fineserve
