#include "server/http_connections.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <unordered_set>
#include <vector>

#include <spdlog/spdlog.h>

#include "kernels/base.h"

namespace fineserve {

namespace {

using Clock = std::chrono::steady_clock;

Clock::duration seconds(double s) { return std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(s)); }

int millis_until(Clock::time_point t, Clock::time_point now) {
  if (t <= now) return 0;
  return static_cast<int>(std::chrono::duration_cast<std::chrono::milliseconds>(t - now).count()) + 1;
}

std::string lower(std::string_view s) {
  std::string out(s);
  for (char& c : out) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t' || s.back() == '\r')) s.remove_suffix(1);
  return s;
}

// cpp-httplib hands every accepted socket to its task queue; this one runs the task at once on
// the accept thread, where process_and_close_socket() only registers the socket with the reactor.
class InlineQueue : public httplib::TaskQueue {
 public:
  void enqueue(std::function<void()> fn) override { fn(); }
  void shutdown() override {}
};

const char* reason_phrase(int status) {
  switch (status) {
    case 400: return "Bad Request";
    case 408: return "Request Timeout";
    case 413: return "Payload Too Large";
    case 414: return "URI Too Long";
    case 431: return "Request Header Fields Too Large";
    case 501: return "Not Implemented";
    case 503: return "Service Unavailable";
    default: return "Error";
  }
}

}  // namespace

// One client connection. Owned by the reactor while it waits for a request, by a worker while
// its request is served.
struct Conn {
  int fd = -1;
  std::string buf;   // bytes received and not yet consumed by a served request
  size_t pos = 0;    // read position of the request being served
  enum class Phase { Idle, Head, Body } phase = Phase::Idle;
  Clock::time_point deadline;
  Clock::time_point since;  // entered the reactor: eviction takes the oldest first
  // Filled when the head is complete.
  size_t head_end = 0;       // offset of the body
  size_t content_length = 0;
  bool chunked = false;
  size_t chunk_scan = 0;     // chunked: offset of the next chunk-size line
  size_t chunked_total = 0;  // chunked: body bytes seen so far
  size_t request_end = 0;    // offset just past the complete request
  bool probe = false;        // GET /health, /ready, /metrics
  int served = 0;            // requests answered on this connection
  std::string path;          // for error bodies
};

namespace {

// Serves a buffered request to cpp-httplib, and writes the response to the socket.
class ConnStream : public httplib::Stream {
 public:
  ConnStream(Conn& c, int write_timeout_ms) : c_(c), write_timeout_ms_(write_timeout_ms) {}

  // The reactor buffered the whole request and knows where it ends: reads stop there. (A request
  // without Content-Length or chunked coding has no body, RFC 9112 6.3; cpp-httplib would read
  // one until the connection closes.) What follows is the next request.
  bool is_readable() const override { return c_.pos < c_.request_end; }
  bool is_writable() const override {
    pollfd p{c_.fd, POLLOUT, 0};
    if (::poll(&p, 1, write_timeout_ms_) <= 0) return false;
    return (p.revents & POLLOUT) && !(p.revents & (POLLERR | POLLHUP));
  }
  ssize_t read(char* ptr, size_t size) override {
    if (c_.pos >= c_.request_end) return 0;
    const size_t n = std::min(size, c_.request_end - c_.pos);
    std::memcpy(ptr, c_.buf.data() + c_.pos, n);
    c_.pos += n;
    return static_cast<ssize_t>(n);
  }
  ssize_t write(const char* ptr, size_t size) override {
    while (true) {
      const ssize_t n = ::send(c_.fd, ptr, size, MSG_NOSIGNAL | MSG_DONTWAIT);
      if (n >= 0) return n;
      if (errno == EINTR) continue;
      if (errno != EAGAIN && errno != EWOULDBLOCK) return -1;
      if (!is_writable()) return -1;  // the client has not read for write_timeout_s
    }
  }
  void get_remote_ip_and_port(std::string& ip, int& port) const override {
    sockaddr_storage a{};
    socklen_t len = sizeof a;
    if (::getpeername(c_.fd, reinterpret_cast<sockaddr*>(&a), &len) == 0) describe(a, ip, port);
  }
  void get_local_ip_and_port(std::string& ip, int& port) const override {
    sockaddr_storage a{};
    socklen_t len = sizeof a;
    if (::getsockname(c_.fd, reinterpret_cast<sockaddr*>(&a), &len) == 0) describe(a, ip, port);
  }
  // cpp-httplib reads socket() only to refuse sockets numbered >= FD_SETSIZE, a limit of the
  // select() its own streams use. This stream polls, so that limit does not apply: report a
  // number below it rather than turning connections beyond the 1024th into 500s.
  socket_t socket() const override { return c_.fd < FD_SETSIZE ? c_.fd : 0; }

