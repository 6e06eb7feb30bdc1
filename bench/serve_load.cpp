// `fineserve bench serve`: an offered-load sweep over loopback HTTP. For each concurrency C, C
// clients each send `rounds` streaming /generate_stream requests back to back (fixed prompt
// length, fixed max_new_tokens, EOS ignored); reported: generated tokens/s over the point's wall
// time, and time to first token and time per output token (p50, p99 over requests). The same
// sweep runs twice in one process: against the continuous-batching server (max_seqs = the largest
// C) and against the same server limited to one sequence per step (max_seqs = 1).
//
// With --peer-url (another OpenAI-compatible server, e.g. llama.cpp's llama-server) both servers
// are driven through POST /v1/completions instead (stream, greedy, ignore_eos, max_tokens fixed,
// the same prompts), point by point interleaved in one run — FineServe at C clients, then the peer
// at C clients — and tabled side by side with end-to-end latency; the one-sequence sweep is
// skipped then.
//
// Default model: a synthetic OPT of a real shape (configs/models/<name>.json, Gaussian weights),
// FineQuant int8, with the GPT-2 tokenizer files copied in (tests/data/gpt2), written once to the
// work directory. --model serves any checkpoint with a tokenizer instead.
//
// Prefix caching (--shared-prefix-words N, --chat, --compare-prefix-caching): every prompt starts
// with the same N-word "system prompt"; with --chat each client's rounds are the turns of one
// conversation (each prompt is the whole conversation so far); the second sweep then serves with
// prefix caching off at the same max_seqs, instead of one sequence per step.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <thread>

#include <nlohmann/json.hpp>

#include "bench/report.h"
#include "kernels/base.h"
#include "kernels/cpu/omp_threads.h"
#include "models/synthetic.h"
#include "quant/convert.h"
#include "server/engine_loop.h"
#include "bench/http_client.h"
#include "server/serve.h"

