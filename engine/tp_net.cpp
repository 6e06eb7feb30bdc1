#include "engine/tp_net.h"

#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <thread>

#include "kernels/base.h"

namespace fineserve {
namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

constexpr uint32_t kMagic = 0x50545346;  // "FSTP"
constexpr int32_t kProtocol = 1;
constexpr uint64_t kMaxPayload = 1ull << 30;
enum Kind : uint32_t { Hello = 1, Welcome = 2, Message = 3, Heartbeat = 4, Ready = 5 };

struct Header {
  uint32_t magic;
  uint32_t kind;
  uint64_t length;
};

class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) : fd_(fd) {}
  Fd(Fd&& o) noexcept : fd_(o.fd_) { o.fd_ = -1; }
  Fd& operator=(Fd&& o) noexcept {
    if (this != &o) {
      reset();
      fd_ = o.fd_;
      o.fd_ = -1;
    }
    return *this;
  }
  ~Fd() { reset(); }
  int get() const { return fd_; }
  void reset() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

 private:
  int fd_ = -1;
};

int remaining_ms(Clock::time_point deadline) {
  const auto left = std::chrono::duration_cast<milliseconds>(deadline - Clock::now()).count();
  return static_cast<int>(std::clamp<int64_t>(left, 0, 1 << 30));
}

bool write_all(int fd, const void* data, size_t n) {
  const auto* p = static_cast<const char*>(data);
  while (n > 0) {
    const ssize_t w = ::send(fd, p, n, MSG_NOSIGNAL);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return false;
    p += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}

bool write_frame(int fd, uint32_t kind, const void* payload, size_t n) {
  const Header h{kMagic, kind, n};
  return write_all(fd, &h, sizeof(h)) && (n == 0 || write_all(fd, payload, n));
}

enum class Read { Ok, Eof, Timeout, Error };

Read read_exact(int fd, void* data, size_t n, Clock::time_point deadline) {
  auto* p = static_cast<char*>(data);
  while (n > 0) {
    pollfd pfd{fd, POLLIN, 0};
    const int r = ::poll(&pfd, 1, remaining_ms(deadline));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return Read::Error;
    if (r == 0) return Read::Timeout;
    const ssize_t got = ::recv(fd, p, n, 0);
    if (got < 0 && errno == EINTR) continue;
    // A peer that exits with our data unread in its socket resets the connection instead of
    // closing it: that is the same event for us.
    if (got == 0 || (got < 0 && errno == ECONNRESET)) return Read::Eof;
    if (got < 0) return Read::Error;
    p += got;
    n -= static_cast<size_t>(got);
  }
  return Read::Ok;
}

struct Frame {
  uint32_t kind = 0;
  std::vector<uint8_t> payload;
};

Read read_frame(int fd, Frame& f, Clock::time_point deadline) {
  Header h{};
  if (Read r = read_exact(fd, &h, sizeof(h), deadline); r != Read::Ok) return r;
  if (h.magic != kMagic || h.length > kMaxPayload) return Read::Error;
  f.kind = h.kind;
  f.payload.resize(static_cast<size_t>(h.length));
  return h.length ? read_exact(fd, f.payload.data(), f.payload.size(), deadline) : Read::Ok;
}

void set_nodelay(int fd) {
  int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));  // step plans are small and latency-bound
}

std::string ms_text(milliseconds d) { return std::to_string(d.count()) + " ms"; }

}  // namespace

std::pair<std::string, int> parse_host_port(const std::string& address) {
  const size_t colon = address.rfind(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == address.size())
    throw Error("coordinator address '" + address + "' is not HOST:PORT");
  const std::string port_text = address.substr(colon + 1);
  int port = 0;
  for (char c : port_text) {
    if (c < '0' || c > '9' || port > 65535) throw Error("coordinator address '" + address + "' has a bad port");
    port = port * 10 + (c - '0');
  }
  if (port < 1 || port > 65535) throw Error("coordinator address '" + address + "' has a bad port");
  return {address.substr(0, colon), port};
}

// ---- rank 0 -------------------------------------------------------------------------------------------

struct TpCoordinator::Impl {
  TpNetOptions o;
  Fd listener;
  std::vector<Fd> peers;  // [world]; index 0 unused
  std::vector<std::unique_ptr<std::mutex>> write_mu;
  mutable std::mutex mu;
  std::condition_variable cv;
  int ready = 0;
  bool failed = false;
  std::string why;
  std::function<void(const std::string&)> on_lost;
  std::atomic<bool> stop{false};
  std::thread monitor;
  bool closed = false;

  // Marks the group failed (first reason wins), wakes waiters, and tells the owner once.
  void lose(const std::string& reason) {
    std::function<void(const std::string&)> callback;
    {
      std::lock_guard<std::mutex> lock(mu);
      if (failed) return;
      failed = true;
      why = reason;
      callback = on_lost;
    }
    cv.notify_all();
    if (callback) callback(reason);
  }

