#include "server/http_server.h"

#include <httplib.h>
#include <sys/socket.h>
#include <spdlog/spdlog.h>

#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <mutex>
#include <random>
#include <thread>

#include <nlohmann/json.hpp>

#include "kernels/base.h"
#include "models/tokenizer/tokenizer.h"
#include "server/metrics.h"
#include "server/openapi.h"
#include "server/responses.h"
#include "server/sse.h"

namespace fineserve {

using json = nlohmann::json;

namespace {

std::string dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

void reply_json(httplib::Response& res, int status, const json& body) {
  res.status = status;
  res.set_content(dump(body), "application/json");
}

void reply_error(httplib::Response& res, Endpoint endpoint, const ApiError& e) {
  if (e.status() == 429) res.set_header("Retry-After", "1");
  if (e.status() == 503) res.set_header("Retry-After", "5");
  reply_json(res, e.status(), error_body(endpoint, e));
}

}  // namespace

struct HttpServer::Impl {
  HttpConfig config;
  Metrics& metrics;
  httplib::Server svr;
  std::thread thread;
  int port = -1;
  bool started = false;
  socket_t listen_fd = -1;

  // Set once by attach() (release), read by handlers (acquire); card and limits are written
  // before the pointer is published and never change afterwards.
  std::atomic<EngineLoop*> loop{nullptr};
  const Tokenizer* tokenizer = nullptr;
  ModelCard card;
  ApiLimits limits;
  std::unique_ptr<GrammarCompiler> grammars;  // structured output (server/structured_output.h)

  std::atomic<bool> draining{false};
  mutable std::mutex mu;
  std::condition_variable open_cv;
  int open = 0;  // generation responses in progress (under mu)
  std::mt19937_64 rng{std::random_device{}()};

  Impl(const HttpConfig& c, Metrics& m) : config(c), metrics(m) {}

  // Counts a generation response from the moment its request arrives until its last byte is
  // written (it lives in the response's content provider when there is one).
  struct OpenToken {
    Impl* impl;
    explicit OpenToken(Impl* i) : impl(i) {
      std::lock_guard lk(impl->mu);
      ++impl->open;
    }
    ~OpenToken() {
      std::lock_guard lk(impl->mu);
      if (--impl->open == 0) impl->open_cv.notify_all();
    }
    OpenToken(const OpenToken&) = delete;
    OpenToken& operator=(const OpenToken&) = delete;
  };

  uint64_t random_u64() {
    std::lock_guard lk(mu);
    return rng();
  }

  std::string random_id(const char* prefix) {
    char buf[40];
    std::snprintf(buf, sizeof buf, "%s%016llx", prefix, static_cast<unsigned long long>(random_u64()));
    return buf;
  }