 private:
  static void describe(const sockaddr_storage& a, std::string& ip, int& port) {
    char host[INET6_ADDRSTRLEN] = {};
    if (a.ss_family == AF_INET) {
      const auto* v4 = reinterpret_cast<const sockaddr_in*>(&a);
      ::inet_ntop(AF_INET, &v4->sin_addr, host, sizeof host);
      port = ntohs(v4->sin_port);
    } else if (a.ss_family == AF_INET6) {
      const auto* v6 = reinterpret_cast<const sockaddr_in6*>(&a);
      ::inet_ntop(AF_INET6, &v6->sin6_addr, host, sizeof host);
      port = ntohs(v6->sin6_port);
    }
    ip = host;
  }

  Conn& c_;
  int write_timeout_ms_;
};

thread_local Conn* tl_current = nullptr;  // the connection this worker thread serves

}  // namespace

struct ConnectionServer::Impl {
  ConnectionServer& server;
  ConnectionLimits limits;
  int wake_read = -1, wake_write = -1;

  std::atomic<bool> stopping{false};
  std::atomic<bool> closing{false};
  std::atomic<int64_t> open{0}, accepted{0}, evicted{0}, timed_out{0}, refused{0}, rejected{0};

  // Sockets handed to the reactor (new ones, and connections back from a worker).
  std::mutex incoming_mu;
  std::vector<Conn*> incoming;

  // Workers.
  struct Pool {
    std::mutex mu;
    std::condition_variable cv;
    std::deque<Conn*> queue;
    std::vector<std::thread> threads;
  };
  Pool main_pool, probe_pool;
  std::mutex active_mu;
  std::unordered_set<int> active;  // fds being served

  std::thread reactor;
  bool joined = false;

  Impl(ConnectionServer& s, const ConnectionLimits& l) : server(s), limits(l) {}

  void wake() {
    const char b = 1;
    [[maybe_unused]] ssize_t n = ::write(wake_write, &b, 1);
  }

  void close_conn(Conn* c) {
    ::shutdown(c->fd, SHUT_RDWR);
    ::close(c->fd);
    delete c;
    --open;
  }

