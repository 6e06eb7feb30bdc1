// `fineserve bench grammar`: what constrained decoding costs.
//   1. compile: a 50-property JSON schema -> grammar tree -> DFA (median of --reps).
//   2. masks: per decode step along a random walk of --steps tokens through that grammar: the
//      allowed set cold (first visit of each DFA state: one walk of the vocabulary trie) and warm
//      (the same walk again: a cache hit), the brute-force check of every token for comparison,
//      and applying the mask to a logits row (-inf for every disallowed token).
//   3. throughput: generated tokens/s through the engine with and without the JSON-schema
//      constraint, at each --batch, on --model (EOS ignored, --new-tokens each, so both runs
//      generate the same number of tokens); the two alternate for --rounds rounds and each
//      reports its median, so that load changes on a shared machine hit both alike.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <random>

#include <nlohmann/json.hpp>

#include "bench/decode_run.h"
#include "bench/report.h"
#include "engine/engine.h"
#include "engine/grammar/grammar.h"
#include "engine/grammar/json_schema.h"
#include "kernels/base.h"
#include "models/model.h"
#include "models/tokenizer/tokenizer.h"

namespace fineserve::bench {
namespace {

using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

struct Flags {
  std::string model = "models-cache/smollm2-135m-instruct-int4-g32";
  std::string device = "cpu";
  int gpu = 0;
  std::vector<int> batch = {1, 16};
  int new_tokens = 64;
  int steps = 200;
  int reps = 5;
  int rounds = 3;
  std::string out;
};

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

nlohmann::ordered_json fifty_property_schema() {
  nlohmann::ordered_json props = nlohmann::ordered_json::object();
  nlohmann::ordered_json required = nlohmann::ordered_json::array();
  const char* types[] = {"string", "integer", "number", "boolean", "array"};
  for (int i = 0; i < 50; ++i) {
    const std::string name = "field_" + std::to_string(i);
    props[name] = {{"type", types[i % 5]}};
    if (i % 5 == 0) props[name]["maxLength"] = 20;
    if (i % 5 == 4) props[name]["items"] = {{"type", "integer"}};
    required.push_back(name);
  }
  return {{"type", "object"}, {"properties", props}, {"required", required}, {"additionalProperties", false}};
}

double tokens_per_s(Model& model, const Tokenizer& tok, int batch, int new_tokens,
                    const std::shared_ptr<const grammar::Grammar>& g) {
  EngineConfig ec;
  ec.kv_cache_bytes = 512ull << 20;
  ec.max_seqs = std::max(batch, 1);
  Engine engine(model, &tok, ec);
  std::vector<GenerationRequest> reqs;
  const std::vector<int32_t> prompt = tok.encode("Fill in the record as JSON:");
  for (int i = 0; i < batch; ++i) {
    GenerationRequest r;
    r.prompt = prompt;
    r.stop.max_new_tokens = new_tokens;
    r.ignore_eos = true;
    r.sampling.do_sample = true;
    r.sampling.seed = static_cast<uint64_t>(i + 1);
    r.grammar = g;
    reqs.push_back(r);
  }
  const auto t0 = Clock::now();
  int64_t tokens = 0;
  for (const auto& res : engine.generate(reqs)) tokens += static_cast<int64_t>(res.tokens.size());
  return static_cast<double>(tokens) / seconds_since(t0);
}

void run(const Flags& f) {
  const DeviceContext dev = open_device(f.device, f.gpu);
  auto backend = make_backend(dev);
  auto model = load_model(f.model, *backend);
  auto tok = load_tokenizer(f.model);
  const int32_t width = static_cast<int32_t>(model->info().vocab_size);
  std::vector<int32_t> eos = {static_cast<int32_t>(model->info().eos_token_id)};
  std::printf("model: %s (vocab %d), device: %s\n", f.model.c_str(), width, dev.name.c_str());

  auto t0 = Clock::now();
  auto vocab = grammar::VocabIndex::from_tokenizer(*tok, width, eos);
  const double index_ms = seconds_since(t0) * 1e3;

  // 1. Compile.
  const auto schema = fifty_property_schema();
  std::vector<double> compile_ms;
  std::shared_ptr<const grammar::Grammar> g;
  for (int i = 0; i < f.reps; ++i) {
    t0 = Clock::now();
    g = grammar::compile_grammar(grammar::json_schema_grammar(schema), vocab);
    compile_ms.push_back(seconds_since(t0) * 1e3);
  }

  // 2. Masks along one random walk, cold then warm; brute force on the same states.
  std::vector<int32_t> walk;
  std::vector<double> cold_us, warm_us, brute_us, apply_us;
  std::vector<float> logits(static_cast<size_t>(width));
  {
    auto fresh = grammar::compile_grammar(grammar::json_schema_grammar(schema), vocab);
    std::mt19937 rng(1);
    grammar::GrammarConstraint c(fresh);
    for (int s = 0; s < f.steps; ++s) {
      std::fill(logits.begin(), logits.end(), 0.0f);
      t0 = Clock::now();
      (void)c.allowed();
      cold_us.push_back(seconds_since(t0) * 1e6);
      c.mask_logits(logits.data(), width);
      std::vector<int32_t> ids;
      for (int32_t id = 0; id < width; ++id)
        if (std::isfinite(logits[static_cast<size_t>(id)]) && !vocab->is_eos(id)) ids.push_back(id);
      if (ids.empty()) break;
      const int32_t pick = ids[std::uniform_int_distribution<size_t>(0, ids.size() - 1)(rng)];
      walk.push_back(pick);
      c.advance(pick);
    }
    grammar::GrammarConstraint again(fresh);
    int32_t state = fresh->dfa().start();
    bool first = true;
    for (int32_t id : walk) {
      std::fill(logits.begin(), logits.end(), 0.0f);
      t0 = Clock::now();
      (void)again.allowed();
      warm_us.push_back(seconds_since(t0) * 1e6);
      t0 = Clock::now();
      again.mask_logits(logits.data(), width);
      apply_us.push_back(seconds_since(t0) * 1e6);
      t0 = Clock::now();
      const grammar::TokenMask m = fresh->allowed_brute_force(state, first);
      brute_us.push_back(seconds_since(t0) * 1e6);
      (void)m;
      state = fresh->dfa().walk(state, first ? vocab->start_bytes(id) : vocab->bytes(id));
      first = false;
      again.advance(id);
    }
  }

  // 3. Throughput.
  json points = json::array();
  Table tp({"batch", "unconstrained tok/s", "json-schema tok/s", "ratio"});
  for (int b : f.batch) {
    std::vector<double> free_runs, constrained_runs;
    for (int r = 0; r < f.rounds; ++r) {
      free_runs.push_back(tokens_per_s(*model, *tok, b, f.new_tokens, nullptr));
      constrained_runs.push_back(tokens_per_s(*model, *tok, b, f.new_tokens, g));
    }
    const double free_tps = median(free_runs), constrained_tps = median(constrained_runs);
    tp.add_row({std::to_string(b), fmt(free_tps, 1), fmt(constrained_tps, 1), fmt(constrained_tps / free_tps, 3)});
    points.push_back({{"batch", b}, {"unconstrained_tokens_per_s", free_tps}, {"constrained_tokens_per_s", constrained_tps},
                      {"ratio", constrained_tps / free_tps}});
  }

  Table t({"measure", "value"});
  t.add_row({"vocabulary index build (ms)", fmt(index_ms, 1)});
  t.add_row({"50-property schema compile, median (ms)", fmt(median(compile_ms), 2)});
  t.add_row({"DFA states", std::to_string(g->dfa().num_states())});
  t.add_row({"allowed set per step, cold cache, median (us)", fmt(median(cold_us), 1)});
  t.add_row({"allowed set per step, cold cache, max (us)", fmt(*std::max_element(cold_us.begin(), cold_us.end()), 1)});
  t.add_row({"allowed set per step, warm cache, median (us)", fmt(median(warm_us), 1)});
  t.add_row({"allowed set per step, brute force, median (us)", fmt(median(brute_us), 1)});
  t.add_row({"mask applied to logits per step, median (us)", fmt(median(apply_us), 1)});
  t.print();
  std::printf("\n");
  tp.print();

  const json results = {{"model", f.model},
                        {"vocab", width},
                        {"vocab_index_ms", index_ms},
                        {"compile_50_properties_ms", median(compile_ms)},
                        {"dfa_states", g->dfa().num_states()},
                        {"mask_steps", walk.size()},
                        {"mask_cold_us", median(cold_us)},
                        {"mask_cold_max_us", *std::max_element(cold_us.begin(), cold_us.end())},
                        {"mask_warm_us", median(warm_us)},
                        {"mask_brute_force_us", median(brute_us)},
                        {"mask_apply_us", median(apply_us)},
                        {"new_tokens", f.new_tokens},
                        {"rounds", f.rounds},
                        {"throughput", points}};
  const std::string out = f.out.empty() ? "docs/results/grammar_" + f.device + ".json" : f.out;
  write_result(out, "grammar", dev.name, results);
}

void setup(CLI::App& group) {
  auto f = std::make_shared<Flags>();
  CLI::App* cmd = group.add_subcommand("grammar", "Constrained decoding: schema compile time, mask time per step, tok/s with and without");
  cmd->add_option("--model", f->model, "Checkpoint directory with its tokenizer (default: the default model)");
  cmd->add_option("--device", f->device, "cpu or cuda")->check(CLI::IsMember({"cpu", "cuda"}));
  cmd->add_option("--gpu", f->gpu, "CUDA device index")->check(CLI::NonNegativeNumber);
  cmd->add_option("--batch", f->batch, "Batch sizes for the throughput runs")->check(CLI::PositiveNumber);
  cmd->add_option("--new-tokens", f->new_tokens, "Tokens generated per request in the throughput runs")->check(CLI::PositiveNumber);
  cmd->add_option("--steps", f->steps, "Steps of the random walk the mask timings follow")->check(CLI::PositiveNumber);
  cmd->add_option("--reps", f->reps, "Schema compilations (median)")->check(CLI::PositiveNumber);
  cmd->add_option("--rounds", f->rounds, "Alternating throughput rounds (median)")->check(CLI::PositiveNumber);
  cmd->add_option("--out", f->out, "JSON result path (default: docs/results/grammar_<device>.json)");
  cmd->callback([f] { run(*f); });
}

const Registrar registrar(setup);

}  // namespace
}  // namespace fineserve::bench
