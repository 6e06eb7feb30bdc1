#include "server/http_server.h"

#include <httplib.h>
#include <sys/socket.h>
#include <spdlog/spdlog.h>

#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstdio>
#include <mutex>
#include <optional>
#include <random>
#include <thread>
#include <utility>

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

// The error shape of a path: OpenAI's for /v1/ routes, TGI's otherwise.
// The error shape of a path: OpenAI's for /v1/* and vLLM's tokenizer routes, TGI's otherwise.
Endpoint shape_of(const std::string& path) {
  const bool openai = path.rfind("/v1/", 0) == 0 || path == "/tokenize" || path == "/detokenize";
  return openai ? Endpoint::Completions : Endpoint::Generate;
}

bool is_probe(const std::string& path) { return path == "/health" || path == "/ready" || path == "/metrics"; }

// What the access-log line of the request this thread serves says; handlers fill it in, the
// logger (called by cpp-httplib after the response's last byte) writes and resets it.
struct AccessRecord {
  std::string id;  // X-Request-Id
  Clock::time_point arrival;
  std::optional<double> ttft_s;
  int prompt_tokens = -1;     // -1: not a generation request
  int generated_tokens = 0;
  std::string finish_reason;  // of the last choice; or the error type
};
thread_local AccessRecord tl_access;

// A client's X-Request-Id is kept when it is a short printable token; otherwise one is made.
bool acceptable_request_id(const std::string& id) {
  if (id.empty() || id.size() > 128) return false;
  for (unsigned char c : id)
    if (c < 0x21 || c > 0x7e) return false;
  return true;
}

// Compares a presented key with the configured one in time that depends only on their lengths,
// not on where they first differ.
bool keys_match(std::string_view presented, std::string_view expected) {
  unsigned char diff = presented.size() == expected.size() ? 0 : 1;
  for (size_t i = 0; i < presented.size(); ++i)
    diff |= static_cast<unsigned char>(presented[i] ^ expected[expected.empty() ? 0 : i % expected.size()]);
  return diff == 0 && !expected.empty();
}

// Routes that read a JSON body.
bool takes_json(const std::string& method, const std::string& path) {
  if (method != "POST") return false;
  for (const char* p : {"/", "/generate", "/generate_stream", "/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"})
    if (path == p) return true;
  return false;
}

}  // namespace

ConnectionLimits connection_limits(const HttpConfig& c) {
  ConnectionLimits l;
  l.max_connections = c.max_connections;
  l.keepalive_timeout_s = c.keepalive_timeout_s;
  l.header_timeout_s = c.header_timeout_s;
  l.body_timeout_s = c.body_timeout_s;
  l.worker_threads = c.threads;
  l.probe_threads = c.probe_threads;
  l.max_body_bytes = c.max_body_bytes;
  return l;
}

struct HttpServer::Impl {
  HttpConfig config;
  Metrics& metrics;
  ConnectionServer svr;
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

  Impl(const HttpConfig& c, Metrics& m) : config(c), metrics(m), svr(connection_limits(c)) {}

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
  // Tokenizes a prompt: chat message content (`literal`) never becomes special tokens; nor does a
  // raw prompt's text when the server was started without prompt_special_tokens.
  std::vector<int32_t> encode_prompt(const std::string& text, bool add_special_tokens,
                                     const std::vector<TextRange>& literal, bool raw) const {
    if (raw && !config.prompt_special_tokens) {
      const TextRange all{0, text.size()};
      return tokenizer->encode(text, add_special_tokens, std::span<const TextRange>(&all, 1));
    }
    return tokenizer->encode(text, add_special_tokens, literal);
  }
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
  // Non-streaming routes: the whole body is produced before the status is chosen, so that a
  // late failure gets its own status (504, 500, 503) instead of a 200 with an error body.
  void respond_whole(httplib::Response& res, RequestHandle& handle, ResponseContext context, RequestHandle::Update first);
  // What every request goes through before its route: request id, CORS, API key, Content-Type.
  httplib::Server::HandlerResponse pre_route(const httplib::Request& req, httplib::Response& res);
  void access_log(const httplib::Request& req, const httplib::Response& res);
  // Unhealthy: the engine loop died or keeps failing its steps.
  bool healthy(std::string* problem) const;
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
  if (api.prompt_ids.empty())
    prompt = encode_prompt(api.prompt, api.add_special_tokens, api.prompt_literal, endpoint != Endpoint::ChatCompletions);
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

void HttpServer::Impl::respond_whole(httplib::Response& res, RequestHandle& handle, ResponseContext context,
                                     RequestHandle::Update first) {
  ResponseWriter writer(std::move(context));
  const auto heartbeat = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::duration<double>(config.heartbeat_s));
  RequestHandle::Update u = std::move(first);
  std::string body;
  while (true) {
    if (!u.tokens.empty() && !tl_access.ttft_s) tl_access.ttft_s = std::chrono::duration<double>(Clock::now() - tl_access.arrival).count();
    for (const TokenEvent& e : u.tokens)
      if (e.finish) tl_access.finish_reason = std::string(finish_reason_name(*e.finish));
    body += writer.on_events(u.tokens);
    if (writer.finished()) break;
    if (u.phase == RequestHandle::Phase::Failed) {
      tl_access.generated_tokens = writer.generated_tokens();
      tl_access.finish_reason = u.failure->type();
      throw *u.failure;  // with_errors answers with its status and the route's error body
    }
    // Nothing is written until the end, so a client that leaves is noticed by its socket.
    if (ConnectionServer::client_gone()) {
      handle.cancel("disconnect");
      throw ApiError(499, "cancelled", "the client closed the connection");
    }
    u = handle.wait(heartbeat);
  }
  tl_access.generated_tokens = writer.generated_tokens();
  res.status = 200;
  res.set_content(body, writer.content_type());
}