  // A short error response written by the reactor (the socket is fresh or idle, so the few
  // hundred bytes fit its send buffer), then the connection closes.
  void reject(Conn* c, int status, const std::string& message) {
    ++rejected;
    std::string body = server.error_body_ ? server.error_body_(status, c->path, message)
                                          : std::string("{\"error\":\"") + message + "\"}";
    std::string out = "HTTP/1.1 " + std::to_string(status) + " " + reason_phrase(status) +
                      "\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: " +
                      std::to_string(body.size()) + "\r\n\r\n" + body;
    [[maybe_unused]] ssize_t n = ::send(c->fd, out.data(), out.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
    close_conn(c);
  }

  enum class Verdict { Wait, Dispatch, Rejected };

  // Advances a connection's request as far as its bytes allow.
  Verdict progress(Conn* c, Clock::time_point now) {
    if (c->phase == Conn::Phase::Idle) {
      // Blank lines before a request line are ignored (RFC 9112 2.2).
      size_t skip = 0;
      while (skip < c->buf.size() && (c->buf[skip] == '\r' || c->buf[skip] == '\n')) ++skip;
      c->buf.erase(0, skip);
      if (c->buf.empty()) return Verdict::Wait;
      c->phase = Conn::Phase::Head;
      c->deadline = now + seconds(limits.header_timeout_s);
    }
    if (c->phase == Conn::Phase::Head) {
      const std::string_view b(c->buf);
      const size_t eol = b.find('\n');
      const size_t line_len = eol == std::string_view::npos ? b.size() : eol;
      // Method, space, URI, space, HTTP/1.1: a URI over the limit shows before the line ends.
      if (line_len > limits.max_uri_bytes + 32) {
        const size_t sp = b.find(' ');
        c->path = std::string(b.substr(sp == std::string_view::npos ? 0 : sp + 1, 64));
        reject(c, 414, "the request URI is longer than " + std::to_string(limits.max_uri_bytes) + " bytes");
        return Verdict::Rejected;
      }
      size_t end = b.find("\r\n\r\n");
      size_t head_end = end == std::string_view::npos ? end : end + 4;
      const size_t lf = b.find("\n\n");
      if (lf != std::string_view::npos && (head_end == std::string_view::npos || lf + 2 < head_end)) head_end = lf + 2;
      if (head_end == std::string_view::npos) {
        if (b.size() > limits.max_head_bytes) {
          reject(c, 431, "the request head is larger than " + std::to_string(limits.max_head_bytes) + " bytes");
          return Verdict::Rejected;
        }
        return Verdict::Wait;
      }
      if (head_end > limits.max_head_bytes) {
        reject(c, 431, "the request head is larger than " + std::to_string(limits.max_head_bytes) + " bytes");
        return Verdict::Rejected;
      }
      return parse_head(c, head_end, now);
    }
    return body_complete(c);
  }

  Verdict parse_head(Conn* c, size_t head_end, Clock::time_point now) {
    const std::string_view head(c->buf.data(), head_end);
    const size_t eol = head.find('\n');
    const std::string_view line = trim(head.substr(0, eol));
    const size_t sp1 = line.find(' ');
    const size_t sp2 = sp1 == std::string_view::npos ? sp1 : line.find(' ', sp1 + 1);
    if (sp1 == std::string_view::npos || sp2 == std::string_view::npos) {
      reject(c, 400, "malformed request line");
      return Verdict::Rejected;
    }
    const std::string_view method = line.substr(0, sp1);
    const std::string_view target = line.substr(sp1 + 1, sp2 - sp1 - 1);
    c->path = std::string(target.substr(0, target.find('?')));
    if (target.size() > limits.max_uri_bytes) {
      reject(c, 414, "the request URI is longer than " + std::to_string(limits.max_uri_bytes) + " bytes");
      return Verdict::Rejected;
    }
    c->probe = method == "GET" && (c->path == "/health" || c->path == "/ready" || c->path == "/metrics");

    bool has_length = false, has_encoding = false, expect_continue = false;
    std::string encoding;
    size_t length = 0;
    size_t expect_begin = 0, expect_end = 0;
    size_t at = eol + 1;
    while (at < head_end) {
      size_t next = head.find('\n', at);
      if (next == std::string_view::npos) next = head_end - 1;
      const std::string_view h = trim(head.substr(at, next - at));
      const size_t line_begin = at;
      at = next + 1;
      if (h.empty()) continue;
      const size_t colon = h.find(':');
      if (colon == std::string_view::npos) {
        reject(c, 400, "malformed header line");
        return Verdict::Rejected;
      }
      const std::string name = lower(trim(h.substr(0, colon)));
      const std::string_view value = trim(h.substr(colon + 1));
      if (name == "content-length") {
        size_t v = 0;
        if (value.empty() || value.size() > 18 || value.find_first_not_of("0123456789") != std::string_view::npos) {
          reject(c, 400, "invalid Content-Length");
          return Verdict::Rejected;
        }
        for (char ch : value) v = v * 10 + static_cast<size_t>(ch - '0');
        if (has_length && v != length) {
          reject(c, 400, "conflicting Content-Length headers");
          return Verdict::Rejected;
        }
        has_length = true;
        length = v;
      } else if (name == "transfer-encoding") {
        if (has_encoding) encoding += ",";
        encoding += lower(value);
        has_encoding = true;
      } else if (name == "expect" && lower(value) == "100-continue") {
        expect_continue = true;
        expect_begin = line_begin;
        expect_end = at;
      }
    }
    if (has_encoding && has_length) {
      // RFC 9112 6.1: a request with both may be an attempt at request smuggling.
      reject(c, 400, "a request must not have both Transfer-Encoding and Content-Length");
      return Verdict::Rejected;
    }
    if (has_encoding && encoding != "chunked") {
      reject(c, 501, "unsupported Transfer-Encoding '" + encoding + "' (only chunked)");
      return Verdict::Rejected;
    }
    if (length > limits.max_body_bytes) {
      reject(c, 413, "the request body is larger than " + std::to_string(limits.max_body_bytes) + " bytes");
      return Verdict::Rejected;
    }
    c->content_length = length;
    c->chunked = has_encoding;
    c->chunked_total = 0;
    if (expect_continue && (length > 0 || c->chunked)) {
      // Answer the interim 100 here (the body is read before any handler runs) and drop the
      // header so that cpp-httplib does not send a second one.
      static constexpr std::string_view kContinue = "HTTP/1.1 100 Continue\r\n\r\n";
      [[maybe_unused]] ssize_t n = ::send(c->fd, kContinue.data(), kContinue.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
      c->buf.erase(expect_begin, expect_end - expect_begin);
      head_end -= expect_end - expect_begin;
    }
    c->head_end = head_end;
    c->chunk_scan = head_end;
    c->phase = Conn::Phase::Body;
    c->deadline = now + seconds(limits.body_timeout_s);
    return body_complete(c);
  }

  Verdict body_complete(Conn* c) {
    if (!c->chunked) {
      c->request_end = c->head_end + c->content_length;
      return c->buf.size() >= c->request_end ? Verdict::Dispatch : Verdict::Wait;
    }
    const std::string& b = c->buf;
    while (true) {
      const size_t eol = b.find("\r\n", c->chunk_scan);
      if (eol == std::string::npos) {
        if (b.size() - c->chunk_scan > 1024) {
          reject(c, 400, "malformed chunked body");
          return Verdict::Rejected;
        }
        return Verdict::Wait;
      }
      std::string_view size_text(b.data() + c->chunk_scan, eol - c->chunk_scan);
      size_text = trim(size_text.substr(0, size_text.find(';')));
      if (size_text.empty() || size_text.size() > 8 || size_text.find_first_not_of("0123456789abcdefABCDEF") != std::string_view::npos) {
        reject(c, 400, "malformed chunked body");
        return Verdict::Rejected;
      }
      const size_t size = std::stoul(std::string(size_text), nullptr, 16);
      const size_t data = eol + 2;
      if (size == 0) {  // the last chunk, then optional trailers and an empty line
        if (b.compare(data, 2, "\r\n") == 0) {
          c->request_end = data + 2;
          return Verdict::Dispatch;
        }
        const size_t end = b.find("\r\n\r\n", data);
        if (end != std::string::npos) {
          c->request_end = end + 4;
          return Verdict::Dispatch;
        }
        if (b.size() - data > limits.max_head_bytes) {
          reject(c, 431, "chunked trailers too large");
          return Verdict::Rejected;
        }
        return Verdict::Wait;
      }
      c->chunked_total += size;
      if (c->chunked_total > limits.max_body_bytes) {
        reject(c, 413, "the request body is larger than " + std::to_string(limits.max_body_bytes) + " bytes");
        return Verdict::Rejected;
      }
      if (b.size() < data + size + 2) {
        c->chunked_total -= size;  // counted again when the chunk is complete
        return Verdict::Wait;
      }
      c->chunk_scan = data + size + 2;
    }
  }

  void dispatch(Conn* c) {
    Pool& pool = c->probe ? probe_pool : main_pool;
    {
      std::lock_guard lk(active_mu);
      active.insert(c->fd);
    }
    {
      std::lock_guard lk(pool.mu);
      pool.queue.push_back(c);
    }
    pool.cv.notify_one();
  }

  // The reactor: every connection waiting for (the rest of) a request.
  void run_reactor() {
    std::vector<Conn*> conns;
    std::vector<pollfd> fds;
    char chunk[16384];
    while (!stopping) {
      Clock::time_point now = Clock::now();
      int timeout = 1000;
      for (Conn* c : conns) timeout = std::min(timeout, millis_until(c->deadline, now));
      fds.assign(1, pollfd{wake_read, POLLIN, 0});
      for (Conn* c : conns) fds.push_back(pollfd{c->fd, POLLIN, 0});
      ::poll(fds.data(), fds.size(), timeout);
      if (stopping) break;
      now = Clock::now();

      std::vector<Conn*> keep;
      keep.reserve(conns.size());
      for (size_t i = 0; i < conns.size(); ++i) {
        Conn* c = conns[i];
        const short ev = fds[i + 1].revents;
        if (ev & (POLLIN | POLLHUP | POLLERR)) {
          bool eof = false;
          while (true) {
            const ssize_t n = ::recv(c->fd, chunk, sizeof chunk, MSG_DONTWAIT);
            if (n > 0) {
              c->buf.append(chunk, static_cast<size_t>(n));
              if (c->buf.size() > limits.max_head_bytes + limits.max_body_bytes + 4096) break;
              continue;
            }
            if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) eof = true;
            if (n < 0 && errno == EINTR) continue;
            break;
          }
          const Verdict v = progress(c, now);
          if (v == Verdict::Rejected) continue;
          if (v == Verdict::Dispatch) {
            dispatch(c);
            continue;
          }
          if (eof) {  // closed before a whole request arrived
            close_conn(c);
            continue;
          }
        }
        if (now >= c->deadline) {
          ++timed_out;
          if (c->phase == Conn::Phase::Idle) {
            close_conn(c);
          } else {
            reject(c, 408, c->phase == Conn::Phase::Head ? "the request headers did not arrive in time"
                                                         : "the request body did not arrive in time");
          }
          continue;
        }
        if (closing && c->phase == Conn::Phase::Idle && c->served > 0) {  // draining: no more requests on kept-alive connections
          close_conn(c);
          continue;
        }
        keep.push_back(c);
      }
      conns.swap(keep);

      if (fds[0].revents & POLLIN) {
        char drain[256];
        while (::read(wake_read, drain, sizeof drain) > 0) {
        }
        std::vector<Conn*> arrived;
        {
          std::lock_guard lk(incoming_mu);
          arrived.swap(incoming);
        }
        for (Conn* c : arrived) {
          c->since = now;
          if (c->phase == Conn::Phase::Idle) c->deadline = now + seconds(limits.keepalive_timeout_s);
          const Verdict v = progress(c, now);  // a kept-alive connection may hold a pipelined request
          if (v == Verdict::Rejected) continue;
          if (v == Verdict::Dispatch) {
            dispatch(c);
            continue;
          }
          conns.push_back(c);
        }
        make_room(conns);
      }
    }
    for (Conn* c : conns) close_conn(c);
    std::lock_guard lk(incoming_mu);
    for (Conn* c : incoming) close_conn(c);
    incoming.clear();
  }

  // Over max_connections: close the connections that have waited longest in the reactor (idle or
  // still sending), so that a flood cannot lock out the clients that come after it; when the
  // reactor holds nothing else, the newcomer gets 503.
  void make_room(std::vector<Conn*>& conns) {
    while (open > limits.max_connections && !conns.empty()) {
      auto victim = conns.end();
      for (auto it = conns.begin(); it != conns.end(); ++it) {
        if (victim == conns.end() || (*it)->since < (*victim)->since) victim = it;
      }
      Conn* c = *victim;
      conns.erase(victim);
      if (conns.empty() && open > limits.max_connections) {
        // Every other connection is being served.
        ++refused;
        reject(c, 503, "the server is at its connection limit");
      } else {
        ++evicted;
        close_conn(c);
      }
    }
  }

  void run_worker(Pool& pool) {
    while (true) {
      Conn* c = nullptr;
      {
        std::unique_lock lk(pool.mu);
        pool.cv.wait(lk, [&] { return stopping || !pool.queue.empty(); });
        if (pool.queue.empty()) return;
        c = pool.queue.front();
        pool.queue.pop_front();
      }
      serve(c);
    }
  }

  void serve(Conn* c) {
    bool keep = false;
    if (!stopping) {
      const int write_ms = static_cast<int>(limits.write_timeout_s * 1000);
      ConnStream strm(*c, write_ms);
      bool connection_closed = false;
      c->pos = 0;
      tl_current = c;
      const bool ok = server.process_request(strm, closing.load(), connection_closed, nullptr);
      tl_current = nullptr;
      // Drop the whole request, also the body of one answered without reading it (a 401 or 415
      // from the pre-routing checks): it must not be taken for the next request.
      c->buf.erase(0, std::min(std::max(c->pos, c->request_end), c->buf.size()));
      c->pos = 0;
      ++c->served;
      keep = ok && !connection_closed && !closing && !stopping;
    }
    {
      std::lock_guard lk(active_mu);
      active.erase(c->fd);
    }
    if (!keep) {
      close_conn(c);
      return;
    }
    c->phase = Conn::Phase::Idle;
    {
      std::lock_guard lk(incoming_mu);
      incoming.push_back(c);
    }
    wake();
  }
};

ConnectionServer::ConnectionServer(const ConnectionLimits& limits) : impl_(std::make_unique<Impl>(*this, limits)) {
  ConnectionLimits& l = impl_->limits;
  if (l.max_connections < 1 || l.worker_threads < 1 || l.probe_threads < 1) throw Error("connection limits must be >= 1");
  for (double t : {l.keepalive_timeout_s, l.header_timeout_s, l.body_timeout_s, l.write_timeout_s})
    if (!(t > 0)) throw Error("connection timeouts must be > 0");
  // Every connection is a descriptor: raise the soft limit to the hard one, and keep the
  // connection cap below it with room for the model files, logs and the listening socket.
  rlimit nofile{};
  if (::getrlimit(RLIMIT_NOFILE, &nofile) == 0) {
    if (nofile.rlim_cur < nofile.rlim_max) {
      rlimit raised = nofile;
      raised.rlim_cur = nofile.rlim_max;
      if (::setrlimit(RLIMIT_NOFILE, &raised) == 0) nofile = raised;
    }
    const auto room = nofile.rlim_cur > 256 ? static_cast<int64_t>(nofile.rlim_cur) - 128 : 64;
    if (room < l.max_connections) {
      spdlog::warn("max_connections {} exceeds what the open-file limit ({}) allows; using {}", l.max_connections,
                   static_cast<int64_t>(nofile.rlim_cur), room);
      l.max_connections = static_cast<int>(room);
    }
  }
  int p[2];
  if (::pipe2(p, O_NONBLOCK | O_CLOEXEC) != 0) throw Error("cannot create the reactor's wake pipe");
  impl_->wake_read = p[0];
  impl_->wake_write = p[1];
  new_task_queue = [] { return new InlineQueue(); };
  set_keep_alive_timeout(static_cast<time_t>(std::max(1.0, l.keepalive_timeout_s)));
  set_keep_alive_max_count(1000000);  // the idle timeout bounds a connection, not a request count

  Impl* m = impl_.get();
  m->reactor = std::thread([m] { m->run_reactor(); });
  for (int i = 0; i < l.worker_threads; ++i) m->main_pool.threads.emplace_back([m] { m->run_worker(m->main_pool); });
  for (int i = 0; i < l.probe_threads; ++i) m->probe_pool.threads.emplace_back([m] { m->run_worker(m->probe_pool); });
}

ConnectionServer::~ConnectionServer() {
  stop_connections();
  ::close(impl_->wake_read);
  ::close(impl_->wake_write);
}

bool ConnectionServer::process_and_close_socket(socket_t sock) {
  Impl& m = *impl_;
  if (m.stopping) {
    ::close(sock);
    return false;
  }
  ++m.accepted;
  ++m.open;
  auto* c = new Conn;
  c->fd = sock;
  {
    std::lock_guard lk(m.incoming_mu);
    m.incoming.push_back(c);
  }
  m.wake();
  return true;
}

void ConnectionServer::abort_active() {
  std::lock_guard lk(impl_->active_mu);
  for (int fd : impl_->active) ::shutdown(fd, SHUT_RDWR);
}

void ConnectionServer::set_closing(bool closing) {
  impl_->closing = closing;
  impl_->wake();
}

void ConnectionServer::stop_connections() {
  Impl& m = *impl_;
  if (m.joined) return;
  m.joined = true;
  m.stopping = true;
  m.wake();
  if (m.reactor.joinable()) m.reactor.join();
  abort_active();
  for (Impl::Pool* pool : {&m.main_pool, &m.probe_pool}) {
    {
      std::lock_guard lk(pool->mu);
    }
    pool->cv.notify_all();
  }
  for (Impl::Pool* pool : {&m.main_pool, &m.probe_pool}) {
    for (std::thread& t : pool->threads) t.join();
    for (Conn* c : pool->queue) m.close_conn(c);
    pool->queue.clear();
  }
  // Workers that finished after the reactor stopped handed their connections back.
  std::lock_guard lk(m.incoming_mu);
  for (Conn* c : m.incoming) m.close_conn(c);
  m.incoming.clear();
}

ConnectionStats ConnectionServer::stats() const {
  const Impl& m = *impl_;
  return {m.open.load(), m.accepted.load(), m.evicted.load(), m.timed_out.load(), m.refused.load(), m.rejected.load()};
}

const ConnectionLimits& ConnectionServer::limits() const { return impl_->limits; }

bool ConnectionServer::client_gone() {
  Conn* c = tl_current;
  if (!c) return false;
  pollfd p{c->fd, POLLIN | POLLRDHUP, 0};
  if (::poll(&p, 1, 0) <= 0) return false;
  return (p.revents & (POLLRDHUP | POLLHUP | POLLERR)) != 0;
}

}  // namespace fineserve