  void routes();
  // A generation route: prepare, admit, then stream the response (each below).
  // tgi_root: TGI's POST / (its non-streaming body is an array of one response).
  void generate(const httplib::Request& req, httplib::Response& res, Endpoint endpoint, bool tgi_root = false);
  struct Prepared {
    ResponseContext context;
    GenerationRequest generation;
  };
  // Parses, tokenizes and resolves the request (ApiError 4xx, 503 while loading or draining).
  Prepared prepare(const httplib::Request& req, Endpoint endpoint, EngineLoop*& loop);
  // Submits the request and waits until the engine took it (at most one engine step), so that a
  // refusal still gets a proper status. Throws ApiError; cancels the request if it throws later.
  std::shared_ptr<RequestHandle> admit(EngineLoop& loop, GenerationRequest generation, Clock::time_point arrival,
                                       RequestHandle::Update& first);
  // From here the status is 200 and the body is produced as the tokens come.
  void respond(httplib::Response& res, std::shared_ptr<RequestHandle> handle, ResponseContext context,
               RequestHandle::Update first, std::shared_ptr<OpenToken> open_token);
  // Runs `body`, turning its exceptions into the route's error responses and counting the status.
  template <class Body>
  void with_errors(const httplib::Request& req, httplib::Response& res, Endpoint shape, std::string_view metric, Body&& body);
  void tokenize(const httplib::Request& req, httplib::Response& res);
  void detokenize(const httplib::Request& req, httplib::Response& res);
  json info_json() const;
};

// ---- generation ---------------------------------------------------------------------------------

template <class Body>
void HttpServer::Impl::with_errors(const httplib::Request& req, httplib::Response& res, Endpoint shape,
                                   std::string_view metric, Body&& body) {
  try {
    body();
    metrics.count_request(metric, res.status);
  } catch (const ApiError& e) {
    reply_error(res, shape, e);
    metrics.count_request(metric, e.status());
  } catch (const Error& e) {  // bad input found below the API layer (a tokenizer, a chat template)
    reply_error(res, shape, ApiError(422, error_type::kValidation, e.what()));
    metrics.count_request(metric, 422);
  } catch (const std::exception& e) {
    spdlog::error("{} {}: {}", req.method, req.path, e.what());
    reply_error(res, shape, ApiError(500, error_type::kInternal, std::string("internal error: ") + e.what()));
    metrics.count_request(metric, 500);
  }
}

HttpServer::Impl::Prepared HttpServer::Impl::prepare(const httplib::Request& req, Endpoint endpoint, EngineLoop*& lp) {
  lp = loop.load(std::memory_order_acquire);
  if (draining) throw ApiError(503, error_type::kUnavailable, "the server is shutting down");
  if (!lp) throw ApiError(503, error_type::kUnavailable, "the model is still loading");
  Prepared p;
  ResponseContext& ctx = p.context;
  ctx.request = parse_request(endpoint, req.body, limits);
  ctx.model_name = card.name;
  ctx.tokenizer = tokenizer;
  ctx.created = static_cast<int64_t>(std::time(nullptr));
  ctx.id = random_id(endpoint == Endpoint::ChatCompletions ? "chatcmpl-" : "cmpl-");
  const ApiRequest& api = ctx.request;
  std::vector<int32_t> prompt;
  if (api.prompt_ids.empty()) prompt = tokenizer->encode(api.prompt, api.add_special_tokens);
  p.generation = resolve_request(api, std::move(prompt), limits, random_u64());
  p.generation.grammar = grammars->compile(api.structured);  // null when unconstrained
  ctx.prompt_ids = p.generation.prompt;
  ctx.prompt_text = api.prompt_ids.empty() ? api.prompt : tokenizer->decode(ctx.prompt_ids);
  ctx.prompt_tokens = static_cast<int>(ctx.prompt_ids.size());
  ctx.seed = p.generation.sampling.seed;
  return p;
}

std::shared_ptr<RequestHandle> HttpServer::Impl::admit(EngineLoop& lp, GenerationRequest generation,
                                                       Clock::time_point arrival, RequestHandle::Update& first) {
  std::shared_ptr<RequestHandle> handle = lp.submit(std::move(generation), arrival);
  // Until the response owns the request, a throw must not leave it generating for nobody.
  struct CancelUnlessReleased {
    std::shared_ptr<RequestHandle> h;
    ~CancelUnlessReleased() {
      if (h) h->cancel("error");
    }
  } guard{handle};
  // (No tokens arrive before the phase leaves Queued.)
  do {
    first = handle->wait(std::chrono::milliseconds(50));
  } while (first.phase == RequestHandle::Phase::Queued);
  if (first.phase == RequestHandle::Phase::Failed && first.tokens.empty()) throw *first.failure;
  guard.h.reset();
  return handle;
}

void HttpServer::Impl::respond(httplib::Response& res, std::shared_ptr<RequestHandle> handle, ResponseContext context,
                               RequestHandle::Update first, std::shared_ptr<OpenToken> open_token) {
  // The provider runs on this connection's thread; between tokens it waits on the request's
  // channel. To notice a client that went away while nothing is being written (queued, or a
  // non-streaming body still being generated), it writes a heartbeat after heartbeat_s of
  // silence: an SSE comment for streams, a space before the JSON body otherwise (JSON ignores
  // leading whitespace). A failed write cancels the request, which frees the KV blocks of all its
  // sequences.
  struct Stream {
    std::shared_ptr<RequestHandle> handle;
    ResponseWriter writer;
    RequestHandle::Update first;
    bool has_first = true;
    bool done = false;
    Clock::time_point last_write = Clock::now();
    std::shared_ptr<OpenToken> open;
  };
  auto s = std::make_shared<Stream>(Stream{std::move(handle), ResponseWriter(std::move(context)), std::move(first), true,
                                           false, Clock::now(), std::move(open_token)});
  const auto heartbeat = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::duration<double>(config.heartbeat_s));
  const std::string content_type = s->writer.content_type();
  res.status = 200;
  if (s->writer.streaming()) {
    res.set_header("Cache-Control", "no-cache");
    res.set_header("X-Accel-Buffering", "no");
  }
  res.set_chunked_content_provider(
      content_type,
      [s, heartbeat](size_t, httplib::DataSink& sink) {
        RequestHandle::Update u;
        if (s->has_first) {
          u = std::move(s->first);
          s->has_first = false;
        } else {
          u = s->handle->wait(heartbeat);
        }
        std::string out = s->writer.on_events(u.tokens);
        if (!s->writer.finished() && u.phase == RequestHandle::Phase::Failed) out += s->writer.on_failure(*u.failure);
        if (out.empty() && Clock::now() - s->last_write >= heartbeat)
          out = s->writer.streaming() ? std::string(kSseHeartbeat) : std::string(" ");
        if (!out.empty()) {
          if (!sink.write(out.data(), out.size())) {
            s->handle->cancel("disconnect");
            s->done = true;
            return false;
          }
          s->last_write = Clock::now();
        }
        if (s->writer.finished()) {
          s->done = true;
          sink.done();
        }
        return true;
      },
      [s](bool /*success*/) {
        // The response ended (written, or the connection failed, or the server stopped).
        if (!s->done) s->handle->cancel("disconnect");
        s->open.reset();
      });
}

