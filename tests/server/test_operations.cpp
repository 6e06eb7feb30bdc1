// Operating the server: API key, request ids and the access log, CORS, vLLM-named metrics, the
// statuses of late failures, health after engine faults, and burst admission.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <spdlog/sinks/ostream_sink.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <fstream>
#include <sstream>

#include "server/serve.h"
#include "server_util.h"
#include "tests/scratch_dir.h"

namespace fineserve {
namespace {

using json = nlohmann::json;
using namespace fineserve::testing;

Reply post_with(httplib::Client& c, const std::string& path, const json& body, const httplib::Headers& headers) {
  Reply r;
  auto res = c.Post(path, headers, body.dump(), "application/json");
  if (!res) return r;
  r.status = res->status;
  r.body = res->body;
  r.headers = res->headers;
  return r;
}

Reply get_with(httplib::Client& c, const std::string& path, const httplib::Headers& headers) {
  Reply r;
  auto res = c.Get(path, headers);
  if (!res) return r;
  r.status = res->status;
  r.body = res->body;
  r.headers = res->headers;
  return r;
}

void expect_tgi_error(const Reply& r, int status, const std::string& type) {
  EXPECT_EQ(r.status, status) << r.body;
  const json j = json::parse(r.body, nullptr, false);
  ASSERT_TRUE(j.is_object()) << r.body;
  EXPECT_EQ(j["error_type"], type) << r.body;
}

const json kShort = {{"inputs", "And God said"}, {"parameters", {{"max_new_tokens", 2}}}};

TEST(ApiKey, GenerationRoutesNeedTheKeyProbesDoNot) {
  TestServerOptions o;
  o.http.api_key = "s3cret-key";
  TestServer s(o);
  auto c = s.client();
  const Reply none = post(*c, "/generate", kShort);
  EXPECT_EQ(none.status, 401);
  EXPECT_EQ(none.json()["error_type"], "authentication_error") << none.body;
  EXPECT_EQ(none.headers.find("WWW-Authenticate")->second, "Bearer");
  const Reply openai = post_with(*c, "/v1/completions", {{"prompt", "x"}, {"max_tokens", 1}}, {{"Authorization", "Bearer wrong"}});
  EXPECT_EQ(openai.status, 401);
  EXPECT_EQ(openai.json()["error"]["type"], "authentication_error") << openai.body;
  EXPECT_EQ(post_with(*c, "/generate", kShort, {{"Authorization", "Bearer s3cret-keyX"}}).status, 401);
  EXPECT_EQ(post_with(*c, "/generate", kShort, {{"Authorization", "Bearer s3cret-ke"}}).status, 401);
  EXPECT_EQ(post_with(*c, "/generate", kShort, {{"Authorization", "s3cret-key"}}).status, 401);
  EXPECT_EQ(get(*c, "/v1/models").status, 401);
  EXPECT_EQ(post_with(*c, "/generate", kShort, {{"Authorization", "Bearer s3cret-key"}}).status, 200);
  EXPECT_EQ(get_with(*c, "/v1/models", {{"Authorization", "Bearer s3cret-key"}}).status, 200);
  // Probes and metrics are exempt.
  EXPECT_EQ(get(*c, "/health").status, 200);
  EXPECT_EQ(get(*c, "/ready").status, 200);
  EXPECT_EQ(get(*c, "/metrics").status, 200);
}

TEST(RequestId, EchoedGeneratedAndLogged) {
  std::ostringstream log;
  auto sink = std::make_shared<spdlog::sinks::ostream_sink_mt>(log);
  spdlog::default_logger()->sinks().push_back(sink);
  {
    TestServer s;
    auto c = s.client();
    const Reply given = post_with(*c, "/generate", kShort, {{"X-Request-Id", "trace-42"}});
    ASSERT_EQ(given.status, 200);
    EXPECT_EQ(given.headers.find("X-Request-Id")->second, "trace-42");
    const Reply a = post(*c, "/generate", kShort), b = get(*c, "/health");
    const std::string ida = a.headers.find("X-Request-Id")->second, idb = b.headers.find("X-Request-Id")->second;
    EXPECT_FALSE(ida.empty());
    EXPECT_NE(ida, idb);
    // Not a short printable token: replaced.
    const Reply odd = post_with(*c, "/generate", kShort, {{"X-Request-Id", std::string(300, 'x')}});
    EXPECT_NE(odd.headers.find("X-Request-Id")->second, std::string(300, 'x'));
    // Streams too.
    httplib::Request req;
    req.method = "POST";
    req.path = "/generate_stream";
    req.body = kShort.dump();
    req.set_header("Content-Type", "application/json");
    req.set_header("X-Request-Id", "stream-7");
    auto res = c->send(req);
    ASSERT_TRUE(res);
    EXPECT_EQ(res->get_header_value("X-Request-Id"), "stream-7");
  }
  spdlog::default_logger()->flush();
  auto& sinks = spdlog::default_logger()->sinks();
  sinks.erase(std::remove(sinks.begin(), sinks.end(), sink), sinks.end());
  // One JSON access line per request, with what an operator needs.
  const std::string text = log.str();
  const size_t at = text.find("\"request_id\":\"trace-42\"");
  ASSERT_NE(at, std::string::npos) << text;
  const size_t begin = text.rfind('{', at), end = text.find('\n', at);
  const json line = json::parse(text.substr(begin, end - begin));
  EXPECT_EQ(line["route"], "/generate");
  EXPECT_EQ(line["status"], 200);
  EXPECT_GT(line["prompt_tokens"].get<int>(), 0);
  EXPECT_EQ(line["generated_tokens"], 2);
  EXPECT_GE(line["ttft_s"].get<double>(), 0);
  EXPECT_GE(line["duration_s"].get<double>(), line["ttft_s"].get<double>());
  EXPECT_EQ(line["finish_reason"], "length");
  EXPECT_NE(text.find("\"request_id\":\"stream-7\""), std::string::npos) << text;
}

TEST(Cors, OffByDefaultOnWhenConfigured) {
  {
    TestServer s;
    auto c = s.client();
    const Reply r = post_with(*c, "/generate", kShort, {{"Origin", "https://app.example"}});
    EXPECT_EQ(r.status, 200);
    EXPECT_EQ(r.headers.count("Access-Control-Allow-Origin"), 0u);
  }
  TestServerOptions o;
  o.http.cors_allow_origin = "https://app.example";
  TestServer s(o);
  auto c = s.client();
  const Reply r = post_with(*c, "/generate", kShort, {{"Origin", "https://app.example"}});
  EXPECT_EQ(r.headers.find("Access-Control-Allow-Origin")->second, "https://app.example");
  auto pre = c->Options("/v1/chat/completions", {{"Origin", "https://app.example"}, {"Access-Control-Request-Method", "POST"}});
  ASSERT_TRUE(pre);
  EXPECT_EQ(pre->status, 204);
  EXPECT_NE(pre->get_header_value("Access-Control-Allow-Methods").find("POST"), std::string::npos);
}

TEST(Metrics, ModelNameLabelAndVllmNames) {
  TestServerOptions o;
  o.metrics = {"opt-preln", true};
  TestServer s(o);
  auto c = s.client();
  ASSERT_EQ(post(*c, "/v1/completions", json{{"prompt", "And God said"}, {"max_tokens", 3}}).status, 200);
  const std::string m = get(*c, "/metrics").body;
  const std::string label = "model_name=\"opt-preln\"";
  EXPECT_GT(metric_value(m, "fineserve_prompt_tokens_total", label), 0) << m;
  EXPECT_GT(metric_value(m, "vllm:prompt_tokens_total", label), 0) << m;
  EXPECT_EQ(metric_value(m, "vllm:generation_tokens_total", label), 3);
  EXPECT_EQ(metric_value(m, "vllm:time_to_first_token_seconds_count", label), 1);
  EXPECT_EQ(metric_value(m, "vllm:e2e_request_latency_seconds_count", label), 1);
  EXPECT_EQ(metric_value(m, "vllm:request_success_total", "finished_reason=\"length\""), 1);
  for (const char* name : {"vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:gpu_cache_usage_perc", "vllm:kv_cache_usage_perc"})
    EXPECT_GE(metric_value(m, name, label), 0) << name;
  // Off by default.
  TestServer plain;
  auto pc = plain.client();
  EXPECT_EQ(get(*pc, "/metrics").body.find("vllm:"), std::string::npos);
}

// ---- statuses of late failures -------------------------------------------------------------------

TEST(LateFailure, ShutdownIs503ForNonStreaming) {
  TestServer s;
  s.model->set_open(false);
  Reply r;
  std::thread t([&] {
    auto c = s.client();
    r = post(*c, "/v1/completions", json{{"prompt", "And God said"}, {"max_tokens", 20}});
  });
  ASSERT_TRUE(s.model->wait_blocked());
  std::thread opener([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    s.model->set_open(true);
  });
  EXPECT_FALSE(s.http->drain(std::chrono::milliseconds(100)));
  opener.join();
  t.join();
  EXPECT_EQ(r.status, 503) << r.body;
  EXPECT_EQ(r.json()["error"]["type"], "unavailable") << r.body;
}

TEST(LateFailure, EngineFaultIs500AndRepeatedFaultsMakeHealthUnhealthy) {
  TestServer s;
  auto c = s.client();
  s.model->fail_forwards = 1;
  const Reply r = post(*c, "/generate", kShort);
  EXPECT_EQ(r.status, 500) << r.body;
  EXPECT_EQ(r.json()["error_type"], "internal") << r.body;
  EXPECT_EQ(get(*c, "/health").status, 200) << "one failed step is not a sick engine";
  // Streaming keeps its 200 and reports the fault in an error event (the gate holds the step
  // until the stream has started).
  s.model->set_open(false);
  StreamReply st;
  std::thread t([&] {
    auto sc = s.client();
    st = post_stream(*sc, "/generate_stream", kShort);
  });
  ASSERT_TRUE(s.model->wait_blocked());
  ASSERT_TRUE(eventually([&] { return s.http->open_responses() == 1; }));
  std::this_thread::sleep_for(std::chrono::milliseconds(100));  // the stream's headers go out
  s.model->fail_forwards = 1;
  s.model->set_open(true);
  t.join();
  EXPECT_EQ(st.status, 200);
  ASSERT_FALSE(st.events.empty());
  EXPECT_EQ(json::parse(st.events.back().data)["error_type"], "internal") << st.raw;
  // Three steps in a row fail: /health and /ready say so.
  s.model->fail_forwards = 3;
  for (int i = 0; i < 3; ++i) EXPECT_EQ(post(*c, "/generate", kShort).status, 500);
  const Reply h = get(*c, "/health");
  EXPECT_EQ(h.status, 503);
  EXPECT_EQ(h.json()["status"], "unhealthy") << h.body;
  EXPECT_EQ(get(*c, "/ready").status, 503);
  // A good step again: healthy.
  EXPECT_EQ(post(*c, "/generate", kShort).status, 200);
  EXPECT_EQ(get(*c, "/health").status, 200);
  EXPECT_EQ(get(*c, "/ready").status, 200);
}

// A burst is admitted up to exactly max_seqs running + max_queue waiting; the next one gets 429.
TEST(Admission, BurstAdmitsMaxSeqsPlusMaxQueue) {
  TestServerOptions o;
  o.engine.max_seqs = 2;
  o.loop.max_queue = 3;
  TestServer s(o);
  s.model->set_open(false);
  const json req = {{"inputs", "And God said"}, {"parameters", {{"max_new_tokens", 2}}}};
  std::vector<Reply> replies(5);
  std::vector<std::thread> threads;
  for (int i = 0; i < 5; ++i)
    threads.emplace_back([&, i] {
      auto c = s.client();
      replies[i] = post(*c, "/generate", req);
    });
  ASSERT_TRUE(eventually([&] { return s.loop->in_flight() == 5; })) << s.loop->in_flight();
  auto c = s.client();
  expect_tgi_error(post(*c, "/generate", req), 429, "overloaded");
  s.model->set_open(true);
  for (auto& t : threads) t.join();
  for (const Reply& r : replies) EXPECT_EQ(r.status, 200) << r.body;
}


// The connection, security and metrics keys of configs/server.json.
TEST(ServerConfig, OperationsKeys) {
  ServeOptions o = default_serve_options();
  load_server_config("configs/server.json", o);
  EXPECT_EQ(o.http.max_connections, 1024);
  EXPECT_TRUE(o.http.prompt_special_tokens);
  EXPECT_TRUE(o.http.cors_allow_origin.empty());
  EXPECT_FALSE(o.vllm_metrics);
  apply_server_config(json{{"max_connections", 10}, {"header_timeout_s", 2.5}, {"prompt_special_tokens", false},
                           {"vllm_metrics", true}, {"cors_allow_origin", "*"}},
                      "test", o);
  EXPECT_EQ(o.http.max_connections, 10);
  EXPECT_DOUBLE_EQ(o.http.header_timeout_s, 2.5);
  EXPECT_FALSE(o.http.prompt_special_tokens);
  EXPECT_TRUE(o.vllm_metrics);
  EXPECT_THROW(apply_server_config(json{{"max_connections", 0}}, "test", o), Error);
  EXPECT_THROW(apply_server_config(json{{"api_key", "inline"}}, "test", o), Error) << "keys do not belong in the config";
  ScratchDir dir;
  std::ofstream(dir / "key") << "  k-1  \n";
  o.api_key_file = (dir / "key").string();
  resolve_api_key(o);
  EXPECT_EQ(o.http.api_key, "k-1");
  std::ofstream(dir / "empty") << "\n";
  o.api_key_file = (dir / "empty").string();
  EXPECT_THROW(resolve_api_key(o), Error);
}

// top_k: each route family takes what its peer takes (vLLM: -1 or 0 is off; TGI: >= 1).
TEST(TopK, EachFamilyFollowsItsPeer) {
  TestServer s;
  auto c = s.client();
  for (int k : {-1, 0, 5}) EXPECT_EQ(post(*c, "/v1/completions", json{{"prompt", "x"}, {"max_tokens", 1}, {"top_k", k}}).status, 200) << k;
  EXPECT_EQ(post(*c, "/v1/chat/completions", json{{"messages", {{{"role", "user"}, {"content", "x"}}}}, {"max_tokens", 1}, {"top_k", -1}}).status, 200);
  EXPECT_EQ(post(*c, "/v1/completions", json{{"prompt", "x"}, {"max_tokens", 1}, {"top_k", -2}}).status, 422);
  for (int k : {-1, 0}) expect_tgi_error(post(*c, "/generate", json{{"inputs", "x"}, {"parameters", {{"top_k", k}}}}), 422, "validation");
  EXPECT_EQ(post(*c, "/generate", json{{"inputs", "x"}, {"parameters", {{"top_k", 5}, {"max_new_tokens", 1}}}}).status, 200);
}

}  // namespace
}  // namespace fineserve
