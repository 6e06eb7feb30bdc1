// `fineserve bench model`: prefill and decode tokens/s of real checkpoints at batch 1 (e.g. the
// embedded default SmolLM2 as fp16, int8 and int4), on the CPU or one GPU, through the engine's own
// step loop. Beside each figure: the weight bytes a decode step reads, the decode bandwidth that
// makes, its share of the bandwidth measured in the same run, the decode floor that bandwidth
// allows, and the ratios to the first model listed (the baseline, e.g. fp16).
//
// The peer: with --llama-bench BIN --gguf FILE, llama.cpp's llama-bench runs on that GGUF in the
// same run (same thread count, the same prompt and generation lengths) and its pp/tg tokens/s sit
// in the table with our ratios to them. Every round measures every model and the peer in turn;
// the figures are medians over the rounds (these machines are noisy).
//
// --cpu-path (one per --model) picks the CPU backend's linear path per subject, so that the exact
// weight-only kernels and the int8-activation ones (kernels/cpu/gemm_a8.h) sit side by side in one
// run: exact, int8-act, int8-head or int8-act+head (see configs/cpu_env.h for the same choices as
// environment variables), each optionally forced onto one kernel ISA (exact@avx2 beside exact@avx512).
//
// --batch (repeatable) adds decode at more batch sizes (e.g. 1 and 8: symmetric vs asymmetric int4
// at batch 1 and 8, docs/results/asym_smollm2_cpu.json); the first is the table's main figure.
#include <fcntl.h>
#include <omp.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <variant>

#include "bench/decode_run.h"
#include "bench/report.h"
#include "configs/cpu_env.h"
#include "kernels/base.h"
#include "kernels/cpu/cpu_backend.h"

extern char** environ;

