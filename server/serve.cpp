#include "server/serve.h"

#include <cctype>
#include <cstdlib>
#include <ctime>
#include <fstream>
#include <functional>
#include <map>

#include <spdlog/spdlog.h>

#include "engine/tp.h"
#include "engine/tp_launch.h"
#include "kernels/cpu/omp_threads.h"
#include "kernels/base.h"
#include "models/model.h"
#include "models/tokenizer/tokenizer.h"
#include "server/commands.h"
#include "server/metrics.h"

namespace fineserve {

using json = nlohmann::json;

ServeOptions default_serve_options() { return ServeOptions{}; }

namespace {

double number_in(const json& v, const std::string& where, double lo, double hi) {
  if (!v.is_number()) throw Error(where + " must be a number");
  const double d = v.get<double>();
  if (!(d >= lo && d <= hi)) throw Error(where + " must be in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
  return d;
}

int64_t integer_in(const json& v, const std::string& where, int64_t lo, int64_t hi) {
  if (!v.is_number_integer()) throw Error(where + " must be an integer");
  if (v.is_number_unsigned() && v.get<uint64_t>() > static_cast<uint64_t>(hi))
    throw Error(where + " must be in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
  const int64_t i = v.get<int64_t>();
  if (i < lo || i > hi) throw Error(where + " must be in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
  return i;
}

std::string string_of(const json& v, const std::string& where) {
  if (!v.is_string()) throw Error(where + " must be a string");
  return v.get<std::string>();
}

// Rank 0 of a tensor-parallel group (the TpModel owns the ranks' backends).
std::unique_ptr<Model> load_tp_model(const ServeOptions& o) {
  const auto timeout = std::chrono::milliseconds(static_cast<int64_t>(o.tp_timeout_s * 1000));
  if (o.device == "cpu") return load_model_tp_cpu(o.model, o.tp, timeout);
  TpProcessOptions p;
  p.world = o.tp;
  p.rank = 0;
  p.coordinator = o.coordinator;
  p.collective_timeout = timeout;
  p.net.connect_timeout = timeout;
  p.device_index = parse_device(o.device).index;  // cmd_serve: --local-rank, else GPU 0
  const std::string device = o.device;
  p.make_backend = [device] { return make_backend(device); };
  if (o.spawn_tp_ranks) {
    std::ifstream in("/proc/self/cmdline", std::ios::binary);
    for (std::string arg; std::getline(in, arg, '\0');) p.spawn_argv.push_back(arg);
  }
  p.on_lost = [](const std::string& why) {
    spdlog::critical("{}; the tensor-parallel group cannot continue, exiting", why);
    spdlog::shutdown();
    std::_Exit(1);
  };
  return launch_tp_rank0(o.model, p);
}

}  // namespace

void apply_server_config(const json& config, const std::string& source, ServeOptions& o) {
  if (!config.is_object()) throw Error(source + ": the server config must be a JSON object");
  constexpr int64_t kIntMax = 1 << 30;
  using Setter = std::function<void(const json&, const std::string&)>;
  const std::map<std::string, Setter> setters = {
      {"host", [&](const json& v, const std::string& w) { o.http.host = string_of(v, w); }},
      {"port", [&](const json& v, const std::string& w) { o.http.port = static_cast<int>(integer_in(v, w, 0, 65535)); }},
      {"device", [&](const json& v, const std::string& w) { o.device = string_of(v, w); }},
      {"served_model_name", [&](const json& v, const std::string& w) { o.served_model_name = string_of(v, w); }},
      {"max_batch_tokens", [&](const json& v, const std::string& w) { o.engine.max_batch_tokens = static_cast<int>(integer_in(v, w, 1, kIntMax)); }},
      {"max_seqs", [&](const json& v, const std::string& w) { o.engine.max_seqs = static_cast<int>(integer_in(v, w, 1, kIntMax)); }},
      {"block_size", [&](const json& v, const std::string& w) { o.engine.block_size = static_cast<int>(integer_in(v, w, 1, 1024)); }},
      {"kv_cache_mb", [&](const json& v, const std::string& w) { o.kv_cache_mb = number_in(v, w, 1e-3, 1 << 24); }},
      {"max_queue", [&](const json& v, const std::string& w) { o.loop.max_queue = static_cast<int>(integer_in(v, w, 1, kIntMax)); }},
      {"request_timeout_s", [&](const json& v, const std::string& w) { o.loop.request_timeout_s = number_in(v, w, 0, 1e9); }},
      {"drain_timeout_s", [&](const json& v, const std::string& w) { o.drain_timeout_s = number_in(v, w, 0, 1e9); }},
      {"max_body_bytes", [&](const json& v, const std::string& w) { o.http.max_body_bytes = static_cast<size_t>(integer_in(v, w, 1, kIntMax)); }},
      {"http_threads", [&](const json& v, const std::string& w) { o.http.threads = static_cast<int>(integer_in(v, w, 2, 65536)); }},
      {"heartbeat_s", [&](const json& v, const std::string& w) { o.http.heartbeat_s = number_in(v, w, 1e-3, 3600); }},
      {"default_max_new_tokens", [&](const json& v, const std::string& w) { o.http.default_max_new_tokens = static_cast<int>(integer_in(v, w, 1, kIntMax)); }},
      {"max_stop_sequences", [&](const json& v, const std::string& w) { o.http.max_stop_sequences = static_cast<int>(integer_in(v, w, 0, 1024)); }},
      {"max_connections", [&](const json& v, const std::string& w) { o.http.max_connections = static_cast<int>(integer_in(v, w, 1, 1 << 20)); }},
      {"keepalive_timeout_s", [&](const json& v, const std::string& w) { o.http.keepalive_timeout_s = number_in(v, w, 1e-3, 3600); }},
      {"header_timeout_s", [&](const json& v, const std::string& w) { o.http.header_timeout_s = number_in(v, w, 1e-3, 3600); }},
      {"body_timeout_s", [&](const json& v, const std::string& w) { o.http.body_timeout_s = number_in(v, w, 1e-3, 3600); }},
      {"probe_threads", [&](const json& v, const std::string& w) { o.http.probe_threads = static_cast<int>(integer_in(v, w, 1, 64)); }},
      {"prompt_special_tokens", [&](const json& v, const std::string& w) {
         if (!v.is_boolean()) throw Error(w + " must be true or false");
         o.http.prompt_special_tokens = v.get<bool>();
       }},
      {"api_key_file", [&](const json& v, const std::string& w) { o.api_key_file = string_of(v, w); }},
      {"cors_allow_origin", [&](const json& v, const std::string& w) { o.http.cors_allow_origin = string_of(v, w); }},
      {"access_log", [&](const json& v, const std::string& w) {
         if (!v.is_boolean()) throw Error(w + " must be true or false");
         o.http.access_log = v.get<bool>();
       }},
      {"vllm_metrics", [&](const json& v, const std::string& w) {
         if (!v.is_boolean()) throw Error(w + " must be true or false");
         o.vllm_metrics = v.get<bool>();
       }},
      {"prefix_caching", [&](const json& v, const std::string& w) {
         if (!v.is_boolean()) throw Error(w + " must be true or false");
         o.engine.prefix_caching = v.get<bool>();
       }},
  };
  for (auto it = config.begin(); it != config.end(); ++it) {
    if (it.key().rfind("_comment", 0) == 0) continue;  // documentation keys
    auto s = setters.find(it.key());
    if (s == setters.end()) throw Error(source + ": unknown key '" + it.key() + "'");
    s->second(it.value(), source + ": '" + it.key() + "'");
  }
}

void load_server_config(const std::filesystem::path& path, ServeOptions& options) {
  std::ifstream in(path);
  if (!in) throw Error("cannot read the server config " + path.string());
  json j = json::parse(in, nullptr, /*allow_exceptions=*/false, /*ignore_comments=*/true);
  if (j.is_discarded()) throw Error(path.string() + " is not valid JSON");
  apply_server_config(j, path.string(), options);
}

void resolve_api_key(ServeOptions& o) {
  if (o.api_key_file.empty()) return;
  std::ifstream in(o.api_key_file);
  if (!in) throw Error("cannot read the API key file " + o.api_key_file);
  std::string key;
  std::getline(in, key);
  while (!key.empty() && std::isspace(static_cast<unsigned char>(key.back()))) key.pop_back();
  while (!key.empty() && std::isspace(static_cast<unsigned char>(key.front()))) key.erase(0, 1);
  if (key.empty()) throw Error("the API key file " + o.api_key_file + " holds no key");
  o.http.api_key = key;
}

std::string served_model_name(const ServeOptions& o) {
  if (!o.served_model_name.empty()) return o.served_model_name;
  const std::filesystem::path dir = std::filesystem::absolute(o.model).lexically_normal();
  std::string name = dir.filename().string();
  if (name.empty()) name = dir.parent_path().filename().string();
  return name;
}

// ---- ServingStack -------------------------------------------------------------------------------

ServingStack::ServingStack(const ServeOptions& options) : options_(options) {
  metrics_ = std::make_unique<Metrics>(MetricsOptions{options_.model.empty() ? "" : served_model_name(options_), options_.vllm_metrics});
  http_ = std::make_unique<HttpServer>(options_.http, *metrics_);
  http_->bind();
  http_->start();
}

ServingStack::~ServingStack() { stop(); }

void ServingStack::load() {
  FS_ASSERT(!loop_, "load() once");
  if (options_.model.empty()) throw Error("no model to serve (--model)");
  const std::filesystem::path dir(options_.model);
  tokenizer_ = load_tokenizer(dir);
  // Before the weights, so that a template that does not parse fails fast.
  auto chat = std::make_shared<const ChatFormat>(load_chat_format(dir, options_.chat_template));
  spdlog::info("chat template: {}", chat->origin);
  if (options_.tp > 1) {
    model_ = load_tp_model(options_);
  } else {
    backend_ = make_backend(options_.device);
    // The engine thread must own the process's only OpenMP pool (kernels/cpu/omp_threads.h).
    cpu::run_on_short_lived_thread([&] { model_ = load_model(dir, *backend_); });
  }
  EngineConfig ec = options_.engine;
  ec.kv_cache_bytes = static_cast<uint64_t>(options_.kv_cache_mb * (1 << 20));
  engine_ = std::make_unique<Engine>(*model_, tokenizer_.get(), ec);
  loop_ = std::make_unique<EngineLoop>(*engine_, options_.loop, metrics_.get());

  ModelCard card;
  card.name = served_model_name(options_);
  card.path = options_.model;
  // The GPU by name (e.g. "cuda:0 (NVIDIA H100 80GB HBM3)"); the CPU and TP groups as configured.
  card.device = backend_ && parse_device(options_.device).cuda ? backend_->name() : options_.device;
  card.tp_size = options_.tp;
  card.info = model_->info();
  metrics_->set_model_info(card.name, card.info);
  card.engine = engine_->config();
  card.loop = options_.loop;
  card.created = static_cast<int64_t>(std::time(nullptr));
  card.chat = std::move(chat);
  http_->attach(*loop_, *tokenizer_, card);
}

bool ServingStack::drain() {
  return http_->drain(std::chrono::duration<double>(options_.drain_timeout_s));
}

void ServingStack::stop() {
  if (http_) http_->stop();
}

}  // namespace fineserve
