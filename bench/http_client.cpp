#include "bench/http_client.h"

#include <httplib.h>

#include <chrono>

#include "server/sse.h"

namespace fineserve {

struct HttpClient::Impl {
  httplib::Client client;
  Impl(const std::string& host, int port) : client(host, port) {}
};

HttpClient::HttpClient(const std::string& host, int port, double timeout_s) : impl_(std::make_unique<Impl>(host, port)) {
  impl_->client.set_read_timeout(std::chrono::duration<double>(timeout_s));
  impl_->client.set_write_timeout(std::chrono::duration<double>(timeout_s));
  impl_->client.set_connection_timeout(std::chrono::seconds(10));
  impl_->client.set_tcp_nodelay(true);
}

HttpClient::~HttpClient() = default;

SseTiming HttpClient::post_sse(const std::string& path, const std::string& json_body) {
  SseTiming t;
  SseParser parser;
  std::string raw;
  httplib::Request req;
  req.method = "POST";
  req.path = path;
  req.body = json_body;
  req.set_header("Content-Type", "application/json");
  req.set_header("Accept", "text/event-stream");
  const auto start = std::chrono::steady_clock::now();
  req.content_receiver = [&](const char* data, size_t n, uint64_t, uint64_t) {
    const double now = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    raw.append(data, n);
    for (SseEvent& e : parser.feed(std::string_view(data, n))) {
      t.event_s.push_back(now);
      t.data.push_back(std::move(e.data));
    }
    return true;
  };
  auto res = impl_->client.send(req);
  if (!res) {
    t.error = httplib::to_string(res.error());
    return t;
  }
  t.status = res->status;
  if (t.status != 200) t.error = raw.empty() ? res->body : raw;
  return t;
}

std::pair<int, std::string> HttpClient::get(const std::string& path) {
  auto res = impl_->client.Get(path);
  if (!res) return {0, httplib::to_string(res.error())};
  return {res->status, res->body};
}

std::pair<int, std::string> HttpClient::post(const std::string& path, const std::string& json_body) {
  auto res = impl_->client.Post(path, json_body, "application/json");
  if (!res) return {0, httplib::to_string(res.error())};
  return {res->status, res->body};
}

}  // namespace fineserve