void HttpServer::Impl::respond(httplib::Response& res, std::shared_ptr<RequestHandle> handle, ResponseContext context,
                               RequestHandle::Update first, std::shared_ptr<OpenToken> open_token) {
  // Streams. The provider runs on this connection's thread; between tokens it waits on the
  // request's channel. To notice a client that went away while nothing is being written (queued,
  // or a long prefill), it writes an SSE comment after heartbeat_s of silence. A failed write
  // cancels the request, which frees the KV blocks of all its sequences.
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
  res.set_header("Cache-Control", "no-cache");
  res.set_header("X-Accel-Buffering", "no");
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
        if (!u.tokens.empty() && !tl_access.ttft_s) tl_access.ttft_s = std::chrono::duration<double>(Clock::now() - tl_access.arrival).count();
        for (const TokenEvent& e : u.tokens)
          if (e.finish) tl_access.finish_reason = std::string(finish_reason_name(*e.finish));
        std::string out = s->writer.on_events(u.tokens);
        if (!s->writer.finished() && u.phase == RequestHandle::Phase::Failed) {
          out += s->writer.on_failure(*u.failure);
          tl_access.finish_reason = u.failure->type();
        }
        tl_access.generated_tokens = s->writer.generated_tokens();
        if (out.empty() && Clock::now() - s->last_write >= heartbeat) out = std::string(kSseHeartbeat);
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
    tl_access.prompt_tokens = p.context.prompt_tokens;
    RequestHandle::Update first;
    std::shared_ptr<RequestHandle> handle = admit(*lp, std::move(p.generation), arrival, first);
    if (p.context.request.stream) {
      respond(res, std::move(handle), std::move(p.context), std::move(first), open_token);
    } else {
      // A throw below (a late failure) must still end the request.
      struct CancelOnExit {
        RequestHandle& h;
        ~CancelOnExit() { h.cancel("error"); }  // no-op once the request has ended
      } guard{*handle};
      respond_whole(res, *handle, std::move(p.context), std::move(first));
    }
  });
}