namespace fineserve::bench {
namespace {
namespace fs = std::filesystem;
using json = nlohmann::json;

struct Flags {
  std::string model;  // "" -> synthetic
  std::string synthetic = "opt-125m";
  int bits = 8;
  std::string tokenizer = "tests/data/gpt2";
  std::vector<int> concurrency = {1, 2, 4, 8, 16, 32, 64};
  int rounds = 2;
  int prompt_words = 32;
  int new_tokens = 32;
  double kv_cache_mb = 512;
  int max_batch_tokens = 512;
  std::string work;
  std::string out = "docs/results/serve_cpu.json";
  std::string peer_url;  // "" -> no peer
  std::string peer_name = "peer";
  // Prefix-caching workloads (see the top of the file).
  int shared_prefix_words = 0;
  bool chat = false;
  bool compare_prefix_caching = false;
};

// Where requests go and in which API.
struct Target {
  std::string host = "127.0.0.1";
  int port = 0;
  bool openai = false;  // /v1/completions (text chunks) instead of /generate_stream
};

// "http://host:port[/]" -> host, port.
Target parse_peer_url(const std::string& url) {
  std::string rest = url;
  if (rest.rfind("http://", 0) == 0) rest = rest.substr(7);
  else if (rest.find("://") != std::string::npos) throw Error("--peer-url: only http:// URLs are supported: " + url);
  while (!rest.empty() && rest.back() == '/') rest.pop_back();
  const size_t colon = rest.rfind(':');
  Target t;
  t.openai = true;
  t.host = colon == std::string::npos ? rest : rest.substr(0, colon);
  try {
    t.port = colon == std::string::npos ? 80 : std::stoi(rest.substr(colon + 1));
  } catch (const std::exception&) {
    throw Error("--peer-url: expected http://host:port, got " + url);
  }
  if (t.host.empty() || t.port <= 0 || t.port > 65535 || rest.find('/') != std::string::npos)
    throw Error("--peer-url: expected http://host:port, got " + url);
  return t;
}

struct Point {
  int concurrency = 0;
  int requests = 0, errors = 0;
  double seconds = 0, tokens_per_s = 0;
  double ttft_p50 = 0, ttft_p99 = 0, tpot_p50 = 0, tpot_p99 = 0, e2e_p50 = 0, e2e_p99 = 0;
  double prompt_tokens = 0;
  std::string first_error;
};

// Nearest-rank percentile.
double percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t rank = static_cast<size_t>(std::ceil(p * static_cast<double>(v.size())));
  return v[std::min(v.size() - 1, rank == 0 ? 0 : rank - 1)];
}

// Words that are one GPT-2 token each (with their leading space), for prompts of a known length.
std::string prompt_text(int words, int salt) {
  static const char* kWords[] = {"the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with",
                                 "be", "by", "on", "not", "he", "this", "are", "or", "his", "from", "at", "which"};
  std::string s = "Request " + std::to_string(salt) + ":";
  for (int i = 0; i < words; ++i) s += std::string(" ") + kWords[(i * 7 + salt) % 24];
  return s;
}

// One OpenAI streamed completion, reduced to what run_point needs: the arrival times of the chunks
// that carry text (the last chunk, the usage chunk and [DONE] carry none) and whether it stopped
// at max_tokens.
struct OpenAiStream {
  std::vector<double> text_s;
  bool length_stop = false;
  double done_s = 0;
};

OpenAiStream read_openai_stream(const SseTiming& t) {
  OpenAiStream o;
  for (size_t i = 0; i < t.data.size(); ++i) {
    o.done_s = t.event_s[i];
    if (t.data[i] == "[DONE]") continue;
    const json j = json::parse(t.data[i], nullptr, false);
    if (!j.is_object() || !j.contains("choices") || !j["choices"].is_array() || j["choices"].empty()) continue;
    const json& c = j["choices"][0];
    if (c.contains("text") && c["text"].is_string() && !c["text"].get<std::string>().empty()) o.text_s.push_back(t.event_s[i]);
    if (c.contains("finish_reason") && c["finish_reason"].is_string() && c["finish_reason"] == "length") o.length_stop = true;
  }
  return o;
}

// The shared "system prompt" of --shared-prefix-words: the same words for every request.
std::string shared_prefix(const Flags& f) {
  if (f.shared_prefix_words <= 0) return "";
  std::string words = prompt_text(f.shared_prefix_words, 0);
  return "System:" + words.substr(words.find(':') + 1) + "\n";  // without its "Request 0:" label
}

Point run_point(const Target& target, int concurrency, const Flags& f) {
  Point pt;
  pt.concurrency = concurrency;
  std::vector<std::vector<double>> ttft(static_cast<size_t>(concurrency)), tpot(static_cast<size_t>(concurrency)),
      e2e(static_cast<size_t>(concurrency));
  std::vector<double> prompt_tokens(static_cast<size_t>(concurrency), 0);
  std::atomic<int> errors{0}, generated{0};
  std::string first_error;
  std::mutex err_mu;
  const auto start = std::chrono::steady_clock::now();
  std::vector<std::thread> clients;
  for (int c = 0; c < concurrency; ++c)
    clients.emplace_back([&, c] {
      HttpClient client(target.host, target.port);
      std::string conversation = shared_prefix(f);  // --chat: grows by each turn and its reply
      for (int r = 0; r < f.rounds; ++r) {
        const std::string turn = prompt_text(f.prompt_words, c * f.rounds + r);
        const std::string inputs = f.chat ? conversation + "\nUser: " + turn + "\nAssistant:" : shared_prefix(f) + turn;
        if (target.openai) {
          // Greedy, a fixed output length: the same work for any OpenAI-compatible server.
          const json body = {{"prompt", inputs}, {"max_tokens", f.new_tokens},
                             {"temperature", 0.0}, {"ignore_eos", true}, {"stream", true}};
          const SseTiming t = client.post_sse("/v1/completions", body.dump());
          const OpenAiStream o = read_openai_stream(t);
          if (t.status != 200 || o.text_s.empty() || !o.length_stop) {
            ++errors;
            std::lock_guard lk(err_mu);
            if (first_error.empty()) first_error = std::to_string(t.status) + " " + t.error + (o.length_stop ? "" : " (did not stop at max_tokens)");
            continue;
          }
          // Text chunks can merge tokens (an incomplete UTF-8 character waits for the next one);
          // the output length is max_tokens either way.
          generated += f.new_tokens;
          ttft[static_cast<size_t>(c)].push_back(o.text_s.front());
          tpot[static_cast<size_t>(c)].push_back((o.done_s - o.text_s.front()) / std::max(1, f.new_tokens - 1));
          e2e[static_cast<size_t>(c)].push_back(o.done_s);
          continue;
        }
        const json body = {{"inputs", inputs},
                           {"parameters", {{"max_new_tokens", f.new_tokens}, {"ignore_eos", true}}}};
        const SseTiming t = client.post_sse("/generate_stream", body.dump());
        if (t.status != 200 || static_cast<int>(t.event_s.size()) != f.new_tokens) {
          ++errors;
          std::lock_guard lk(err_mu);
          if (first_error.empty()) first_error = std::to_string(t.status) + " " + t.error;
          continue;
        }
        generated += static_cast<int>(t.event_s.size());
        ttft[static_cast<size_t>(c)].push_back(t.event_s.front());
        e2e[static_cast<size_t>(c)].push_back(t.event_s.back());
        if (t.event_s.size() > 1)
          tpot[static_cast<size_t>(c)].push_back((t.event_s.back() - t.event_s.front()) / static_cast<double>(t.event_s.size() - 1));
        const json last = json::parse(t.data.back(), nullptr, false);
        if (last.is_object() && last["details"].is_object()) prompt_tokens[static_cast<size_t>(c)] = last["details"]["input_length"].get<double>();
        if (f.chat && last.is_object() && last["generated_text"].is_string())
          conversation = inputs + last["generated_text"].get<std::string>();
      }
    });
  for (auto& t : clients) t.join();
  pt.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::vector<double> all_ttft, all_tpot, all_e2e;
  for (auto& v : ttft) all_ttft.insert(all_ttft.end(), v.begin(), v.end());
  for (auto& v : tpot) all_tpot.insert(all_tpot.end(), v.begin(), v.end());
  for (auto& v : e2e) all_e2e.insert(all_e2e.end(), v.begin(), v.end());
  pt.e2e_p50 = percentile(all_e2e, 0.5);
  pt.e2e_p99 = percentile(all_e2e, 0.99);
  pt.requests = concurrency * f.rounds;
  pt.errors = errors;
  pt.first_error = first_error;
  pt.tokens_per_s = generated / pt.seconds;
  pt.ttft_p50 = percentile(all_ttft, 0.5);
  pt.ttft_p99 = percentile(all_ttft, 0.99);
  pt.tpot_p50 = percentile(all_tpot, 0.5);
  pt.tpot_p99 = percentile(all_tpot, 0.99);
  pt.prompt_tokens = *std::max_element(prompt_tokens.begin(), prompt_tokens.end());
  return pt;
}

// One sweep over f.concurrency against FineServe serving `model` (max_seqs sequences per step);
// with a peer, each point is followed by the same point against the peer (into *peer_points).
std::vector<Point> sweep(const fs::path& model, int max_seqs, const Flags& f, std::vector<Point>* peer_points = nullptr,
                         bool prefix_caching = true) {
  ServeOptions o = default_serve_options();
  o.model = model.string();
  o.http.host = "127.0.0.1";
  o.http.port = 0;
  o.http.threads = std::max(64, 2 * *std::max_element(f.concurrency.begin(), f.concurrency.end()));
  o.engine.max_seqs = max_seqs;
  o.engine.max_batch_tokens = f.max_batch_tokens;
  o.engine.prefix_caching = prefix_caching;
  o.kv_cache_mb = f.kv_cache_mb;
  o.loop.max_queue = 1 << 20;
  o.loop.request_timeout_s = 0;
  ServingStack stack(o);
  stack.load();
  // Warm-up: one request (first-touch of the weights and the KV cache).
  HttpClient(std::string("127.0.0.1"), stack.port()).post_sse("/generate_stream",
      json{{"inputs", shared_prefix(f) + prompt_text(f.prompt_words, 0)}, {"parameters", {{"max_new_tokens", 4}, {"ignore_eos", true}}}}.dump());
  Target self;
  self.port = stack.port();
  self.openai = peer_points != nullptr;
  const Target peer = peer_points ? parse_peer_url(f.peer_url) : Target{};
  if (peer_points)  // the peer's warm-up
    HttpClient(peer.host, peer.port).post_sse("/v1/completions",
        json{{"prompt", shared_prefix(f) + prompt_text(f.prompt_words, 0)}, {"max_tokens", 4}, {"ignore_eos", true}, {"stream", true}}.dump());
  std::vector<Point> points;
  auto report = [](const std::string& who, const Point& p) {
    std::printf("  %-10s concurrency %2d: %7.1f tokens/s  TTFT p50 %.3f s  TPOT p50 %.4f s  e2e p99 %.2f s  (%d requests, %d errors, %.1f s)\n",
                who.c_str(), p.concurrency, p.tokens_per_s, p.ttft_p50, p.tpot_p50, p.e2e_p99, p.requests, p.errors, p.seconds);
    if (p.errors) std::printf("    first error: %s\n", p.first_error.c_str());
    std::fflush(stdout);
  };
  for (int c : f.concurrency) {
    Point p = run_point(self, c, f);
    report("max_seqs " + std::to_string(max_seqs), p);
    points.push_back(p);
    if (peer_points) {
      Point q = run_point(peer, c, f);
      report(f.peer_name, q);
      peer_points->push_back(q);
    }
  }
  stack.drain();
  return points;
}

fs::path synthetic_model(const Flags& f) {
  const fs::path work = f.work.empty() ? fs::temp_directory_path() / "fineserve-bench-serve" : fs::path(f.work);
  fs::create_directories(work);
  const fs::path dense = work / f.synthetic;
  if (!fs::exists(dense / "config.json")) {
    std::printf("writing synthetic %s ...\n", f.synthetic.c_str());
    SynthOptions so;
    so.config = fs::path("configs/models") / (f.synthetic + ".json");
    so.out = dense;
    so.overwrite = true;
    write_synthetic_opt(so);
  }
  for (const char* file : {"vocab.json", "merges.txt"}) {
    const fs::path src = fs::path(f.tokenizer) / file;
    if (!fs::exists(src)) throw Error("the benchmark's tokenizer file " + src.string() + " is missing (--tokenizer)");
    if (!fs::exists(dense / file)) fs::copy_file(src, dense / file);
  }
  if (f.bits == 16) return dense;
  const fs::path q = work / (f.synthetic + "-int" + std::to_string(f.bits));
  if (!fs::exists(q / "config.json")) {
    std::printf("quantizing to FineQuant int%d ...\n", f.bits);
    quant::ConvertOptions o;
    o.model = dense;
    o.out = q;
    o.group.bits = f.bits;
    o.keep = quant::default_keep_patterns();
    o.overwrite = true;
    quant::convert_checkpoint(o);
  }
  return q;
}

// "dir" for "/some/where/dir" and "/some/where/dir/".
std::string folder_name(const fs::path& p) {
  const fs::path n = fs::absolute(p).lexically_normal();
  return n.has_filename() ? n.filename().string() : n.parent_path().filename().string();
}

json to_json(const Point& p) {
  return {{"concurrency", p.concurrency}, {"requests", p.requests}, {"errors", p.errors}, {"seconds", p.seconds},
          {"tokens_per_s", p.tokens_per_s}, {"ttft_p50_s", p.ttft_p50}, {"ttft_p99_s", p.ttft_p99},
          {"tpot_p50_s", p.tpot_p50}, {"tpot_p99_s", p.tpot_p99}, {"e2e_p50_s", p.e2e_p50}, {"e2e_p99_s", p.e2e_p99}};
}

void setup(CLI::App& group) {
  auto f = std::make_shared<Flags>();
  CLI::App* cmd = group.add_subcommand("serve", "Serving throughput and latency over loopback HTTP vs concurrency, "
                                                "continuous batching vs one sequence per step");
  cmd->add_option("--model", f->model, "Checkpoint to serve (default: a synthetic OPT, see --synthetic)");
  cmd->add_option("--synthetic", f->synthetic, "configs/models/<name>.json for the synthetic model");
  cmd->add_option("--bits", f->bits, "Synthetic model weights: 16 (dense), 8 or 4 (FineQuant)")->check(CLI::IsMember({4, 8, 16}));
  cmd->add_option("--tokenizer", f->tokenizer, "Folder with vocab.json and merges.txt for the synthetic model");
  cmd->add_option("--concurrency", f->concurrency, "Client counts to sweep")->check(CLI::PositiveNumber);
  cmd->add_option("--rounds", f->rounds, "Requests per client per point")->check(CLI::PositiveNumber);
  cmd->add_option("--prompt-words", f->prompt_words, "Prompt length in words (about one token each)")->check(CLI::PositiveNumber);
  cmd->add_option("--new-tokens", f->new_tokens, "Generated tokens per request")->check(CLI::PositiveNumber);
  cmd->add_option("--kv-cache-mb", f->kv_cache_mb)->check(CLI::PositiveNumber);
  cmd->add_option("--max-batch-tokens", f->max_batch_tokens)->check(CLI::PositiveNumber);
  cmd->add_option("--work", f->work, "Scratch directory for the synthetic checkpoint (kept for reuse)");
  cmd->add_option("--out", f->out, "JSON result path");
  cmd->add_option("--peer-url", f->peer_url,
                  "Another OpenAI-compatible server (http://host:port) to sweep interleaved with this one, "
                  "both through /v1/completions");
  cmd->add_option("--peer-name", f->peer_name, "The peer's name in the table and JSON (e.g. llama-server)");
  cmd->add_option("--shared-prefix-words", f->shared_prefix_words, "Start every prompt with the same system prompt of this many words")->check(CLI::NonNegativeNumber);
  cmd->add_flag("--chat", f->chat, "Each client's rounds are the turns of one conversation (prompt = the conversation so far)");
  cmd->add_flag("--compare-prefix-caching", f->compare_prefix_caching, "Baseline: prefix caching off at the same max_seqs (instead of one sequence per step)");
  cmd->callback([f] {
    if (f->chat && !f->peer_url.empty())
      throw Error("--chat replays /generate_stream conversations; it does not combine with --peer-url yet");
    // Written on a short-lived thread: the served engine's OpenMP pool must be the process's only
    // one (kernels/cpu/omp_threads.h).
    fs::path model = f->model;
    if (model.empty()) cpu::run_on_short_lived_thread([&] { model = synthetic_model(*f); });
    const int max_c = *std::max_element(f->concurrency.begin(), f->concurrency.end());
    // Other processes on the machine skew the figures: record how busy it was.
    double load_at_start = -1;
    if (std::FILE* la = std::fopen("/proc/loadavg", "r")) {
      if (std::fscanf(la, "%lf", &load_at_start) != 1) load_at_start = -1;
      std::fclose(la);
    }
    std::printf("serving %s: %d-word prompts, %d new tokens, %d requests per client per point, %u hardware threads\n",
                model.string().c_str(), f->prompt_words, f->new_tokens, f->rounds, std::thread::hardware_concurrency());
    // The model as a description, not a path of this machine.
    const std::string model_name =
        f->model.empty() ? "synthetic " + f->synthetic + " (configs/models/" + f->synthetic + ".json, Gaussian weights), " +
                               (f->bits == 16 ? std::string("fp16") : "FineQuant int" + std::to_string(f->bits)) +
                               ", GPT-2 tokenizer"
                         : folder_name(model);
    if (!f->peer_url.empty()) {
      std::vector<Point> peer;
      const std::vector<Point> ours = sweep(model, max_c, *f, &peer);
      Table table({"clients", "tok/s", "TTFT p50", "TPOT p50", "e2e p99", f->peer_name + " tok/s",
                   f->peer_name + " TTFT p50", f->peer_name + " TPOT p50", f->peer_name + " e2e p99", "tok/s ratio",
                   "e2e p99 ratio"});
      json rows = json::array();
      for (size_t i = 0; i < ours.size(); ++i) {
        const Point& a = ours[i];
        const Point& b = peer[i];
        const double ratio = b.tokens_per_s > 0 ? a.tokens_per_s / b.tokens_per_s : 0;
        const double e2e_ratio = b.e2e_p99 > 0 ? a.e2e_p99 / b.e2e_p99 : 0;
        table.add_row({std::to_string(a.concurrency), fmt(a.tokens_per_s, 1), fmt(a.ttft_p50, 3),
                       fmt(a.tpot_p50 * 1e3, 1) + " ms", fmt(a.e2e_p99, 2), fmt(b.tokens_per_s, 1), fmt(b.ttft_p50, 3),
                       fmt(b.tpot_p50 * 1e3, 1) + " ms", fmt(b.e2e_p99, 2), fmt(ratio) + "x", fmt(e2e_ratio) + "x"});
        rows.push_back({{"concurrency", a.concurrency}, {"fineserve", to_json(a)}, {"peer", to_json(b)},
                        {"tokens_per_s_ratio", ratio}, {"e2e_p99_ratio", e2e_ratio}});
      }
      std::printf("\n");
      table.print();
      write_result(f->out, "serve_load_vs_peer", cpu_name(),
                   {{"model", model_name}, {"peer", f->peer_name}, {"api", "/v1/completions, stream, temperature 0, ignore_eos"},
                    {"load_average_1m_at_start", load_at_start}, {"prompt_words", f->prompt_words},
                    {"new_tokens", f->new_tokens}, {"rounds", f->rounds}, {"max_batch_tokens", f->max_batch_tokens},
                    {"batched_max_seqs", max_c}, {"hardware_threads", std::thread::hardware_concurrency()},
                    {"points", rows}});
      return;
    }
    const std::vector<Point> batched = sweep(model, max_c, *f);
    const bool vs_off = f->compare_prefix_caching;  // the baseline: caching off, else one sequence per step
    const std::vector<Point> single = vs_off ? sweep(model, max_c, *f, nullptr, false) : sweep(model, 1, *f);
    const std::string base = vs_off ? "no-cache " : "1-seq ";

    Table table({"clients", "tok/s", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99", base + "tok/s", base + "TTFT p50",
                 base + "TPOT p50", "speedup", "TPOT p99 / c1"});
    json rows = json::array();
    for (size_t i = 0; i < batched.size(); ++i) {
      const Point& b = batched[i];
      const Point& s = single[i];
      const double speedup = s.tokens_per_s > 0 ? b.tokens_per_s / s.tokens_per_s : 0;
      const double tpot_ratio = batched[0].tpot_p50 > 0 ? b.tpot_p99 / batched[0].tpot_p50 : 0;
      table.add_row({std::to_string(b.concurrency), fmt(b.tokens_per_s, 1), fmt(b.ttft_p50, 3), fmt(b.ttft_p99, 3),
                     fmt(b.tpot_p50 * 1e3, 1) + " ms", fmt(b.tpot_p99 * 1e3, 1) + " ms", fmt(s.tokens_per_s, 1),
                     fmt(s.ttft_p50, 3), fmt(s.tpot_p50 * 1e3, 1) + " ms", fmt(speedup) + "x", fmt(tpot_ratio) + "x"});
      rows.push_back({{"concurrency", b.concurrency}, {"batched", to_json(b)}, {vs_off ? "prefix_caching_off" : "one_seq", to_json(s)},
                      {"speedup_tokens_per_s", speedup}, {"tpot_p99_over_c1_tpot_p50", tpot_ratio}});
      if (vs_off) rows.back()["ttft_p50_off_over_on"] = b.ttft_p50 > 0 ? s.ttft_p50 / b.ttft_p50 : 0;
    }
    std::printf("\n");
    table.print();
    if (vs_off)
      for (const json& r : rows)
        std::printf("clients %d: p50 TTFT without / with prefix caching: %.2fx\n", r["concurrency"].get<int>(),
                    r["ttft_p50_off_over_on"].get<double>());
    write_result(f->out, "serve_load", cpu_name(),
                 {{"model", model_name}, {"load_average_1m_at_start", load_at_start}, {"prompt_tokens", batched.empty() ? 0.0 : batched[0].prompt_tokens},
                  {"new_tokens", f->new_tokens}, {"rounds", f->rounds}, {"max_batch_tokens", f->max_batch_tokens},
                  {"batched_max_seqs", max_c}, {"hardware_threads", std::thread::hardware_concurrency()},
                  {"shared_prefix_words", f->shared_prefix_words}, {"chat", f->chat},
                  {"baseline", vs_off ? "prefix caching off" : "max_seqs 1"}, {"points", rows}});
  });
}

const Registrar registrar(setup);

}  // namespace
}  // namespace fineserve::bench
