// A real FineServe HTTP server on loopback (ephemeral port) over the golden tiny OPT, for the
// server tests, and small HTTP client helpers.
#pragma once

#include <gtest/gtest.h>
#include <httplib.h>

#include <atomic>
#include <chrono>
#include <stdexcept>
#include <condition_variable>
#include <filesystem>
#include <memory>
#include <mutex>
#include <functional>
#include <regex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "engine/engine.h"
#include "kernels/backend.h"
#include "models/model.h"
#include "models/tokenizer/tokenizer.h"
#include "server/commands.h"
#include "server/engine_loop.h"
#include "server/http_server.h"
#include "server/metrics.h"
#include "server/sse.h"

namespace fineserve::testing {

inline const std::filesystem::path kModelDir = std::filesystem::path(FINESERVE_TEST_DATA) / "golden" / "opt-preln";

// Wraps a model so that tests control time: forward() waits while the gate is closed, then
// sleeps delay_ms, then runs the real model. Lets a test hold requests in a known state.
class GatedModel : public Model {
 public:
  GatedModel(std::unique_ptr<Model> inner, double delay_ms) : inner_(std::move(inner)), delay_ms_(delay_ms) {}
  const ModelInfo& info() const override { return inner_->info(); }
  void allocate_kv_cache(int num_blocks, int block_size) override { inner_->allocate_kv_cache(num_blocks, block_size); }
  uint64_t kv_block_bytes(int block_size) const override { return inner_->kv_block_bytes(block_size); }
  void forward(const StepInput& step, float* logits) override {
    {
      std::unique_lock lk(mu_);
      ++waiting_;
      cv_.notify_all();
      cv_.wait(lk, [&] { return open_; });
      --waiting_;
    }
    if (delay_ms_ > 0) std::this_thread::sleep_for(std::chrono::duration<double, std::milli>(delay_ms_));
    if (fail_forwards > 0) {
      --fail_forwards;
      throw std::runtime_error("injected forward failure");
    }
    inner_->forward(step, logits);
  }
  std::atomic<int> fail_forwards{0};  // the next this many forward() calls throw
  void set_open(bool open) {
    std::lock_guard lk(mu_);
    open_ = open;
    cv_.notify_all();
  }
  // Waits until a forward() is blocked at the closed gate.
  bool wait_blocked(std::chrono::seconds timeout = std::chrono::seconds(20)) {
    std::unique_lock lk(mu_);
    return cv_.wait_for(lk, timeout, [&] { return waiting_ > 0; });
  }

 private:
  std::unique_ptr<Model> inner_;
  double delay_ms_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool open_ = true;
  int waiting_ = 0;
};

struct TestServerOptions {
  EngineConfig engine;
  LoopConfig loop;
  HttpConfig http;
  double forward_delay_ms = 0;
  bool attach = true;  // false: the server listens without a model (/ready 503)
  MetricsOptions metrics;
  TestServerOptions() {
    http.port = 0;
    http.threads = 96;
    engine.kv_cache_bytes = 16ull << 20;
    loop.max_queue = 256;
  }
};

class TestServer {
 public:
  explicit TestServer(const TestServerOptions& o = TestServerOptions()) : metrics(o.metrics) {
    backend = make_backend("cpu");
    tokenizer = load_tokenizer(kModelDir);
    model = std::make_unique<GatedModel>(load_model(kModelDir, *backend), o.forward_delay_ms);
    engine = std::make_unique<Engine>(*model, tokenizer.get(), o.engine);
    loop = std::make_unique<EngineLoop>(*engine, o.loop, &metrics);
    http = std::make_unique<HttpServer>(o.http, metrics);
    port = http->bind();
    http->start();
    if (o.attach) attach();
  }
  ~TestServer() {
    model->set_open(true);
    http->stop();
  }
  void attach() {
    ModelCard card;
    card.name = "opt-preln";
    card.path = kModelDir.string();
    card.device = "cpu";
    card.info = model->info();
    card.engine = engine->config();
    card.loop = loop->config();
    card.created = 1700000000;
    http->attach(*loop, *tokenizer, card);
  }
  std::unique_ptr<httplib::Client> client(double read_timeout_s = 60) const {
    auto c = std::make_unique<httplib::Client>("127.0.0.1", port);
    c->set_read_timeout(std::chrono::duration<double>(read_timeout_s));
    c->set_connection_timeout(std::chrono::seconds(10));
    return c;
  }

