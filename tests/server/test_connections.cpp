// The connection layer under hostile traffic (server/http_connections.h): slow senders and idle
// connects cannot starve /health, deadlines drop them, the head is checked before any handler
// runs, and a port in use is refused. Loopback only; connection counts stay modest so that the
// descriptors of both ends fit CI's limits.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdio>

#include "server_util.h"

namespace fineserve {
namespace {

using json = nlohmann::json;
using namespace fineserve::testing;
using Clock = std::chrono::steady_clock;

// A raw client socket (blocking, 5 s receive timeout): -1 when the connect failed.
int connect_to(int port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return -1;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    ::close(fd);
    return -1;
  }
  timeval tv{5, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  return fd;
}

bool send_all(int fd, const std::string& s) {
  return ::send(fd, s.data(), s.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(s.size());
}

// Everything the server writes until it closes the connection (or 5 s of silence).
std::string read_until_close(int fd) {
  std::string out;
  char buf[4096];
  ssize_t n;
  while ((n = ::recv(fd, buf, sizeof buf, 0)) > 0) out.append(buf, static_cast<size_t>(n));
  return out;
}

int status_of(const std::string& response) {
  if (response.rfind("HTTP/1.1 ", 0) != 0) return 0;
  return std::atoi(response.c_str() + 9);
}

// GET /health on a fresh connection with a 1 s budget for connect and answer: its latency in
// seconds, or -1 when it did not answer within the second.
double health_latency(int port) {
  httplib::Client c("127.0.0.1", port);
  c.set_connection_timeout(std::chrono::seconds(1));
  c.set_read_timeout(std::chrono::seconds(1));
  const auto t0 = Clock::now();
  auto res = c.Get("/health");
  const double s = std::chrono::duration<double>(Clock::now() - t0).count();
  return res && res->status == 200 ? s : -1;
}

TestServerOptions small_server() {
  TestServerOptions o;
  o.http.threads = 8;  // few workers: an attack that pinned threads would show at once
  return o;
}

// 120 connections send a request head one byte a second. Before the connection layer each held a
// worker thread (and /health timed out); now they cost no thread, /health answers within a
// second throughout, and the header deadline drops them with 408.
TEST(HttpAttacks, TrickleAttackLeavesHealthAnsweringAndIsDropped) {
  TestServerOptions o = small_server();
  o.http.header_timeout_s = 2;
  TestServer s(o);
  constexpr int kConns = 120;
  std::vector<int> fds;
  for (int i = 0; i < kConns; ++i) {
    const int fd = connect_to(s.port);
    ASSERT_GE(fd, 0);
    fds.push_back(fd);
  }
  const std::string head = "POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n";
  std::vector<double> latencies;
  for (size_t round = 0; round < 4; ++round) {  // one byte per connection a second, then silence
    if (round < 2)
      for (int fd : fds) send_all(fd, std::string(1, head[round]));
    for (int probe = 0; probe < 4; ++probe) {
      latencies.push_back(health_latency(s.port));
      std::this_thread::sleep_for(std::chrono::milliseconds(250) - std::chrono::duration<double>(std::max(0.0, latencies.back())));
    }
  }
  // Every trickling connection was answered 408 by the header deadline and closed.
  int timed_out = 0;
  for (int fd : fds) {
    const std::string r = read_until_close(fd);
    if (status_of(r) == 408) ++timed_out;
    ::close(fd);
  }
  const double worst = *std::max_element(latencies.begin(), latencies.end());
  std::printf("trickle attack: %d connections, /health probes %zu, worst latency %.4f s, 408s %d\n", kConns,
              latencies.size(), worst, timed_out);
  ::testing::Test::RecordProperty("trickle_worst_health_latency_s", std::to_string(worst));
  for (double l : latencies) EXPECT_GE(l, 0) << "/health did not answer within 1 s during the trickle attack";
  EXPECT_EQ(timed_out, kConns);
  EXPECT_GE(s.http->connection_stats().timed_out, kConns);
}

// 300 connects that never send a byte: /health answers within a second while they are held, and
// the keep-alive timeout closes them.
TEST(HttpAttacks, IdleConnectFloodLeavesHealthAnswering) {
  TestServerOptions o = small_server();
  o.http.keepalive_timeout_s = 1.5;
  TestServer s(o);
  constexpr int kConns = 300;
  std::vector<int> fds;
  for (int i = 0; i < kConns; ++i) {
    const int fd = connect_to(s.port);
    ASSERT_GE(fd, 0);
    fds.push_back(fd);
  }
  ASSERT_TRUE(eventually([&] { return s.http->connection_stats().accepted >= kConns; }));
  std::vector<double> latencies;
  for (int i = 0; i < 5; ++i) latencies.push_back(health_latency(s.port));
  // The idle timeout closes them: each client sees EOF (no response: it never asked).
  int closed = 0;
  for (int fd : fds) {
    if (read_until_close(fd).empty()) ++closed;
    ::close(fd);
  }
  const double worst = *std::max_element(latencies.begin(), latencies.end());
  std::printf("idle flood: %d connections, worst /health latency %.4f s, closed by the server %d\n", kConns, worst, closed);
  ::testing::Test::RecordProperty("idle_flood_worst_health_latency_s", std::to_string(worst));
  for (double l : latencies) EXPECT_GE(l, 0) << "/health did not answer within 1 s during the idle flood";
  EXPECT_EQ(closed, kConns);
}

// At max_connections the connections that waited longest are closed to make room, so a flood
// larger than the limit cannot lock out the next client.
TEST(HttpAttacks, FloodBeyondMaxConnectionsEvictsTheOldest) {
  TestServerOptions o = small_server();
  o.http.max_connections = 40;
  TestServer s(o);
  std::vector<int> fds;
  for (int i = 0; i < 100; ++i) {
    const int fd = connect_to(s.port);
    ASSERT_GE(fd, 0);
    fds.push_back(fd);
  }
  ASSERT_TRUE(eventually([&] { return s.http->connection_stats().accepted >= 100; }));
  EXPECT_GE(health_latency(s.port), 0);
  auto c = s.client();
  EXPECT_EQ(post(*c, "/generate", json{{"inputs", "x"}, {"parameters", {{"max_new_tokens", 1}}}}).status, 200);
  const ConnectionStats st = s.http->connection_stats();
  EXPECT_GE(st.evicted, 60);
  EXPECT_LE(st.open, 40);
  for (int fd : fds) ::close(fd);
}

// A request whose body trickles in is dropped by the body deadline.
TEST(HttpAttacks, SlowBodyIsDroppedWith408) {
  TestServerOptions o = small_server();
  o.http.body_timeout_s = 1;
  TestServer s(o);
  const int fd = connect_to(s.port);
  ASSERT_GE(fd, 0);
  ASSERT_TRUE(send_all(fd, "POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"));
  const std::string r = read_until_close(fd);
  ::close(fd);
  EXPECT_EQ(status_of(r), 408) << r;
  EXPECT_NE(r.find("\"error_type\":\"timeout\""), std::string::npos) << r;
}

// Probes have threads of their own: with every worker busy streaming, /health still answers.
TEST(HttpAttacks, ProbesAnswerWhileEveryWorkerIsBusy) {
  TestServerOptions o;
  o.http.threads = 2;
  TestServer s(o);
  s.model->set_open(false);
  std::vector<std::thread> streams;
  for (int i = 0; i < 2; ++i)
    streams.emplace_back([&] {
      auto c = s.client();
      post_stream(*c, "/generate_stream", json{{"inputs", "And God said"}, {"parameters", {{"max_new_tokens", 2}}}});
    });
  ASSERT_TRUE(s.model->wait_blocked());
  ASSERT_TRUE(eventually([&] { return s.http->open_responses() == 2; }));
  EXPECT_GE(health_latency(s.port), 0);
  auto c = s.client(5);
  EXPECT_EQ(get(*c, "/ready").status, 200);
  EXPECT_NE(get(*c, "/metrics").body.find("fineserve_num_requests_running"), std::string::npos);
  s.model->set_open(true);
  for (auto& t : streams) t.join();
}

// ---- the request head is checked before any handler ---------------------------------------------

std::string round_trip(int port, const std::string& request) {
  const int fd = connect_to(port);
  if (fd < 0) return "";
  send_all(fd, request);
  std::string r = read_until_close(fd);
  ::close(fd);
  return r;
}

TEST(HttpHead, LongUriIs414AtOnce) {
  TestServer s(small_server());
  const std::string r = round_trip(s.port, "GET /" + std::string(10000, 'a') + " HTTP/1.1\r\nHost: x\r\n\r\n");
  EXPECT_EQ(status_of(r), 414) << r.substr(0, 200);
  EXPECT_NE(r.find("\"error_type\":\"bad_request\""), std::string::npos);
  // Over the limit before the line even ends: answered without waiting for the rest.
  const int fd = connect_to(s.port);
  ASSERT_GE(fd, 0);
  send_all(fd, "GET /" + std::string(9000, 'b'));
  const std::string early = read_until_close(fd);
  ::close(fd);
  EXPECT_EQ(status_of(early), 414) << early.substr(0, 200);
}

TEST(HttpHead, ChunkedWithContentLengthIs400) {
  TestServer s(small_server());
  const std::string r = round_trip(s.port,
                                 "POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                 "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n");
  EXPECT_EQ(status_of(r), 400) << r;
  EXPECT_NE(r.find("Transfer-Encoding"), std::string::npos) << r;
  EXPECT_EQ(status_of(round_trip(s.port, "POST /generate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n")), 501);
  EXPECT_EQ(status_of(round_trip(s.port, "POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n")), 413);
}

TEST(HttpHead, ChunkedBodyExpectContinueAndPipelining) {
  TestServer s(small_server());
  const std::string body = json{{"inputs", "And God said"}, {"parameters", {{"max_new_tokens", 2}}}}.dump();
  char size[16];
  std::snprintf(size, sizeof size, "%zx", body.size());
  std::string r = round_trip(s.port, "POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
                                   "Transfer-Encoding: chunked\r\n\r\n" + std::string(size) + "\r\n" + body + "\r\n0\r\n\r\n");
  EXPECT_EQ(status_of(r), 200) << r;
  EXPECT_NE(r.find("generated_text"), std::string::npos) << r;

  // Expect: 100-continue gets its interim response before the body is sent.
  const int fd = connect_to(s.port);
  ASSERT_GE(fd, 0);
  send_all(fd, "POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\nExpect: 100-continue\r\n"
               "Content-Length: " + std::to_string(body.size()) + "\r\n\r\n");
  char buf[64] = {};
  ASSERT_GT(::recv(fd, buf, sizeof buf - 1, 0), 0);
  EXPECT_EQ(std::string(buf).rfind("HTTP/1.1 100", 0), 0u) << buf;
  send_all(fd, body);
  r = read_until_close(fd);
  ::close(fd);
  EXPECT_EQ(status_of(r), 200) << r;

  // Two requests in one write: two responses, in order.
  const std::string one = "GET /health HTTP/1.1\r\nHost: x\r\n\r\n";
  r = round_trip(s.port, one + "GET /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
  EXPECT_EQ(std::count(r.begin(), r.end(), '{') >= 2, true) << r;
  EXPECT_NE(r.find("\"ok\""), std::string::npos);
  EXPECT_NE(r.find("\"ready\""), std::string::npos);
}

TEST(HttpHead, JsonRoutesNeedJsonContentType) {
  TestServer s(small_server());
  auto c = s.client();
  const std::string body = json{{"inputs", "x"}, {"parameters", {{"max_new_tokens", 1}}}}.dump();
  auto plain = c->Post("/generate", body, "text/plain");
  ASSERT_TRUE(plain);
  EXPECT_EQ(plain->status, 415);
  EXPECT_EQ(json::parse(plain->body)["error_type"], "bad_request");
  auto form = c->Post("/v1/completions", json{{"prompt", "x"}, {"max_tokens", 1}}.dump(), "application/x-www-form-urlencoded");
  ASSERT_TRUE(form);
  EXPECT_EQ(form->status, 415);
  EXPECT_TRUE(json::parse(form->body)["error"].is_object());  // OpenAI's shape
  EXPECT_EQ(status_of(round_trip(s.port, "POST /generate HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: " +
                                           std::to_string(body.size()) + "\r\n\r\n" + body)),
            415);
  auto charset = c->Post("/generate", body, "application/json; charset=utf-8");
  ASSERT_TRUE(charset);
  EXPECT_EQ(charset->status, 200) << charset->body;
}

// A second server on a port in use fails with a clear error instead of sharing it (SO_REUSEPORT).
TEST(HttpHead, PortInUseIsRefused) {
  TestServer s(small_server());
  Metrics m;
  HttpConfig c;
  c.port = s.port;
  HttpServer second(c, m);
  try {
    second.bind();
    FAIL() << "bound a port that is in use";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("already in use"), std::string::npos) << e.what();
  }
}

// Keep-alive connections are kept between requests and closed after the idle timeout.
TEST(HttpHead, KeepAliveIdleTimeout) {
  TestServerOptions o = small_server();
  o.http.keepalive_timeout_s = 0.5;
  TestServer s(o);
  const int fd = connect_to(s.port);
  ASSERT_GE(fd, 0);
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(send_all(fd, "GET /health HTTP/1.1\r\nHost: x\r\n\r\n"));
    std::string response;
    char buf[1024];
    while (response.find("{\"status\":\"ok\"}") == std::string::npos) {
      const ssize_t n = ::recv(fd, buf, sizeof buf, 0);
      ASSERT_GT(n, 0) << response;
      response.append(buf, static_cast<size_t>(n));
    }
    EXPECT_EQ(status_of(response), 200);
  }
  EXPECT_EQ(read_until_close(fd), "");  // then idle: closed by the server
  ::close(fd);
}

}  // namespace
}  // namespace fineserve
