// `fineserve serve` as a library: the server's options (defaults from configs/server.json,
// overridden by flags) and the stack it runs: model, engine, engine thread, HTTP server.
#pragma once

#include <chrono>
#include <filesystem>
#include <memory>
#include <string>

#include <nlohmann/json.hpp>

#include "engine/engine.h"
#include "server/engine_loop.h"
#include "server/http_server.h"

namespace fineserve {

class Metrics;

struct ServeOptions {
  std::string model;              // checkpoint directory
  std::string served_model_name;  // "" -> the checkpoint directory's name
  std::string device = "cpu";
  double kv_cache_mb = 256;       // KV-cache budget (the engine derives its block count)
  double drain_timeout_s = 30;    // SIGTERM: how long in-flight requests may take to finish
  std::string chat_template;      // --chat-template FILE; "": the checkpoint's (server/chat_template.h)
  // Tensor parallelism (engine/tp.h). tp > 1 on the CPU: ranks are threads of this process. On
  // cuda: one process per GPU; this process is rank 0, listens on `coordinator` (HOST:PORT; empty:
  // 127.0.0.1, any port) and, when spawn_tp_ranks, starts ranks 1..tp-1 of this node itself.
  int tp = 1;
  std::string coordinator;
  bool spawn_tp_ranks = true;
  double tp_timeout_s = 120;      // a collective, or the bootstrap, waiting for the other ranks
  bool vllm_metrics = false;      // also expose /metrics under vLLM's names (vllm:...)
  std::string api_key_file;       // a file holding the API key (HttpConfig::api_key), read at start
  HttpConfig http;
  EngineConfig engine;
  LoopConfig loop;
};

// The built-in defaults, which configs/server.json restates.
ServeOptions default_serve_options();

// Applies a server config (the JSON object of configs/server.json) over `options`. Every key is
// optional; an unknown key or a value of the wrong type or range throws fineserve::Error naming
// `source` and the key.
void apply_server_config(const nlohmann::json& config, const std::string& source, ServeOptions& options);
// Reads and applies a config file. Throws fineserve::Error when it is unreadable or invalid.
void load_server_config(const std::filesystem::path& path, ServeOptions& options);

// The API key from api_key_file when set (its first line, surrounding whitespace dropped). Throws
// fineserve::Error when the file cannot be read or holds no key.
void resolve_api_key(ServeOptions& options);

// The model id clients use: served_model_name, else the checkpoint folder's name.
std::string served_model_name(const ServeOptions& options);

// Model + engine + engine thread + HTTP server, in the order they must start and stop.
//
//   ServingStack stack(options);   // binds and listens: /health 200, /ready 503
//   stack.load();                  // loads the model, starts the engine thread: /ready 200
//   stack.drain();                 // /ready 503, in-flight requests finish (drain_timeout_s)
//   stack.stop();                  // (also done by the destructor)
class ServingStack {
 public:
  explicit ServingStack(const ServeOptions& options);
  ~ServingStack();
  ServingStack(const ServingStack&) = delete;
  ServingStack& operator=(const ServingStack&) = delete;

  void load();
  bool drain();
  void stop();

  int port() const { return http_->port(); }
  HttpServer& http() { return *http_; }
  EngineLoop* loop() { return loop_.get(); }
  Metrics& metrics() { return *metrics_; }
  const ServeOptions& options() const { return options_; }

 private:
  ServeOptions options_;
  // Declared in construction order; destroyed in reverse, so the HTTP server stops first.
  std::unique_ptr<Metrics> metrics_;
  std::unique_ptr<Backend> backend_;
  std::unique_ptr<Tokenizer> tokenizer_;
  std::unique_ptr<Model> model_;
  std::unique_ptr<Engine> engine_;
  std::unique_ptr<EngineLoop> loop_;
  std::unique_ptr<HttpServer> http_;
};

}  // namespace fineserve