  void run_monitor() {
    const int world = o.world;
    std::vector<Clock::time_point> last_seen(static_cast<size_t>(world), Clock::now());
    auto next_beat = Clock::now();
    const int poll_ms = static_cast<int>(std::clamp<int64_t>(o.heartbeat_interval.count() / 2, 1, 100));
    while (!stop.load()) {
      {
        std::lock_guard<std::mutex> lock(mu);
        if (failed) return;
      }
      std::vector<pollfd> fds;
      for (int r = 1; r < world; ++r) fds.push_back({peers[static_cast<size_t>(r)].get(), POLLIN, 0});
      const int n = ::poll(fds.data(), fds.size(), poll_ms);
      if (n < 0 && errno != EINTR) return lose("tensor-parallel coordinator: poll failed: " + std::string(std::strerror(errno)));
      const auto now = Clock::now();
      for (int r = 1; n > 0 && r < world; ++r) {
        if (!(fds[static_cast<size_t>(r - 1)].revents & (POLLIN | POLLHUP | POLLERR))) continue;
        Frame f;
        const Read res = read_frame(peers[static_cast<size_t>(r)].get(), f, now + o.heartbeat_timeout);
        if (res != Read::Ok)
          return lose("tensor-parallel rank " + std::to_string(r) +
                      (res == Read::Eof ? " closed its connection (its process exited?)" : " broke the control protocol"));
        last_seen[static_cast<size_t>(r)] = now;
        if (f.kind == Ready) {
          {
            std::lock_guard<std::mutex> lock(mu);
            ++ready;
          }
          cv.notify_all();
        }
      }
      for (int r = 1; r < world; ++r)
        if (now - last_seen[static_cast<size_t>(r)] > o.heartbeat_timeout)
          return lose("tensor-parallel rank " + std::to_string(r) + " sent nothing for " + ms_text(o.heartbeat_timeout) +
                      " (hung or unreachable)");
      if (now >= next_beat) {
        next_beat = now + o.heartbeat_interval;
        for (int r = 1; r < world; ++r) {
          std::lock_guard<std::mutex> lock(*write_mu[static_cast<size_t>(r)]);
          if (!write_frame(peers[static_cast<size_t>(r)].get(), Heartbeat, nullptr, 0))
            return lose("tensor-parallel rank " + std::to_string(r) + " is unreachable (its connection broke)");
        }
      }
    }
  }
};

TpCoordinator::TpCoordinator(const std::string& host, int port, const TpNetOptions& options)
    : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  m.o = options;
  if (options.world < 1) throw Error("the tensor-parallel size must be >= 1");
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  addrinfo* res = nullptr;
  const std::string port_text = std::to_string(port);
  if (int e = ::getaddrinfo(host.empty() ? nullptr : host.c_str(), port_text.c_str(), &hints, &res); e != 0)
    throw Error("tensor-parallel coordinator: cannot resolve '" + host + "': " + gai_strerror(e));
  std::string last_error = "no address";
  for (addrinfo* a = res; a; a = a->ai_next) {
    Fd fd(::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol));
    if (fd.get() < 0) continue;
    int one = 1;
    ::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (::bind(fd.get(), a->ai_addr, a->ai_addrlen) == 0 && ::listen(fd.get(), 64) == 0) {
      sockaddr_storage bound{};
      socklen_t len = sizeof(bound);
      ::getsockname(fd.get(), reinterpret_cast<sockaddr*>(&bound), &len);
      port_ = ntohs(bound.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port
                                                 : reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
      m.listener = std::move(fd);
      break;
    }
    last_error = std::strerror(errno);
  }
  ::freeaddrinfo(res);
  if (m.listener.get() < 0)
    throw Error("tensor-parallel coordinator: cannot listen on " + host + ":" + port_text + ": " + last_error);
  m.peers.resize(static_cast<size_t>(options.world));
  for (int r = 0; r < options.world; ++r) m.write_mu.push_back(std::make_unique<std::mutex>());
}

TpCoordinator::~TpCoordinator() { close(); }

void TpCoordinator::set_on_lost(std::function<void(const std::string&)> on_lost) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  impl_->on_lost = std::move(on_lost);
}