void HttpServer::Impl::tokenize(const httplib::Request& req, httplib::Response& res) {
  with_errors(req, res, Endpoint::Completions, "tokenize", [&] {
    if (!loop.load(std::memory_order_acquire)) throw ApiError(503, error_type::kUnavailable, "the model is still loading");
    const TokenizeRequest t = parse_tokenize(req.body, limits);
    const std::vector<int32_t> ids = encode_prompt(t.prompt, t.add_special_tokens, t.prompt_literal, t.prompt_literal.empty());
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
          {"source_format", i.source_format},
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

  svr.Get("/health", [this](const httplib::Request&, httplib::Response& r) {
    std::string problem;
    if (!healthy(&problem)) return reply_json(r, 503, {{"status", "unhealthy"}, {"error", problem}});
    reply_json(r, 200, {{"status", "ok"}});
  });
  svr.Get("/ready", [this](const httplib::Request&, httplib::Response& r) {
    std::string problem;
    if (!healthy(&problem)) return reply_json(r, 503, {{"status", "unhealthy"}, {"error", problem}});
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
    const Endpoint shape = shape_of(q.path);
    std::string type = error_type::kBadRequest, msg = "bad request";
    if (r.status == 404) {
      type = error_type::kNotFound;
      msg = "no route for " + q.method + " " + q.path;
    } else if (r.status == 413) {
      type = error_type::kPayloadTooLarge;
      msg = "the request body is larger than " + std::to_string(config.max_body_bytes) + " bytes";
    } else if (r.status == 414) {
      msg = "the request URI is too long";
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
    reply_json(r, 500, error_body(shape_of(q.path), ApiError(500, error_type::kInternal, "internal error: " + what)));
  });
  svr.set_pre_routing_handler([this](const httplib::Request& q, httplib::Response& r) { return pre_route(q, r); });
  // Called after the response's last byte (streams included).
  svr.set_logger([this](const httplib::Request& q, const httplib::Response& r) { access_log(q, r); });
  // The errors the connection layer answers itself (414, 431, 408, ...) get the same JSON bodies.
  svr.set_error_body([](int status, const std::string& path, const std::string& message) {
    const char* type = status == 413 ? error_type::kPayloadTooLarge
                       : status == 503 ? error_type::kUnavailable
                       : status == 408 ? error_type::kTimeout
                                       : error_type::kBadRequest;
    return dump(error_body(shape_of(path), ApiError(status, type, message)));
  });
}

httplib::Server::HandlerResponse HttpServer::Impl::pre_route(const httplib::Request& q, httplib::Response& r) {
  using HR = httplib::Server::HandlerResponse;
  tl_access = AccessRecord{};
  tl_access.arrival = Clock::now();
  const std::string given = q.get_header_value("X-Request-Id");
  tl_access.id = acceptable_request_id(given) ? given : random_id("");
  r.set_header("X-Request-Id", tl_access.id);

  if (!config.cors_allow_origin.empty() && q.has_header("Origin")) {
    r.set_header("Access-Control-Allow-Origin", config.cors_allow_origin);
    if (config.cors_allow_origin != "*") r.set_header("Vary", "Origin");
    if (q.method == "OPTIONS") {  // a preflight
      r.set_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS");
      r.set_header("Access-Control-Allow-Headers", "Authorization, Content-Type, X-Request-Id");
      r.set_header("Access-Control-Max-Age", "600");
      r.status = 204;
      return HR::Handled;
    }
  }
  const bool exempt = is_probe(q.path) || q.path == "/openapi.json";
  if (!config.api_key.empty() && !exempt) {
    const std::string auth = q.get_header_value("Authorization");
    constexpr std::string_view kBearer = "Bearer ";
    const std::string_view presented =
        auth.size() > kBearer.size() && auth.compare(0, kBearer.size(), kBearer) == 0 ? std::string_view(auth).substr(kBearer.size()) : std::string_view();
    if (!keys_match(presented, config.api_key)) {
      r.set_header("WWW-Authenticate", "Bearer");
      reply_json(r, 401, error_body(shape_of(q.path), ApiError(401, "authentication_error", "a valid API key is required (Authorization: Bearer KEY)")));
      return HR::Handled;
    }
  }
  if (takes_json(q.method, q.path)) {
    // As TGI: a JSON route takes only JSON (a form post from a browser page is not a request).
    std::string type = q.get_header_value("Content-Type");
    type = type.substr(0, type.find(';'));
    while (!type.empty() && type.back() == ' ') type.pop_back();
    for (char& c : type) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    if (type != "application/json") {
      reply_json(r, 415, error_body(shape_of(q.path), ApiError(415, error_type::kBadRequest,
                                                                "expected a request with Content-Type: application/json")));
      if (q.path != "/tokenize" && q.path != "/detokenize") {
        const Endpoint e = q.path == "/generate_stream" ? Endpoint::GenerateStream
                           : q.path == "/v1/completions" ? Endpoint::Completions
                           : q.path == "/v1/chat/completions" ? Endpoint::ChatCompletions
                                                              : Endpoint::Generate;
        metrics.count_request(endpoint_name(e), 415);
      }
      return HR::Handled;
    }
  }
  return HR::Unhandled;
}

void HttpServer::Impl::access_log(const httplib::Request& q, const httplib::Response& r) {
  const AccessRecord a = std::exchange(tl_access, AccessRecord{});
  if (!config.access_log) return;
  // A request cpp-httplib refused before routing (a malformed line) has no record.
  const bool routed = !a.id.empty();
  json line = {{"request_id", routed ? json(a.id) : json(nullptr)}, {"method", q.method}, {"route", q.path},
               {"status", r.status}, {"remote", q.remote_addr}};
  line["duration_s"] = routed ? json(std::chrono::duration<double>(Clock::now() - a.arrival).count()) : json(nullptr);
  if (a.prompt_tokens >= 0) {
    line["prompt_tokens"] = a.prompt_tokens;
    line["generated_tokens"] = a.generated_tokens;
    line["ttft_s"] = a.ttft_s ? json(*a.ttft_s) : json(nullptr);
    line["finish_reason"] = a.finish_reason.empty() ? json(nullptr) : json(a.finish_reason);
  }
  if (is_probe(q.path)) {
    spdlog::debug("access {}", dump(line));
  } else {
    spdlog::info("access {}", dump(line));
  }
}

bool HttpServer::Impl::healthy(std::string* problem) const {
  EngineLoop* lp = loop.load(std::memory_order_acquire);
  return lp == nullptr || lp->healthy(problem);
}

// ---- HttpServer ---------------------------------------------------------------------------------

HttpServer::HttpServer(const HttpConfig& config, Metrics& metrics) : impl_(std::make_unique<Impl>(config, metrics)) {
  if (config.threads < 2) throw Error("the HTTP server needs at least 2 threads");
  if (config.heartbeat_s <= 0) throw Error("heartbeat_s must be > 0");
  if (config.max_body_bytes == 0) throw Error("max_body_bytes must be > 0");
  impl_->svr.set_payload_max_length(config.max_body_bytes);
  impl_->svr.set_tcp_nodelay(true);  // one small write per token: do not let Nagle batch them
  // cpp-httplib's default options set SO_REUSEPORT, with which a second server on the same port
  // starts without error and the kernel splits the connections between the two. SO_REUSEADDR
  // alone still allows a restart while old connections linger in TIME_WAIT, and a port that is
  // in use fails bind(). The listening socket is also remembered so that bind() can widen its
  // accept backlog (see there).
  impl_->svr.set_socket_options([impl = impl_.get()](socket_t sock) {
    int yes = 1;
    ::setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof yes);
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
  if (m.port < 0) {
    const int err = errno;
    std::string why = err == EADDRINUSE      ? "the port is already in use (is another server running on it?)"
                      : err == EADDRNOTAVAIL ? "not an address of this machine"
                      : err == EACCES        ? "permission denied (ports below 1024 need privileges)"
                                             : "address in use, or not an address of this machine";
    throw Error("cannot listen on " + m.config.host + ":" + std::to_string(m.config.port) + ": " + why);
  }
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
  m.svr.set_closing(true);  // responses say "Connection: close"; idle keep-alive connections close
  if (m.open_cv.wait_for(lk, timeout, [&] { return m.open == 0; })) return true;
  lk.unlock();
  // Out of time: end what is left (clients get an error event or body) and give their
  // connections a moment to take it; then shut down the sockets of responses still being
  // written (a client that does not read) so that the process exits within the drain timeout
  // plus well under a second.
  spdlog::warn("drain timeout: ending the requests still in flight");
  if (lp) lp->drain(std::chrono::seconds(0));
  lk.lock();
  if (!m.open_cv.wait_for(lk, std::chrono::milliseconds(300), [&] { return m.open == 0; })) {
    lk.unlock();
    m.svr.abort_active();
    lk.lock();
    m.open_cv.wait_for(lk, std::chrono::milliseconds(200), [&] { return m.open == 0; });
  }
  return false;
}

void HttpServer::stop() {
  Impl& m = *impl_;
  if (!m.started) return;
  m.svr.stop();
  if (m.thread.joinable()) m.thread.join();
  m.svr.stop_connections();
  m.started = false;
}

int HttpServer::port() const { return impl_->port; }

bool HttpServer::ready() const { return !impl_->draining && impl_->loop.load() != nullptr; }

ConnectionStats HttpServer::connection_stats() const { return impl_->svr.stats(); }

int HttpServer::open_responses() const {
  std::lock_guard lk(impl_->mu);
  return impl_->open;
}

}  // namespace fineserve