void HttpServer::Impl::generate(const httplib::Request& req, httplib::Response& res, Endpoint endpoint, bool tgi_root) {
  const Clock::time_point arrival = Clock::now();
  auto open_token = std::make_shared<OpenToken>(this);
  with_errors(req, res, endpoint, endpoint_name(endpoint), [&] {
    EngineLoop* lp = nullptr;
    Prepared p = prepare(req, endpoint, lp);
    p.context.tgi_root = tgi_root;
    RequestHandle::Update first;
    std::shared_ptr<RequestHandle> handle = admit(*lp, std::move(p.generation), arrival, first);
    respond(res, std::move(handle), std::move(p.context), std::move(first), open_token);
  });
}

void HttpServer::Impl::tokenize(const httplib::Request& req, httplib::Response& res) {
  with_errors(req, res, Endpoint::Completions, "tokenize", [&] {
    if (!loop.load(std::memory_order_acquire)) throw ApiError(503, error_type::kUnavailable, "the model is still loading");
    const TokenizeRequest t = parse_tokenize(req.body, limits);
    const std::vector<int32_t> ids = tokenizer->encode(t.prompt, t.add_special_tokens);
    reply_json(res, 200, {{"count", ids.size()}, {"max_model_len", card.info.max_context}, {"tokens", ids}});
  });
}

void HttpServer::Impl::detokenize(const httplib::Request& req, httplib::Response& res) {
  with_errors(req, res, Endpoint::Completions, "detokenize", [&] {
    if (!loop.load(std::memory_order_acquire)) throw ApiError(503, error_type::kUnavailable, "the model is still loading");
    const std::vector<int32_t> ids = parse_detokenize(req.body, limits);
    reply_json(res, 200, {{"prompt", tokenizer->decode(ids)}});
  });
}

// ---- other routes -------------------------------------------------------------------------------

json HttpServer::Impl::info_json() const {
  const ModelInfo& i = card.info;
  return {{"model_id", card.name},
          {"model_path", card.path},
          {"architecture", i.architecture},
          {"quantization", i.quantization},
          {"device", card.device},
          {"tp_size", card.tp_size},
          {"max_context", i.max_context},
          {"max_input_tokens", i.max_context - 1},
          {"max_total_tokens", i.max_context},
          {"max_batch_tokens", card.engine.max_batch_tokens},
          {"max_seqs", card.engine.max_seqs},
          {"max_queue", card.loop.max_queue},
          {"kv_cache_blocks", card.engine.num_blocks},
          {"kv_block_size", card.engine.block_size},
          {"request_timeout_s", card.loop.request_timeout_s},
          {"max_body_bytes", config.max_body_bytes},
          {"max_stop_sequences", config.max_stop_sequences},
          {"default_max_new_tokens", config.default_max_new_tokens},
          {"vocab_size", i.vocab_size},
          {"max_best_of", limits.max_n},
          {"max_top_n_tokens", limits.max_logprobs},
          {"chat_template", card.chat ? card.chat->origin : ChatFormat::chatml().origin},
          {"version", "0.1.0"}};
}