void TpCoordinator::accept_workers(const std::vector<uint8_t>& blob) {
  Impl& m = *impl_;
  const int world = m.o.world;
  const auto deadline = Clock::now() + m.o.connect_timeout;
  int joined = 1;
  while (joined < world) {
    pollfd pfd{m.listener.get(), POLLIN, 0};
    const int r = ::poll(&pfd, 1, remaining_ms(deadline));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) {
      std::string missing;
      for (int k = 1; k < world; ++k)
        if (m.peers[static_cast<size_t>(k)].get() < 0) missing += (missing.empty() ? "" : ", ") + std::to_string(k);
      throw Error("tensor-parallel bootstrap: rank(s) " + missing + " did not connect to the coordinator on port " +
                  std::to_string(port_) + " within " + ms_text(m.o.connect_timeout));
    }
    Fd conn(::accept4(m.listener.get(), nullptr, nullptr, SOCK_CLOEXEC));
    if (conn.get() < 0) continue;
    set_nodelay(conn.get());
    // A connection that does not say a proper hello promptly is a stranger: drop it and go on.
    Frame hello;
    const auto hello_deadline = std::min(deadline, Clock::now() + std::chrono::seconds(5));
    if (read_frame(conn.get(), hello, hello_deadline) != Read::Ok || hello.kind != Hello || hello.payload.size() != 12)
      continue;
    int32_t v[3];
    std::memcpy(v, hello.payload.data(), sizeof(v));
    const int rank = v[0], their_world = v[1];
    if (v[2] != kProtocol)
      throw Error("tensor-parallel bootstrap: rank " + std::to_string(rank) + " speaks protocol " + std::to_string(v[2]) +
                  ", this coordinator " + std::to_string(kProtocol) + " (mixed FineServe versions?)");
    if (their_world != world)
      throw Error("tensor-parallel bootstrap: rank " + std::to_string(rank) + " was started with --tp " +
                  std::to_string(their_world) + " but the coordinator has --tp " + std::to_string(world));
    if (rank < 1 || rank >= world)
      throw Error("tensor-parallel bootstrap: a worker says it is rank " + std::to_string(rank) + ", outside 1.." +
                  std::to_string(world - 1));
    if (m.peers[static_cast<size_t>(rank)].get() >= 0)
      throw Error("tensor-parallel bootstrap: two workers say they are rank " + std::to_string(rank));
    m.peers[static_cast<size_t>(rank)] = std::move(conn);
    ++joined;
  }
  for (int r = 1; r < world; ++r)
    if (!write_frame(m.peers[static_cast<size_t>(r)].get(), Welcome, blob.data(), blob.size()))
      throw Error("tensor-parallel bootstrap: rank " + std::to_string(r) + " went away during the handshake");
  m.listener.reset();
  if (world > 1) m.monitor = std::thread([&m] { m.run_monitor(); });
}

void TpCoordinator::wait_ready(std::chrono::milliseconds timeout) {
  Impl& m = *impl_;
  std::unique_lock<std::mutex> lock(m.mu);
  const bool done = m.cv.wait_for(lock, timeout, [&] { return m.failed || m.ready >= m.o.world - 1; });
  if (m.failed) throw CommError(m.why);
  if (!done)
    throw CommError("tensor-parallel bootstrap: " + std::to_string(m.o.world - 1 - m.ready) +
                    " rank(s) did not finish loading within " + ms_text(timeout));
}

bool TpCoordinator::failed(std::string* why) const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  if (why) *why = impl_->why;
  return impl_->failed;
}

void TpCoordinator::send(const std::vector<int32_t>& words) {
  Impl& m = *impl_;
  std::string why;
  if (failed(&why)) throw CommError(why);
  for (int r = 1; r < m.o.world; ++r) {
    std::lock_guard<std::mutex> lock(*m.write_mu[static_cast<size_t>(r)]);
    if (!write_frame(m.peers[static_cast<size_t>(r)].get(), Message, words.data(), words.size() * 4)) {
      m.lose("tensor-parallel rank " + std::to_string(r) + " is unreachable (its connection broke)");
      failed(&why);
      throw CommError(why);
    }
  }
}

void TpCoordinator::abort(const std::string& why) noexcept {
  Impl& m = *impl_;
  m.lose(why);
  // The workers see their connection end and exit (non-zero) instead of waiting for plans.
  for (auto& p : m.peers)
    if (p.get() >= 0) ::shutdown(p.get(), SHUT_RDWR);
}

void TpCoordinator::close() noexcept {
  Impl& m = *impl_;
  if (m.closed) return;
  m.closed = true;
  const bool ok = !failed();
  if (ok && m.monitor.joinable()) {
    const std::vector<int32_t> bye = encode_tp_message(TpMessage{TpMessage::Kind::Shutdown, {}, 0, 0});
    for (int r = 1; r < m.o.world; ++r) {
      std::lock_guard<std::mutex> lock(*m.write_mu[static_cast<size_t>(r)]);
      write_frame(m.peers[static_cast<size_t>(r)].get(), Message, bye.data(), bye.size() * 4);
    }
  }
  m.stop = true;
  if (m.monitor.joinable()) m.monitor.join();
  // Give the workers a moment to finish and close their ends (EOF), so they exit first.
  if (ok) {
    const auto deadline = Clock::now() + m.o.heartbeat_timeout;
    for (int r = 1; r < m.o.world; ++r) {
      const int fd = m.peers[static_cast<size_t>(r)].get();
      if (fd < 0) continue;
      Frame f;
      while (read_frame(fd, f, deadline) == Read::Ok) {
      }
    }
  }
  for (auto& p : m.peers) p.reset();
}

