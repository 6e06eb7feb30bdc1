// The connection layer under cpp-httplib: who may hold a socket, for how long, and which thread
// serves it. cpp-httplib alone gives every accepted connection a worker thread and reads it with
// per-read timeouts only, so one byte a second keeps a thread forever and a few hundred idle
// connects starve /health. Here:
//
//   * One reactor thread (poll) holds every connection that is idle between requests or still
//     sending its request. A request is read completely -- line, headers and body -- before any
//     worker sees it, under TOTAL deadlines: keepalive_timeout_s until its first byte,
//     header_timeout_s for its line and headers, body_timeout_s for its body (408 and closed
//     when missed). Slow senders cost a socket and a buffer, never a thread.
//   * At most max_connections sockets are open. A connection arriving at the limit closes the
//     connection that has waited longest in the reactor, so that a flood of idle or
//     trickling connects cannot lock new clients out; only when every open connection is being
//     served does the newcomer get 503.
//   * Reserved capacity: complete GET /health, /ready and /metrics requests go to their own small
//     pool (probe_threads), so probes answer while every worker streams a generation.
//   * The head is checked before dispatch: a URI over max_uri_bytes gets 414 at once, a head over
//     max_head_bytes 431, a body over max_body_bytes 413, Transfer-Encoding together with
//     Content-Length 400 (request smuggling), an unknown Transfer-Encoding 501.
//
// Requests are then parsed, routed and answered by cpp-httplib's own process_request() over a
// Stream that reads the buffered request and writes to the socket with a write timeout.
#pragma once

#include <httplib.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

namespace fineserve {

struct ConnectionLimits {
  int max_connections = 1024;       // open client sockets (also capped by RLIMIT_NOFILE)
  double keepalive_timeout_s = 5;   // idle time before a request's first byte (new or kept-alive)
  double header_timeout_s = 10;     // request line + headers, from the request's first byte
  double body_timeout_s = 30;       // the body, from the end of the headers
  double write_timeout_s = 10;      // one blocked write to a client
  int worker_threads = 256;         // serve requests (a generation holds one while it streams)
  int probe_threads = 2;            // reserved for GET /health, /ready, /metrics
  size_t max_head_bytes = 64 << 10;  // request line + headers -> 431
  size_t max_uri_bytes = 8192;       // -> 414
  size_t max_body_bytes = 1 << 20;   // -> 413
};

// Counters for tests and logs.
struct ConnectionStats {
  int64_t open = 0;          // client sockets open now
  int64_t accepted = 0;      // since start
  int64_t evicted = 0;       // closed to make room at max_connections
  int64_t timed_out = 0;     // closed by a keep-alive, header or body deadline
  int64_t refused = 0;       // 503 at max_connections with nothing to evict
  int64_t rejected = 0;      // answered 4xx/5xx by the reactor (414, 431, 413, 400, 501)
};

// An httplib::Server whose accepted sockets go to the reactor above instead of a thread each.
// Configure routes and handlers as usual; bind with bind_to_port / bind_to_any_port and run
// listen_after_bind() on a thread. stop_connections() after stop().
class ConnectionServer : public httplib::Server {
 public:
  explicit ConnectionServer(const ConnectionLimits& limits);
  ~ConnectionServer() override;

  // Ends every connection: the reactor's at once; those being served get their sockets shut down
  // (their writes fail, so their handlers return), then the threads are joined. Idempotent.
  void stop_connections();
  // Shuts down the sockets of the connections being served now (a bounded drain's last step):
  // their handlers' writes fail at once instead of waiting for a slow client.
  void abort_active();
  // New requests get "Connection: close" (draining).
  void set_closing(bool closing);

  ConnectionStats stats() const;
  const ConnectionLimits& limits() const;

  // The JSON body of the errors the connection layer answers itself (414, 431, 413, 408, 400,
  // 501, 503), given the status, the request path ("" when unknown) and a message.
  using ErrorBody = std::function<std::string(int status, const std::string& path, const std::string& message)>;
  void set_error_body(ErrorBody body) { error_body_ = std::move(body); }

  // For a handler: whether the client of the request this thread serves has gone away (its
  // socket hung up, or it closed its sending side). False when the thread serves no connection.
  static bool client_gone();

 private:
  // cpp-httplib's accept loop calls this for every accepted socket (via an inline task queue).
  bool process_and_close_socket(socket_t sock) override;

  ErrorBody error_body_;
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace fineserve