void HttpServer::Impl::routes() {
  // TGI's root route: what the text-generation client posts to; "stream" picks the shape.
  svr.Post("/", [this](const httplib::Request& q, httplib::Response& r) {
    const json body = json::parse(q.body, nullptr, /*allow_exceptions=*/false);
    const bool stream = body.is_object() && body.contains("stream") && body["stream"].is_boolean() && body["stream"].get<bool>();
    generate(q, r, stream ? Endpoint::GenerateStream : Endpoint::Generate, /*tgi_root=*/true);
  });
  svr.Post("/tokenize", [this](const httplib::Request& q, httplib::Response& r) { tokenize(q, r); });
  svr.Post("/detokenize", [this](const httplib::Request& q, httplib::Response& r) { detokenize(q, r); });
  svr.Get("/openapi.json", [](const httplib::Request&, httplib::Response& r) {
    r.set_content(std::string(openapi_document()), "application/json");
  });
  svr.Post("/generate", [this](const httplib::Request& q, httplib::Response& r) { generate(q, r, Endpoint::Generate); });
  svr.Post("/generate_stream", [this](const httplib::Request& q, httplib::Response& r) { generate(q, r, Endpoint::GenerateStream); });
  svr.Post("/v1/completions", [this](const httplib::Request& q, httplib::Response& r) { generate(q, r, Endpoint::Completions); });
  svr.Post("/v1/chat/completions", [this](const httplib::Request& q, httplib::Response& r) { generate(q, r, Endpoint::ChatCompletions); });

  svr.Get("/health", [](const httplib::Request&, httplib::Response& r) { reply_json(r, 200, {{"status", "ok"}}); });
  svr.Get("/ready", [this](const httplib::Request&, httplib::Response& r) {
    if (draining) return reply_json(r, 503, {{"status", "draining"}});
    if (!loop.load(std::memory_order_acquire)) return reply_json(r, 503, {{"status", "loading"}});
    reply_json(r, 200, {{"status", "ready"}});
  });
  svr.Get("/info", [this](const httplib::Request&, httplib::Response& r) {
    if (!loop.load(std::memory_order_acquire))
      return reply_error(r, Endpoint::Generate, ApiError(503, error_type::kUnavailable, "the model is still loading"));
    reply_json(r, 200, info_json());
  });
  svr.Get("/v1/models", [this](const httplib::Request&, httplib::Response& r) {
    if (!loop.load(std::memory_order_acquire))
      return reply_error(r, Endpoint::Completions, ApiError(503, error_type::kUnavailable, "the model is still loading"));
    json m = {{"id", card.name}, {"object", "model"}, {"created", card.created}, {"owned_by", "fineserve"},
              {"max_model_len", card.info.max_context}};
    reply_json(r, 200, {{"object", "list"}, {"data", json::array({m})}});
  });
  svr.Get("/metrics", [this](const httplib::Request&, httplib::Response& r) {
    r.set_content(metrics.serialize(), "text/plain; version=0.0.4");
  });

  // Errors cpp-httplib produces itself (no route, body too large, malformed request) get the same
  // JSON error body as the API's own.
  svr.set_error_handler(httplib::Server::HandlerWithResponse([this](const httplib::Request& q, httplib::Response& r) {
    if (!r.body.empty()) return httplib::Server::HandlerResponse::Unhandled;
    const Endpoint shape = q.path.rfind("/v1/", 0) == 0 ? Endpoint::Completions : Endpoint::Generate;
    std::string type = error_type::kBadRequest, msg = "bad request";
    if (r.status == 404) {
      type = error_type::kNotFound;
      msg = "no route for " + q.method + " " + q.path;
    } else if (r.status == 413) {
      type = error_type::kPayloadTooLarge;
      msg = "the request body is larger than " + std::to_string(config.max_body_bytes) + " bytes";
    } else if (r.status >= 500) {
      type = error_type::kInternal;
      msg = "internal error";
    }
    r.set_content(dump(error_body(shape, ApiError(r.status, type, msg))), "application/json");
    return httplib::Server::HandlerResponse::Handled;
  }));
  svr.set_exception_handler([](const httplib::Request& q, httplib::Response& r, std::exception_ptr ep) {
    std::string what = "unknown exception";
    try {
      std::rethrow_exception(ep);
    } catch (const std::exception& e) {
      what = e.what();
    } catch (...) {
    }
    spdlog::error("{} {}: {}", q.method, q.path, what);
    const Endpoint shape = q.path.rfind("/v1/", 0) == 0 ? Endpoint::Completions : Endpoint::Generate;
    reply_json(r, 500, error_body(shape, ApiError(500, error_type::kInternal, "internal error: " + what)));
  });
  svr.set_logger([](const httplib::Request& q, const httplib::Response& r) {
    spdlog::debug("{} {} -> {}", q.method, q.path, r.status);
  });
}

// ---- HttpServer ---------------------------------------------------------------------------------

