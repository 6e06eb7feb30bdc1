// `fineserve generate`: runs a model on prompts from flags or stdin and streams the tokens.
#include <chrono>
#include <cstdio>
#include <iostream>
#include <iterator>
#include <memory>

#include "engine/engine.h"
#include "engine/tp.h"
#include "kernels/base.h"
#include "models/model.h"
#include "models/tokenizer/tokenizer.h"
#include "quant/gguf_convert.h"
#include "server/commands.h"

namespace fineserve {

void add_generate_command(CLI::App& app) {
  struct Flags {
    std::string model, device = "cpu", dtype;
    std::vector<std::string> prompts;
    int max_new_tokens = 64;
    float temperature = 1.0f, top_p = 1.0f, repetition_penalty = 1.0f;
    int top_k = 0;
    bool do_sample = false;
    uint64_t seed = 0;
    std::vector<std::string> stop;
    int batch = 1;
    double kv_cache_mb = 256;
    int max_batch_tokens = 512;
    bool ignore_eos = false;
    int tp = 1;
    double tp_timeout_s = 120;
  };
  auto f = std::make_shared<Flags>();
  CLI::App* cmd = app.add_subcommand("generate", "Generate text from a prompt (flags or stdin), streaming to stdout");
  cmd->add_option("--model", f->model, "Checkpoint directory (dense or FineQuant)")->required();
  cmd->add_option("--prompt", f->prompts, "Prompt text (repeatable: the prompts run as one batch); stdin when absent");
  cmd->add_option("--device", f->device, kDeviceHelp);
  cmd->add_option("--dtype", f->dtype, kDtypeHelp);
  cmd->add_option("--max-new-tokens", f->max_new_tokens)->check(CLI::PositiveNumber);
  cmd->add_flag("--do-sample", f->do_sample, "Sample instead of greedy decoding");
  cmd->add_option("--temperature", f->temperature);
  cmd->add_option("--top-k", f->top_k);
  cmd->add_option("--top-p", f->top_p);
  cmd->add_option("--repetition-penalty", f->repetition_penalty);
  cmd->add_option("--seed", f->seed);
  cmd->add_option("--stop", f->stop, "Stop string (repeatable)");
  cmd->add_flag("--ignore-eos", f->ignore_eos, "Keep generating past the end-of-sequence token");
  cmd->add_option("--batch", f->batch, "Run each prompt this many times in one batch (throughput)")->check(CLI::PositiveNumber);
  cmd->add_option("--kv-cache-mb", f->kv_cache_mb, "KV cache size")->check(CLI::PositiveNumber);
  cmd->add_option("--max-batch-tokens", f->max_batch_tokens, "Tokens per step (prefill chunk size)")->check(CLI::PositiveNumber);
  cmd->add_option("--tp", f->tp, "Tensor-parallel ranks (CPU: threads of this process, splitting heads and FFN)")
      ->check(CLI::Range(1, 1024))
      ->envname("FINESERVE_TP");
  cmd->add_option("--tp-timeout", f->tp_timeout_s, "Seconds a tensor-parallel collective may wait for the other ranks")
      ->check(CLI::PositiveNumber);
  cmd->callback([f] {
    f->model = quant::model_dir_for(f->model).string();  // a .gguf file: its FineQuant conversion
    if (f->prompts.empty()) {
      std::string text((std::istreambuf_iterator<char>(std::cin)), std::istreambuf_iterator<char>());
      f->prompts.push_back(text);
    }
    for (const auto& p : f->prompts)
      if (p.empty()) throw Error("the prompt is empty");
    auto tokenizer = load_tokenizer(f->model);
    std::unique_ptr<Backend> backend;
    std::unique_ptr<Model> model;
    if (f->tp == 1) {
      backend = make_backend(f->device, f->dtype);
      model = load_model(f->model, *backend);
    } else {
      if (f->device != "cpu")
        throw Error("generate --tp " + std::to_string(f->tp) + " runs the ranks as threads on the CPU (--device cpu); "
                    "multi-GPU tensor parallelism is `fineserve serve --tp N --device cuda`");
      model = load_model_tp_cpu(f->model, f->tp, std::chrono::milliseconds(static_cast<int64_t>(f->tp_timeout_s * 1000)));
    }
    EngineConfig ec;
    ec.kv_cache_bytes = static_cast<uint64_t>(f->kv_cache_mb * (1 << 20));
    ec.max_batch_tokens = f->max_batch_tokens;
    ec.max_seqs = std::max(32, static_cast<int>(f->prompts.size()) * f->batch);
    Engine engine(*model, tokenizer.get(), ec);

    std::vector<GenerationRequest> requests;
    size_t prompt_tokens = 0;
    for (const auto& p : f->prompts) {
      for (int b = 0; b < f->batch; ++b) {
        GenerationRequest r;
        r.prompt = tokenizer->encode(p);
        r.sampling.do_sample = f->do_sample;
        r.sampling.temperature = f->temperature;
        r.sampling.top_k = f->top_k;
        r.sampling.top_p = f->top_p;
        r.sampling.repetition_penalty = f->repetition_penalty;
        r.sampling.seed = f->seed + static_cast<uint64_t>(requests.size());
        // The engine takes resolved requests: the prompt and its new tokens must fit the context.
        const int64_t room = model->info().max_context - static_cast<int64_t>(r.prompt.size());
        if (room < 1) throw Error("the prompt has " + std::to_string(r.prompt.size()) + " tokens; the model's context is " +
                                  std::to_string(model->info().max_context));
        r.stop.max_new_tokens = static_cast<int>(std::min<int64_t>(f->max_new_tokens, room));
        r.stop.stop = f->stop;
        r.ignore_eos = f->ignore_eos;
        prompt_tokens += r.prompt.size();
        requests.push_back(std::move(r));
      }
    }
    const auto t0 = std::chrono::steady_clock::now();
    std::chrono::steady_clock::time_point t_first;
    bool first = true;
    size_t generated = 0;
    uint64_t stream_id = 0;
    const bool single = requests.size() == 1;
    auto results = engine.generate(std::move(requests), [&](const TokenEvent& e) {
      if (first) {
        t_first = std::chrono::steady_clock::now();
        first = false;
        stream_id = e.request_id;
      }
      ++generated;
      if (single && e.request_id == stream_id) {
        std::fwrite(e.text.data(), 1, e.text.size(), stdout);
        std::fflush(stdout);
      }
    });
    const auto t1 = std::chrono::steady_clock::now();
    if (single) {
      std::printf("\n");
    } else {
      for (size_t i = 0; i < results.size(); ++i) std::printf("--- [%zu] %s\n", i, results[i].text.c_str());
    }
    const double prefill_s = std::chrono::duration<double>(t_first - t0).count();
    const double decode_s = std::chrono::duration<double>(t1 - t_first).count();
    const size_t decode_tokens = generated > results.size() ? generated - results.size() : 0;
    std::fprintf(stderr, "prompt: %zu tokens in %.3f s (%.1f tokens/s); decode: %zu tokens in %.3f s (%.1f tokens/s)\n",
                 prompt_tokens, prefill_s, prefill_s > 0 ? static_cast<double>(prompt_tokens) / prefill_s : 0.0,
                 decode_tokens, decode_s, decode_s > 0 ? static_cast<double>(decode_tokens) / decode_s : 0.0);
  });
}

}  // namespace fineserve