  Metrics metrics;
  std::unique_ptr<Backend> backend;
  std::unique_ptr<Tokenizer> tokenizer;
  std::unique_ptr<GatedModel> model;
  std::unique_ptr<Engine> engine;
  std::unique_ptr<EngineLoop> loop;
  std::unique_ptr<HttpServer> http;
  int port = 0;
};

// A GoogleTest fixture whose tests share one default TestServer, started once per suite (a suite
// derives its own class from this one): for tests that need no special configuration.
class SharedServerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { server_ = std::make_unique<TestServer>(); }
  static void TearDownTestSuite() { server_.reset(); }
  static TestServer& server() { return *server_; }

 private:
  static inline std::unique_ptr<TestServer> server_;
};

struct Reply {
  int status = 0;  // 0: no response (connection failed or cancelled)
  std::string body;
  httplib::Headers headers;
  nlohmann::json json() const { return nlohmann::json::parse(body); }
};

inline Reply post(httplib::Client& c, const std::string& path, const std::string& body) {
  Reply r;
  auto res = c.Post(path, body, "application/json");
  if (!res) {
    r.body = "no response: " + httplib::to_string(res.error());
    return r;
  }
  r.status = res->status;
  r.body = res->body;
  r.headers = res->headers;
  return r;
}
inline Reply post(httplib::Client& c, const std::string& path, const nlohmann::json& body) { return post(c, path, body.dump()); }

inline Reply get(httplib::Client& c, const std::string& path) {
  Reply r;
  auto res = c.Get(path);
  if (!res) return r;
  r.status = res->status;
  r.body = res->body;
  r.headers = res->headers;
  return r;
}

// A streaming POST: SSE events as they arrive. on_event returns false to hang up.
struct StreamReply {
  int status = 0;
  std::vector<SseEvent> events;
  std::string raw;
};
inline StreamReply post_stream(httplib::Client& c, const std::string& path, const nlohmann::json& body,
                               const std::function<bool(const SseEvent&)>& on_event = {}) {
  StreamReply r;
  SseParser parser;
  httplib::Request req;
  req.method = "POST";
  req.path = path;
  req.body = body.dump();
  req.set_header("Content-Type", "application/json");
  req.content_receiver = [&](const char* data, size_t n, uint64_t, uint64_t) {
    r.raw.append(data, n);
    for (SseEvent& e : parser.feed(std::string_view(data, n))) {
      r.events.push_back(e);
      if (on_event && !on_event(r.events.back())) return false;
    }
    return true;
  };
  auto res = c.send(req);
  if (res) r.status = res->status;
  else r.raw += "\nno response: " + httplib::to_string(res.error());
  return r;
}

// The value of an unlabelled metric, or of the first series whose labels contain `labels`
// (e.g. "reason=\"disconnect\""), in a Prometheus text exposition; -1 when absent.
inline double metric_value(const std::string& text, const std::string& name, const std::string& labels = "") {
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#') continue;
    if (line.rfind(name, 0) != 0) continue;
    const size_t after = name.size();
    if (after < line.size() && line[after] != ' ' && line[after] != '{') continue;
    if (!labels.empty() && line.find(labels) == std::string::npos) continue;
    return std::stod(line.substr(line.rfind(' ') + 1));
  }
  return -1;
}

// Polls `pred` every 10 ms until it holds or `timeout` passes.
template <class Pred>
bool eventually(Pred pred, std::chrono::duration<double> timeout = std::chrono::seconds(20)) {
  const auto end = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < end) {
    if (pred()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return pred();
}

}  // namespace fineserve::testing