namespace fineserve::bench {
namespace {
namespace fs = std::filesystem;

struct Flags {
  std::string device = "cpu";
  int gpu = 0;
  std::vector<std::string> models;
  std::vector<std::string> labels;
  std::vector<std::string> cpu_paths;
  std::vector<int> batches = {1};  // decode batch sizes; the first is the main figure
  int prompt_tokens = 128;
  int new_tokens = 64;
  int reps = 5;
  int rounds = 3;
  std::string llama_bench, gguf;
  int threads = 0;
  std::string out;
};

uint64_t directory_bytes(const fs::path& dir) {
  uint64_t bytes = 0;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.is_regular_file()) bytes += e.file_size();
  return bytes;
}

// Runs argv (no shell) and returns its standard output; throws fineserve::Error when it cannot
// start or exits non-zero. Its standard error passes through.
std::string run_capture(const std::vector<std::string>& args) {
  int fds[2];
  if (pipe(fds) != 0) throw Error("pipe failed");
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, fds[1], 1);
  posix_spawn_file_actions_addclose(&actions, fds[0]);
  std::vector<char*> argv;
  for (const std::string& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  pid_t pid = -1;
  const int rc = posix_spawnp(&pid, argv[0], &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  close(fds[1]);
  if (rc != 0) {
    close(fds[0]);
    throw Error("cannot run " + args[0]);
  }
  std::string out;
  char buf[4096];
  for (ssize_t n; (n = read(fds[0], buf, sizeof buf)) > 0;) out.append(buf, static_cast<size_t>(n));
  close(fds[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) throw Error(args[0] + " failed");
  return out;
}

struct PeerTiming {
  double prefill_tps = 0, decode_tps = 0;
  std::string model_type, build;
  uint64_t model_bytes = 0;
};

// llama-bench -o json: one object per test; pp has n_gen 0, tg has n_prompt 0.
PeerTiming run_llama_bench(const Flags& f, int threads) {
  const std::string json = run_capture({f.llama_bench, "-m", f.gguf, "-p", std::to_string(f.prompt_tokens), "-n",
                                        std::to_string(f.new_tokens), "-t", std::to_string(threads), "-r",
                                        std::to_string(f.reps), "-o", "json"});
  const nlohmann::json tests = nlohmann::json::parse(json, nullptr, /*allow_exceptions=*/false);
  if (!tests.is_array()) throw Error("llama-bench printed no JSON array");
  PeerTiming t;
  for (const nlohmann::json& test : tests) {
    const int n_prompt = test.value("n_prompt", 0), n_gen = test.value("n_gen", 0);
    const double ts = test.value("avg_ts", 0.0);
    if (n_prompt > 0 && n_gen == 0) t.prefill_tps = ts;
    if (n_gen > 0 && n_prompt == 0) t.decode_tps = ts;
    t.model_type = test.value("model_type", "");
    t.build = test.value("build_commit", "");
    t.model_bytes = test.value("model_size", uint64_t{0});
  }
  if (t.prefill_tps <= 0 || t.decode_tps <= 0) throw Error("llama-bench reported no pp and tg results");
  return t;
}

// A --cpu-path value: PATH or PATH@ISA (exact@avx2: the exact path on the AVX2 kernels).
struct CpuPath {
  std::string path;
  std::optional<cpu::Isa> isa;  // none: the environment's choice (FINESERVE_CPU_ISA, else the best)
};

// The parsed value, or an error message (CLI validator and backend factory share it).
std::variant<CpuPath, std::string> parse_cpu_path(const std::string& spec) {
  const size_t at = spec.find('@');
  CpuPath p{spec.substr(0, at), std::nullopt};
  if (p.path != "exact" && p.path != "int8-act" && p.path != "int8-head" && p.path != "int8-act+head")
    return "unknown CPU path '" + p.path + "' (exact, int8-act, int8-head, int8-act+head)";
  if (at != std::string::npos) {
    p.isa = cpu::parse_isa(spec.substr(at + 1));
    if (!p.isa) return "unknown CPU kernel path '" + spec.substr(at + 1) + "' (reference, avx2, avx512)";
  }
  return p;
}

// The CPU backend for a --cpu-path value, on top of the environment's options.
std::unique_ptr<Backend> cpu_backend_for(const std::string& spec) {
  const CpuPath p = std::get<CpuPath>(parse_cpu_path(spec));
  CpuOptions o = cpu_options_from_env();
  o.int8_activations = p.path == "int8-act" || p.path == "int8-act+head";
  o.int8_dense_weights = p.path == "int8-head" || p.path == "int8-act+head";
  if (p.isa) {
    o.reference = *p.isa == cpu::Isa::Reference;
    o.isa = *p.isa;
  }
  return make_cpu_backend(o);
}

struct Subject {
  std::string label, path, quantization, cpu_path;
  uint64_t weight_bytes = 0, file_bytes = 0;
  std::unique_ptr<Backend> backend;
  std::unique_ptr<Model> model;
  std::vector<double> prefill, decode, decode_ms;  // one per round, at the first batch size
  std::map<int, std::vector<double>> decode_more;   // batch -> tok/s per round, the other batch sizes
};

void run(const Flags& f) {
  if (f.models.empty()) throw Error("--model: give at least one checkpoint directory");
  if (!f.labels.empty() && f.labels.size() != f.models.size())
    throw Error("--label: give one per --model, or none");
  if (f.llama_bench.empty() != f.gguf.empty()) throw Error("--llama-bench and --gguf go together");
  if (!f.cpu_paths.empty() && f.cpu_paths.size() != f.models.size())
    throw Error("--cpu-path: give one per --model, or none");
  if (f.new_tokens < 3) throw Error("--new-tokens must be at least 3 (two warm-up steps, then timed ones)");
  if (f.batches.empty()) throw Error("--batch: give at least one batch size");
  const int batch0 = f.batches.front();
  const DeviceContext dev = open_device(f.device, f.gpu);
  const bool cuda = dev.device == Device::Cuda;
  const int threads = f.threads > 0 ? f.threads : omp_get_max_threads();
  std::printf("device: %s\nbandwidth probe: %.1f GB/s (%s)\nprefill: %d tokens, batch 1, median of %d; "
              "decode: batch %d after that prompt, %d new tokens; %d rounds\n",
              dev.name.c_str(), dev.bandwidth_gbs, dev.bandwidth_probe.c_str(), f.prompt_tokens, f.reps, batch0,
              f.new_tokens, f.rounds);
  std::fflush(stdout);

  std::vector<Subject> subjects(f.models.size());
  for (size_t i = 0; i < f.models.size(); ++i) {
    Subject& s = subjects[i];
    s.path = f.models[i];
    s.label = f.labels.empty() ? fs::path(s.path).filename().string() : f.labels[i];
    if (s.label.empty()) s.label = fs::path(s.path).parent_path().filename().string();
    s.cpu_path = f.cpu_paths.empty() ? "" : f.cpu_paths[i];
    if (!s.cpu_path.empty() && cuda) throw Error("--cpu-path applies to --device cpu");
    s.backend = s.cpu_path.empty() ? make_backend(dev) : cpu_backend_for(s.cpu_path);
    s.model = load_model(s.path, *s.backend);
    s.quantization = s.model->info().quantization;
    s.weight_bytes = s.model->info().weight_bytes;
    s.file_bytes = directory_bytes(s.path);
    std::printf("loaded %s (%s, %s)\n", s.label.c_str(), s.model->info().architecture.c_str(), s.quantization.c_str());
  }

  std::vector<PeerTiming> peer;
  for (int round = 0; round < f.rounds; ++round) {
    for (Subject& s : subjects) {
      const PrefillTiming p = time_prefill(*s.model, f.prompt_tokens, f.reps);
      const DecodeTiming d = time_decode(*s.model, dev, batch0, f.prompt_tokens, f.new_tokens);
      s.prefill.push_back(p.tokens_per_s);
      s.decode.push_back(d.tokens_per_s);
      s.decode_ms.push_back(d.ms_per_step);
      std::printf("round %d %s: prefill %.1f tok/s, decode %.1f tok/s (batch %d)", round + 1, s.label.c_str(),
                  p.tokens_per_s, d.tokens_per_s, batch0);
      for (size_t b = 1; b < f.batches.size(); ++b) {
        const DecodeTiming more = time_decode(*s.model, dev, f.batches[b], f.prompt_tokens, f.new_tokens);
        s.decode_more[f.batches[b]].push_back(more.tokens_per_s);
        std::printf(", %.1f tok/s (batch %d)", more.tokens_per_s, f.batches[b]);
      }
      std::printf("\n");
      std::fflush(stdout);
    }
    if (!f.llama_bench.empty()) {
      peer.push_back(run_llama_bench(f, threads));
      std::printf("round %d llama.cpp: pp %.1f tok/s, tg %.1f tok/s\n", round + 1, peer.back().prefill_tps,
                  peer.back().decode_tps);
      std::fflush(stdout);
    }
  }

  const Subject& base = subjects.front();
  const double base_prefill = median(base.prefill), base_decode = median(base.decode);
  std::vector<double> peer_pp, peer_tg;  // per round
  for (const PeerTiming& p : peer) peer_pp.push_back(p.prefill_tps), peer_tg.push_back(p.decode_tps);
  const double peer_prefill = peer.empty() ? 0 : median(peer_pp), peer_decode = peer.empty() ? 0 : median(peer_tg);

  std::vector<std::string> header = {"model", "weights", "file MB", "weight MB/token", "prefill tok/s", "decode tok/s",
                                     "decode GB/s", "% of bw", "floor tok/s", "prefill vs " + base.label,
                                     "decode vs " + base.label};
  for (size_t b = 1; b < f.batches.size(); ++b) {
    header.push_back("decode tok/s b" + std::to_string(f.batches[b]));
    header.push_back("vs " + base.label);
  }
  if (!peer.empty()) header.insert(header.end(), {"prefill vs llama.cpp", "decode vs llama.cpp"});
  Table table(header);
  nlohmann::json runs = nlohmann::json::array();
  for (const Subject& s : subjects) {
    const double prefill = median(s.prefill), decode = median(s.decode), ms = median(s.decode_ms);
    const double gb = static_cast<double>(s.weight_bytes) / kGB;
    const double gbs = gb * 1e3 / ms, floor_tps = dev.bandwidth_gbs / gb;
    std::vector<std::string> row = {s.label, s.quantization, fmt(s.file_bytes / 1e6, 1), fmt(gb * 1e3, 1),
                                    fmt(prefill, 1), fmt(decode, 1), fmt(gbs, 1), fmt(100 * gbs / dev.bandwidth_gbs, 0) + "%",
                                    fmt(floor_tps, 1), fmt(prefill / base_prefill) + "x", fmt(decode / base_decode) + "x"};
    nlohmann::json j = {{"model", s.label},
                        {"path", fs::path(s.path).filename().string()},
                        {"quantization", s.quantization},
                        {"cpu_path", s.cpu_path.empty() ? "default" : s.cpu_path},
                        {"file_bytes", s.file_bytes},
                        {"weight_bytes_per_token", s.weight_bytes},
                        {"prefill_tokens_per_s", prefill},
                        {"prefill_tokens_per_s_rounds", s.prefill},
                        {"decode_tokens_per_s", decode},
                        {"decode_tokens_per_s_rounds", s.decode},
                        {"decode_ms_per_step", ms},
                        {"decode_weight_gbs", gbs},
                        {"fraction_of_bandwidth", gbs / dev.bandwidth_gbs},
                        {"decode_floor_tokens_per_s", floor_tps},
                        {"prefill_vs_baseline", prefill / base_prefill},
                        {"decode_vs_baseline", decode / base_decode},
                        {"decode_batch", batch0}};
    for (size_t b = 1; b < f.batches.size(); ++b) {
      const int batch = f.batches[b];
      const double tps = median(s.decode_more.at(batch)), base_tps = median(base.decode_more.at(batch));
      row.insert(row.end(), {fmt(tps, 1), fmt(tps / base_tps) + "x"});
      j["decode_more_batches"][std::to_string(batch)] = {{"decode_tokens_per_s", tps},
                                                         {"decode_tokens_per_s_rounds", s.decode_more.at(batch)},
                                                         {"decode_vs_baseline", tps / base_tps}};
    }
    if (!peer.empty()) {
      row.insert(row.end(), {fmt(prefill / peer_prefill) + "x", fmt(decode / peer_decode) + "x"});
      j["prefill_vs_llama_cpp"] = prefill / peer_prefill;
      j["decode_vs_llama_cpp"] = decode / peer_decode;
    }
    table.add_row(row);
    runs.push_back(j);
  }
  nlohmann::json peer_json;
  if (!peer.empty()) {
    const PeerTiming& p = peer.front();
    const double gb = static_cast<double>(p.model_bytes) / kGB;
    std::vector<std::string> row = {"llama.cpp", p.model_type, fmt(p.model_bytes / 1e6, 1), "-", fmt(peer_prefill, 1),
                                    fmt(peer_decode, 1), "-", "-", gb > 0 ? fmt(dev.bandwidth_gbs / gb, 1) : "-",
                                    fmt(peer_prefill / base_prefill) + "x", fmt(peer_decode / base_decode) + "x"};
    for (size_t b = 1; b < f.batches.size(); ++b) row.insert(row.end(), {"-", "-"});
    row.insert(row.end(), {"1.00x", "1.00x"});
    table.add_row(row);
    peer_json = {{"name", "llama.cpp llama-bench"},
                 {"gguf", fs::path(f.gguf).filename().string()},
                 {"model_type", p.model_type},
                 {"build_commit", p.build},
                 {"model_bytes", p.model_bytes},
                 {"threads", threads},
                 {"prefill_tokens_per_s", peer_prefill},
                 {"prefill_tokens_per_s_rounds", peer_pp},
                 {"decode_tokens_per_s", peer_decode},
                 {"decode_tokens_per_s_rounds", peer_tg},
                 {"note", "llama-bench's tg test decodes from an empty context; ours decodes after the prompt"}};
  }
  table.print();
  std::printf("floor tok/s: the decode rate at which one token's weight bytes take the measured bandwidth "
              "(weights only: KV-cache and activation traffic come on top)\n");

  nlohmann::json results = {{"device_kind", cuda ? "cuda" : "cpu"},
                            {"bandwidth_gbs", dev.bandwidth_gbs},
                            {"bandwidth_probe", dev.bandwidth_probe},
                            {"threads", cuda ? 0 : threads},
                            {"prompt_tokens", f.prompt_tokens},
                            {"new_tokens", f.new_tokens},
                            {"decode_batches", f.batches},
                            {"prefill_reps", f.reps},
                            {"rounds", f.rounds},
                            {"baseline", base.label},
                            {"runs", runs}};
  // The kernel path the environment picks (each subject's --cpu-path may force another).
  if (!cuda) results["cpu_isa_default"] = std::string(cpu::isa_name(cpu_options_from_env().isa.value_or(cpu::best_isa())));
  if (!peer.empty()) results["peer"] = peer_json;
  const std::string out = !f.out.empty() ? f.out : std::string("docs/results/model_") + (cuda ? "cuda" : "cpu") + ".json";
  write_result(out, cuda ? "model_cuda" : "model_cpu", dev.name, results);
}

void setup(CLI::App& group) {
  auto f = std::make_shared<Flags>();
  CLI::App* cmd = group.add_subcommand(
      "model", "Prefill and decode tokens/s of checkpoints at batch 1 (e.g. fp16 vs int4), optionally beside llama.cpp");
  cmd->add_option("--model", f->models, "Checkpoint directory (repeatable; the first is the baseline of the ratios)")
      ->required()
      ->check(CLI::ExistingDirectory);
  cmd->add_option("--label", f->labels, "A name per --model for the table (default: the directory's name)");
  cmd->add_option("--cpu-path", f->cpu_paths,
                  "CPU linear path per --model: exact, int8-act, int8-head, int8-act+head, optionally @ISA to force "
                  "the kernels (exact@avx2, int8-act@avx512)")
      ->check(CLI::Validator(
          [](std::string& v) {
            auto parsed = parse_cpu_path(v);
            return std::holds_alternative<std::string>(parsed) ? std::get<std::string>(parsed) : std::string();
          },
          "PATH[@ISA]"));
  cmd->add_option("--batch", f->batches, "Decode batch size (repeatable: --batch 1 --batch 8; default 1)")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--device", f->device, "cpu or cuda")->check(CLI::IsMember({"cpu", "cuda"}));
  cmd->add_option("--gpu", f->gpu, "CUDA device index")->check(CLI::NonNegativeNumber);
  cmd->add_option("--prompt-tokens", f->prompt_tokens, "Prompt length: prefilled in one step, then decoded after")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--new-tokens", f->new_tokens, "Tokens decoded per decode run (two warm up)")->check(CLI::PositiveNumber);
  cmd->add_option("--reps", f->reps, "Timed prefills per round (median)")->check(CLI::PositiveNumber);
  cmd->add_option("--rounds", f->rounds, "Rounds over all models and the peer (median)")->check(CLI::PositiveNumber);
  cmd->add_option("--llama-bench", f->llama_bench, "llama.cpp's llama-bench binary, to run as the peer");
  cmd->add_option("--gguf", f->gguf, "The GGUF file llama-bench runs")->check(CLI::ExistingFile);
  cmd->add_option("--threads", f->threads, "CPU threads llama-bench uses (default: ours, OpenMP's count)")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--out", f->out, "JSON result path (default: docs/results/model_<device>.json)");
  cmd->callback([f] { run(*f); });
}

const Registrar registrar(setup);

}  // namespace
}  // namespace fineserve::bench