// ---- workers ------------------------------------------------------------------------------------------

struct TpWorkerLink::Impl {
  TpNetOptions o;
  int rank = 0;
  Fd fd;
  std::vector<uint8_t> blob;
  std::mutex write_mu;
  std::mutex stop_mu;
  std::condition_variable stop_cv;
  bool stop = false;
  std::thread beat;

  void run_heartbeat() {
    std::unique_lock<std::mutex> lock(stop_mu);
    while (!stop_cv.wait_for(lock, o.heartbeat_interval, [&] { return stop; })) {
      std::lock_guard<std::mutex> w(write_mu);
      if (!write_frame(fd.get(), Heartbeat, nullptr, 0)) return;  // receive() reports the loss
    }
  }
};

TpWorkerLink::TpWorkerLink(const std::string& host, int port, int rank, const TpNetOptions& options)
    : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  m.o = options;
  m.rank = rank;
  const auto deadline = Clock::now() + options.connect_timeout;
  const std::string where = host + ":" + std::to_string(port);
  std::string last_error;
  // Rank 0 may still be starting: retry until the deadline.
  while (m.fd.get() < 0) {
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    addrinfo* res = nullptr;
    if (int e = ::getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &res); e != 0) {
      last_error = gai_strerror(e);
    } else {
      for (addrinfo* a = res; a && m.fd.get() < 0; a = a->ai_next) {
        Fd fd(::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol));
        if (fd.get() >= 0 && ::connect(fd.get(), a->ai_addr, a->ai_addrlen) == 0)
          m.fd = std::move(fd);
        else
          last_error = std::strerror(errno);
      }
      ::freeaddrinfo(res);
    }
    if (m.fd.get() >= 0) break;
    if (Clock::now() >= deadline)
      throw Error("tensor-parallel rank " + std::to_string(rank) + ": cannot reach the coordinator at " + where +
                  " within " + ms_text(options.connect_timeout) + " (" + last_error + ")");
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  set_nodelay(m.fd.get());
  const int32_t hello[3] = {rank, options.world, kProtocol};
  if (!write_frame(m.fd.get(), Hello, hello, sizeof(hello)))
    throw Error("tensor-parallel rank " + std::to_string(rank) + ": the coordinator at " + where + " hung up");
  Frame f;
  const Read r = read_frame(m.fd.get(), f, deadline);
  if (r != Read::Ok || f.kind != Welcome)
    throw Error("tensor-parallel rank " + std::to_string(rank) + ": no bootstrap from the coordinator at " + where +
                (r == Read::Timeout ? " within " + ms_text(options.connect_timeout) : std::string(" (it refused this rank; see its log)")));
  m.blob = std::move(f.payload);
  m.beat = std::thread([&m] { m.run_heartbeat(); });
}

TpWorkerLink::~TpWorkerLink() {
  Impl& m = *impl_;
  {
    std::lock_guard<std::mutex> lock(m.stop_mu);
    m.stop = true;
  }
  m.stop_cv.notify_all();
  if (m.beat.joinable()) m.beat.join();
}

const std::vector<uint8_t>& TpWorkerLink::blob() const { return impl_->blob; }

void TpWorkerLink::ready() {
  std::lock_guard<std::mutex> lock(impl_->write_mu);
  if (!write_frame(impl_->fd.get(), Ready, nullptr, 0))
    throw CommError("tensor-parallel rank " + std::to_string(impl_->rank) + ": the coordinator hung up");
}

TpMessage TpWorkerLink::receive() {
  Impl& m = *impl_;
  for (;;) {
    Frame f;
    const Read r = read_frame(m.fd.get(), f, Clock::now() + m.o.heartbeat_timeout);
    const std::string me = "tensor-parallel rank " + std::to_string(m.rank) + ": ";
    if (r == Read::Timeout) throw CommError(me + "rank 0 sent nothing for " + ms_text(m.o.heartbeat_timeout) + " (hung or gone)");
    if (r == Read::Eof) throw CommError(me + "rank 0 closed the connection");
    if (r == Read::Error) throw CommError(me + "the control connection broke");
    if (f.kind == Heartbeat) continue;
    if (f.kind != Message || f.payload.size() % 4 != 0) throw CommError(me + "unexpected frame from rank 0");
    std::vector<int32_t> words(f.payload.size() / 4);
    std::memcpy(words.data(), f.payload.data(), f.payload.size());
    return decode_tp_message(words.data(), words.size());
  }
}

}  // namespace fineserve
