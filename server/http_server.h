// The HTTP server (cpp-httplib): routes, request validation, streaming and metrics over an
// EngineLoop. It listens before the model is loaded (/health answers, /ready says 503) and serves
// the generation routes once attach() hands it the loop.
//
//   HttpServer http(config, metrics);
//   int port = http.bind();                // config.port, or any free port when it is 0
//   http.start();                          // serves on its own threads
//   http.attach(loop, tokenizer, card);    // /ready -> 200
//   ...
//   http.drain(30s);                       // /ready -> 503, new requests 503, in-flight ones finish
//   http.stop();
//
// Routes: POST /generate, /generate_stream, /v1/completions, /v1/chat/completions;
// GET /v1/models, /health, /ready, /info, /metrics (docs/api.md). Connections are handled by
// server/http_connections.h (limits, deadlines, threads reserved for the probes).
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

#include "engine/engine.h"
#include "server/chat_template.h"
#include "server/engine_loop.h"
#include "server/http_connections.h"

namespace fineserve {

class Metrics;
class Tokenizer;

struct HttpConfig {
  std::string host = "127.0.0.1";
  int port = 8080;                  // 0: any free port (see bind())
  size_t max_body_bytes = 1 << 20;  // larger request bodies -> 413
  int threads = 256;                // HTTP worker threads; a request being answered holds one
  double heartbeat_s = 1.0;         // an idle response is probed this often to notice a gone client
  int default_max_new_tokens = 100;  // TGI routes without max_new_tokens
  int max_stop_sequences = 4;
  // Connections (server/http_connections.h): a bounded number, total deadlines on a request's
  // head and body, an idle timeout between requests, and threads reserved for the probes.
  int max_connections = 1024;
  double keepalive_timeout_s = 5;
  double header_timeout_s = 10;
  double body_timeout_s = 30;
  int probe_threads = 2;
  // Raw prompts (/generate, /v1/completions, /tokenize): special-token text such as "<|im_end|>"
  // becomes the special token, as in vLLM and TGI. false: it is tokenized as plain text. Chat
  // message content is always plain text.
  bool prompt_special_tokens = true;
  // Operations.
  std::string api_key;           // non-empty: generation routes need "Authorization: Bearer KEY"
  std::string cors_allow_origin;  // non-empty: CORS headers for this origin ("*": any); off by default
  bool access_log = true;        // one JSON line per request (probes at debug level)
};

// What /info, /v1/models and the OpenAI routes say about the served model.
struct ModelCard {
  std::string name;    // the model id clients use ("model" in OpenAI requests)
  std::string path;    // the checkpoint it came from
  std::string device;  // "cpu", "cuda"
  int tp_size = 1;      // tensor-parallel ranks
  ModelInfo info;
  EngineConfig engine;  // as the engine resolved it (num_blocks filled in)
  LoopConfig loop;
  int64_t created = 0;  // unix seconds
  std::shared_ptr<const ChatFormat> chat;  // nullptr: the built-in ChatML template
};

class HttpServer {
 public:
  HttpServer(const HttpConfig& config, Metrics& metrics);
  ~HttpServer();  // stop()
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  // Binds config.host:config.port; returns the port. Throws fineserve::Error when it cannot.
  int bind();
  // Serves on a background thread (call bind() first).
  void start();
  // The model is loaded: generation routes open and /ready turns 200. loop and tokenizer must
  // outlive the server (or stop() must come first).
  void attach(EngineLoop& loop, const Tokenizer& tokenizer, const ModelCard& card);
  // Graceful shutdown: /ready -> 503 and new requests -> 503 at once; waits up to `timeout` for
  // the responses in flight to finish, then ends the rest (their clients get an error event or
  // body). Returns true when everything finished in time.
  bool drain(std::chrono::duration<double> timeout);
  // Stops listening and waits for the worker threads. Idempotent.
  void stop();

  int port() const;
  bool ready() const;
  // Generation responses being written now.
  int open_responses() const;
  // Connection counters (server/http_connections.h).
  ConnectionStats connection_stats() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace fineserve
