// A small blocking HTTP client for the benchmarks that drive a running server (cpp-httplib
// underneath, kept out of this header so that its includers need not see cpp-httplib's build
// defines).
#pragma once

#include <memory>
#include <string>
#include <vector>

namespace fineserve {

// One streamed (SSE) response, with when each event arrived.
struct SseTiming {
  int status = 0;                // HTTP status; 0 when no response came
  std::string error;             // why no response came, or the body of a non-200 response
  std::vector<double> event_s;   // arrival of each data event, seconds after the request was sent
  std::vector<std::string> data;  // each event's data
};

class HttpClient {
 public:
  HttpClient(const std::string& host, int port, double timeout_s = 600);
  ~HttpClient();
  HttpClient(const HttpClient&) = delete;
  HttpClient& operator=(const HttpClient&) = delete;

  // POSTs a JSON body and reads the reply as server-sent events.
  SseTiming post_sse(const std::string& path, const std::string& json_body);
  // Plain requests: {status (0: no response), body}.
  std::pair<int, std::string> get(const std::string& path);
  std::pair<int, std::string> post(const std::string& path, const std::string& json_body);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace fineserve