HttpServer::HttpServer(const HttpConfig& config, Metrics& metrics) : impl_(std::make_unique<Impl>(config, metrics)) {
  if (config.threads < 2) throw Error("the HTTP server needs at least 2 threads");
  if (config.heartbeat_s <= 0) throw Error("heartbeat_s must be > 0");
  if (config.max_body_bytes == 0) throw Error("max_body_bytes must be > 0");
  const size_t threads = static_cast<size_t>(config.threads);
  impl_->svr.new_task_queue = [threads] { return new httplib::ThreadPool(threads); };
  impl_->svr.set_payload_max_length(config.max_body_bytes);
  impl_->svr.set_tcp_nodelay(true);  // one small write per token: do not let Nagle batch them
  // Remember the listening socket so that bind() can widen its accept backlog (see there).
  impl_->svr.set_socket_options([impl = impl_.get()](socket_t sock) {
    httplib::default_socket_options(sock);
    impl->listen_fd = sock;
  });
  impl_->routes();
}

HttpServer::~HttpServer() { stop(); }

int HttpServer::bind() {
  Impl& m = *impl_;
  if (m.config.port == 0) {
    m.port = m.svr.bind_to_any_port(m.config.host);
  } else {
    m.port = m.svr.bind_to_port(m.config.host, m.config.port) ? m.config.port : -1;
  }
  if (m.port < 0)
    throw Error("cannot listen on " + m.config.host + ":" + std::to_string(m.config.port) +
                " (address in use, or not an address of this machine)");
  // cpp-httplib listens with a backlog of 5 connections; when more clients connect at once (a
  // load balancer's burst, 32 benchmark clients) the kernel drops the overflow and those clients
  // see stalls and resets. Calling listen() again on a listening socket updates its backlog (the
  // kernel caps it at net.core.somaxconn).
  if (m.listen_fd >= 0 && ::listen(m.listen_fd, 1024) != 0) spdlog::warn("could not widen the listen backlog");
  return m.port;
}

void HttpServer::start() {
  Impl& m = *impl_;
  FS_ASSERT(m.port >= 0, "bind() before start()");
  FS_ASSERT(!m.started);
  m.started = true;
  m.thread = std::thread([&m] { m.svr.listen_after_bind(); });
  // stop() is a no-op until the listen loop runs: wait for it, so that a stop() right after
  // start() cannot be lost.
  while (!m.svr.is_running()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
}

void HttpServer::attach(EngineLoop& loop, const Tokenizer& tokenizer, const ModelCard& card) {
  Impl& m = *impl_;
  FS_ASSERT(!m.loop.load());
  m.tokenizer = &tokenizer;
  m.card = card;
  m.limits.model_name = card.name;
  m.limits.max_context = card.info.max_context;
  m.limits.vocab_size = card.info.vocab_size;
  m.limits.default_max_new_tokens = m.config.default_max_new_tokens;
  m.limits.max_stop_sequences = m.config.max_stop_sequences;
  m.limits.chat = card.chat;
  std::vector<int32_t> eos = {static_cast<int32_t>(card.info.eos_token_id)};
  if (tokenizer.eos_id()) eos.push_back(*tokenizer.eos_id());
  m.grammars = std::make_unique<GrammarCompiler>(tokenizer, static_cast<int32_t>(card.info.vocab_size), eos);
  m.loop.store(&loop, std::memory_order_release);
}

bool HttpServer::drain(std::chrono::duration<double> timeout) {
  Impl& m = *impl_;
  m.draining = true;
  EngineLoop* lp = m.loop.load(std::memory_order_acquire);
  if (lp) lp->begin_drain();
  std::unique_lock lk(m.mu);
  if (m.open_cv.wait_for(lk, timeout, [&] { return m.open == 0; })) return true;
  lk.unlock();
  // Out of time: end what is left (clients get an error event or body), then give their
  // connections a moment to take it.
  spdlog::warn("drain timeout: ending the requests still in flight");
  if (lp) lp->drain(std::chrono::seconds(0));
  lk.lock();
  m.open_cv.wait_for(lk, std::chrono::seconds(5), [&] { return m.open == 0; });
  return false;
}

void HttpServer::stop() {
  Impl& m = *impl_;
  if (!m.started) return;
  m.svr.stop();
  if (m.thread.joinable()) m.thread.join();
  m.started = false;
}

int HttpServer::port() const { return impl_->port; }

bool HttpServer::ready() const { return !impl_->draining && impl_->loop.load() != nullptr; }

int HttpServer::open_responses() const {
  std::lock_guard lk(impl_->mu);
  return impl_->open;
}

}  // namespace fineserve
