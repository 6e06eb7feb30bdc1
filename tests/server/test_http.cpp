// The HTTP API over real loopback HTTP: every route, every error status, streaming, batching
// correctness, disconnects, timeouts, overload and draining.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <random>
#include <thread>

#include "server_util.h"

namespace fineserve {
namespace {

using json = nlohmann::json;
using namespace fineserve::testing;

// One server for the tests that need no special configuration.
class Http : public SharedServerTest {};

void expect_tgi_error(const Reply& r, int status, const std::string& type) {
  EXPECT_EQ(r.status, status) << r.body;
  const json j = json::parse(r.body, nullptr, false);
  ASSERT_TRUE(j.is_object()) << r.body;
  EXPECT_TRUE(j["error"].is_string()) << r.body;
  EXPECT_FALSE(j["error"].get<std::string>().empty());
  EXPECT_EQ(j["error_type"], type) << r.body;
}

void expect_openai_error(const Reply& r, int status, const std::string& type) {
  EXPECT_EQ(r.status, status) << r.body;
  const json j = json::parse(r.body, nullptr, false);
  ASSERT_TRUE(j.is_object()) << r.body;
  EXPECT_TRUE(j["error"]["message"].is_string()) << r.body;
  EXPECT_EQ(j["error"]["type"], type) << r.body;
  EXPECT_EQ(j["error"]["code"], status) << r.body;
}

// Greedy generation with the engine directly, no server: the reference the server must match.
std::vector<int32_t> engine_greedy(const std::string& prompt, int n) {
  auto backend = make_backend("cpu");
  auto tok = load_tokenizer(kModelDir);
  auto model = load_model(kModelDir, *backend);
  EngineConfig ec;
  ec.kv_cache_bytes = 4ull << 20;
  Engine engine(*model, tok.get(), ec);
  GenerationRequest r;
  r.prompt = tok->encode(prompt);
  r.stop.max_new_tokens = n;
  r.ignore_eos = true;
  return engine.generate({r})[0].tokens;
}

std::vector<int32_t> token_ids(const json& details) {
  std::vector<int32_t> ids;
  for (const json& t : details["tokens"]) ids.push_back(t["id"].get<int32_t>());
  return ids;
}

TEST_F(Http, HealthReadyInfoModelsMetrics) {
  auto c = server().client();
  Reply r = get(*c, "/health");
  EXPECT_EQ(r.status, 200);
  EXPECT_EQ(r.json()["status"], "ok");
  r = get(*c, "/ready");
  EXPECT_EQ(r.status, 200);
  r = get(*c, "/info");
  ASSERT_EQ(r.status, 200);
  const json info = r.json();
  EXPECT_EQ(info["model_id"], "opt-preln");
  EXPECT_EQ(info["architecture"], "opt");
  EXPECT_EQ(info["quantization"], "none");
  EXPECT_EQ(info["device"], "cpu");
  EXPECT_EQ(info["tp_size"], 1);
  EXPECT_EQ(info["max_context"], 128);
  EXPECT_EQ(info["max_seqs"], server().engine->config().max_seqs);
  EXPECT_GT(info["kv_cache_blocks"].get<int>(), 0);
  r = get(*c, "/v1/models");
  ASSERT_EQ(r.status, 200);
  EXPECT_EQ(r.json()["object"], "list");
  EXPECT_EQ(r.json()["data"][0]["id"], "opt-preln");
  EXPECT_EQ(r.json()["data"][0]["object"], "model");

  ASSERT_EQ(post(*c, "/generate", json{{"inputs", "metrics"}, {"parameters", {{"max_new_tokens", 3}, {"ignore_eos", true}}}}).status, 200);
  r = get(*c, "/metrics");
  ASSERT_EQ(r.status, 200);
  EXPECT_NE(r.headers.find("Content-Type")->second.find("text/plain"), std::string::npos);
  for (const char* name : {"fineserve_requests_total", "fineserve_request_success_total", "fineserve_prompt_tokens_total",
                           "fineserve_generation_tokens_total", "fineserve_time_to_first_token_seconds_count",
                           "fineserve_time_per_output_token_seconds_count", "fineserve_e2e_request_latency_seconds_count",
                           "fineserve_request_queue_time_seconds_count", "fineserve_batch_size_count",
                           "fineserve_batch_tokens_count", "fineserve_num_requests_running", "fineserve_num_requests_waiting",
                           "fineserve_kv_cache_usage_ratio"})
    EXPECT_GE(metric_value(r.body, name), 0) << name << "\n" << r.body;
  EXPECT_GE(metric_value(r.body, "fineserve_requests_total", "endpoint=\"generate\",status=\"200\""), 1);
  EXPECT_GE(metric_value(r.body, "fineserve_request_success_total", "finish_reason=\"length\""), 1);
}

TEST_F(Http, GenerateMatchesTheEngine) {
  auto c = server().client();
  const std::string prompt = "And God said, Let there be light";
  const std::vector<int32_t> expected = engine_greedy(prompt, 12);
  Reply r = post(*c, "/generate", json{{"inputs", prompt}, {"parameters", {{"max_new_tokens", 12}, {"details", true}, {"ignore_eos", true}}}});
  ASSERT_EQ(r.status, 200) << r.body;
  const json j = r.json();
  EXPECT_EQ(token_ids(j["details"]), expected);
  EXPECT_EQ(j["details"]["finish_reason"], "length");
  EXPECT_EQ(j["details"]["generated_tokens"], 12);
  EXPECT_TRUE(j["details"]["seed"].is_null());
  EXPECT_EQ(j["generated_text"], server().tokenizer->decode(expected));

  // return_full_text prepends the prompt; without details there is only generated_text.
  r = post(*c, "/generate", json{{"inputs", prompt}, {"parameters", {{"max_new_tokens", 12}, {"return_full_text", true}, {"ignore_eos", true}}}});
  ASSERT_EQ(r.status, 200);
  EXPECT_EQ(r.json()["generated_text"], prompt + server().tokenizer->decode(expected));
  EXPECT_FALSE(r.json().contains("details"));

  // Sampling with a seed is reproducible and reports the seed.
  const json sampled = {{"inputs", prompt}, {"parameters", {{"max_new_tokens", 10}, {"do_sample", true}, {"seed", 1234}, {"details", true}, {"ignore_eos", true}}}};
  Reply a = post(*c, "/generate", sampled), b = post(*c, "/generate", sampled);
  ASSERT_EQ(a.status, 200);
  EXPECT_EQ(a.json()["details"]["seed"], 1234);
  EXPECT_EQ(token_ids(a.json()["details"]), token_ids(b.json()["details"]));
}

TEST_F(Http, StopSequenceCutsTheText) {
  auto c = server().client();
  const std::string prompt = "In the beginning";
  const std::string full = server().tokenizer->decode(engine_greedy(prompt, 16));
  ASSERT_GE(full.size(), 6u);
  const std::string stop = full.substr(full.size() / 2, 3);
  const std::string before = full.substr(0, full.find(stop));
  Reply r = post(*c, "/generate", json{{"inputs", prompt}, {"parameters", {{"max_new_tokens", 16}, {"stop", {stop}}, {"details", true}, {"ignore_eos", true}}}});
  ASSERT_EQ(r.status, 200) << r.body;
  EXPECT_EQ(r.json()["generated_text"], before);
  EXPECT_EQ(r.json()["details"]["finish_reason"], "stop_sequence");
}

TEST_F(Http, GenerateStreamSendsOneEventPerToken) {
  auto c = server().client();
  const std::string prompt = "The LORD is my shepherd";
  const std::vector<int32_t> expected = engine_greedy(prompt, 9);
  StreamReply s = post_stream(*c, "/generate_stream", json{{"inputs", prompt}, {"parameters", {{"max_new_tokens", 9}, {"ignore_eos", true}}}});
  ASSERT_EQ(s.status, 200) << s.raw;
  ASSERT_EQ(s.events.size(), 9u) << s.raw;
  std::string text;
  for (size_t i = 0; i < s.events.size(); ++i) {
    const json e = json::parse(s.events[i].data);
    EXPECT_EQ(e["index"], i + 1);
    EXPECT_EQ(e["token"]["id"], expected[i]);
    text += e["token"]["text"].get<std::string>();
    if (i + 1 < s.events.size()) {
      EXPECT_TRUE(e["generated_text"].is_null());
      EXPECT_TRUE(e["details"].is_null());
    }
  }
  const json last = json::parse(s.events.back().data);
  EXPECT_EQ(last["generated_text"], text);
  EXPECT_EQ(last["details"]["finish_reason"], "length");
  EXPECT_EQ(last["details"]["generated_tokens"], 9);
}

TEST_F(Http, CompletionsStreamAndNot) {
  auto c = server().client();
  const std::string prompt = "Blessed are the meek";
  const std::vector<int32_t> expected = engine_greedy(prompt, 8);
  const std::string text = server().tokenizer->decode(expected);
  const json base = {{"model", "opt-preln"}, {"prompt", prompt}, {"max_tokens", 8}, {"temperature", 0}, {"ignore_eos", true}};
  Reply r = post(*c, "/v1/completions", base);
  ASSERT_EQ(r.status, 200) << r.body;
  json j = r.json();
  EXPECT_EQ(j["object"], "text_completion");
  EXPECT_EQ(j["model"], "opt-preln");
  EXPECT_EQ(j["choices"][0]["text"], text);
  EXPECT_EQ(j["choices"][0]["finish_reason"], "length");
  const int n_prompt = static_cast<int>(server().tokenizer->encode(prompt).size());
  EXPECT_EQ(j["usage"]["prompt_tokens"], n_prompt);
  EXPECT_EQ(j["usage"]["completion_tokens"], 8);
  EXPECT_EQ(j["usage"]["total_tokens"], n_prompt + 8);

  // echo, and a prompt given as token ids.
  json ids = base;
  ids["prompt"] = server().tokenizer->encode(prompt);
  ids["echo"] = true;
  r = post(*c, "/v1/completions", ids);
  ASSERT_EQ(r.status, 200) << r.body;
  EXPECT_EQ(r.json()["choices"][0]["text"], server().tokenizer->decode(server().tokenizer->encode(prompt)) + text);

  json st = base;
  st["stream"] = true;
  st["stream_options"] = {{"include_usage", true}};
  StreamReply s = post_stream(*c, "/v1/completions", st);
  ASSERT_EQ(s.status, 200);
  ASSERT_GE(s.events.size(), 3u);
  EXPECT_EQ(s.events.back().data, "[DONE]");
  std::string streamed;
  std::string finish;
  for (size_t i = 0; i + 2 < s.events.size(); ++i) {
    const json e = json::parse(s.events[i].data);
    streamed += e["choices"][0]["text"].get<std::string>();
    if (!e["choices"][0]["finish_reason"].is_null()) finish = e["choices"][0]["finish_reason"];
  }
  EXPECT_EQ(streamed, text);
  EXPECT_EQ(finish, "length");
  const json usage = json::parse(s.events[s.events.size() - 2].data);
  EXPECT_TRUE(usage["choices"].empty());
  EXPECT_EQ(usage["usage"]["completion_tokens"], 8);
}

TEST_F(Http, ChatCompletionsStreamAndNot) {
  auto c = server().client();
  const json base = {{"model", "opt-preln"},
                     {"messages", {{{"role", "system"}, {"content", "You are brief."}}, {{"role", "user"}, {"content", "Hello"}}}},
                     {"max_tokens", 6}, {"temperature", 0}, {"ignore_eos", true}};
  const std::string templ = render_chat_template({{"system", "You are brief."}, {"user", "Hello"}}, true);
  const std::string text = server().tokenizer->decode(engine_greedy(templ, 6));
  Reply r = post(*c, "/v1/chat/completions", base);
  ASSERT_EQ(r.status, 200) << r.body;
  json j = r.json();
  EXPECT_EQ(j["object"], "chat.completion");
  EXPECT_EQ(j["choices"][0]["message"]["role"], "assistant");
  if (text.find(kChatEndOfTurn) == std::string::npos) {
    EXPECT_EQ(j["choices"][0]["message"]["content"], text);
    EXPECT_EQ(j["choices"][0]["finish_reason"], "length");
  }
  EXPECT_EQ(j["usage"]["prompt_tokens"], server().tokenizer->encode(templ).size());

  json st = base;
  st["stream"] = true;
  StreamReply s = post_stream(*c, "/v1/chat/completions", st);
  ASSERT_EQ(s.status, 200);
  ASSERT_GE(s.events.size(), 3u);
  EXPECT_EQ(json::parse(s.events[0].data)["choices"][0]["delta"]["role"], "assistant");
  EXPECT_EQ(s.events.back().data, "[DONE]");
  std::string content;
  for (size_t i = 0; i + 1 < s.events.size(); ++i) {
    const json e = json::parse(s.events[i].data);
    EXPECT_EQ(e["object"], "chat.completion.chunk");
    if (e["choices"][0]["delta"].contains("content")) content += e["choices"][0]["delta"]["content"].get<std::string>();
  }
  EXPECT_EQ(content, j["choices"][0]["message"]["content"]);
  EXPECT_EQ(json::parse(s.events[s.events.size() - 2].data)["choices"][0]["finish_reason"], j["choices"][0]["finish_reason"]);
}

TEST_F(Http, ErrorStatuses) {
  auto c = server().client();
  expect_tgi_error(post(*c, "/generate", std::string("{not json")), 400, "bad_request");
  expect_tgi_error(post(*c, "/generate", std::string("[]")), 400, "bad_request");
  expect_tgi_error(post(*c, "/generate_stream", std::string("")), 400, "bad_request");
  expect_tgi_error(post(*c, "/generate", json{{"inputs", 1}}), 400, "bad_request");
  expect_tgi_error(post(*c, "/generate", json{{"inputs", "x"}, {"parameters", {{"top_p", 2}}}}), 422, "validation");
  // Unknown fields are ignored (logged once per name), as vLLM and TGI do.
  EXPECT_EQ(post(*c, "/generate", json{{"inputs", "x"}, {"parameters", {{"frobnicate", true}, {"max_new_tokens", 1}}}}).status, 200);
  expect_tgi_error(post(*c, "/generate_stream", json{{"inputs", "x"}, {"parameters", {{"max_new_tokens", 0}}}}), 422, "validation");
  // Prompt longer than the context (128 tokens), and prompt + max_new_tokens past it.
  std::string long_prompt;
  for (int i = 0; i < 80; ++i) long_prompt += " and the LORD said";
  expect_tgi_error(post(*c, "/generate", json{{"inputs", long_prompt}}), 422, "validation");
  expect_tgi_error(post(*c, "/generate", json{{"inputs", "And God said"}, {"parameters", {{"max_new_tokens", 126}}}}), 422, "validation");
  expect_openai_error(post(*c, "/v1/completions", json{{"prompt", long_prompt}}), 422, "validation");
  expect_openai_error(post(*c, "/v1/completions", json{{"prompt", {5, 999999}}}), 422, "validation");
  expect_openai_error(post(*c, "/v1/completions", json{{"model", "gpt-4"}, {"prompt", "x"}}), 404, "not_found");
  expect_openai_error(post(*c, "/v1/chat/completions", std::string("{\"messages\": ")), 400, "bad_request");
  expect_openai_error(post(*c, "/v1/chat/completions", json{{"messages", json::array()}}), 422, "validation");
  expect_openai_error(post(*c, "/v1/completions", json{{"prompt", "x"}, {"n", 17}}), 422, "validation");
  expect_tgi_error(post(*c, "/nope", json::object()), 404, "not_found");
  expect_tgi_error(get(*c, "/generate"), 404, "not_found");
  expect_openai_error(get(*c, "/v1/nope"), 404, "not_found");

  // Rejections are counted by status.
  const std::string m = get(*c, "/metrics").body;
  EXPECT_GE(metric_value(m, "fineserve_requests_total", "endpoint=\"generate\",status=\"422\""), 3);
  EXPECT_GE(metric_value(m, "fineserve_requests_total", "endpoint=\"generate\",status=\"400\""), 3);
  EXPECT_GE(metric_value(m, "fineserve_requests_total", "endpoint=\"completions\",status=\"404\""), 1);
}

TEST(HttpLimits, BodyTooLargeIs413) {
  TestServerOptions o;
  o.http.max_body_bytes = 2048;
  TestServer s(o);
  auto c = s.client();
  const std::string big = json{{"inputs", std::string(4000, 'a')}}.dump();
  expect_tgi_error(post(*c, "/generate", big), 413, "payload_too_large");
  auto c2 = s.client();
  expect_openai_error(post(*c2, "/v1/completions", json{{"prompt", std::string(4000, 'a')}}.dump()), 413, "payload_too_large");
  auto c3 = s.client();
  EXPECT_EQ(post(*c3, "/generate", json{{"inputs", "small"}, {"parameters", {{"max_new_tokens", 2}}}}).status, 200);
}

TEST(HttpLimits, QueueFullIs429WithRetryAfter) {
  TestServerOptions o;
  o.engine.max_seqs = 1;
  o.loop.max_queue = 2;
  TestServer s(o);
  s.model->set_open(false);
  const json req = {{"inputs", "And God said"}, {"parameters", {{"max_new_tokens", 4}, {"ignore_eos", true}}}};
  // A's first step is held at the gate (A still counts as waiting: it was when the step began,
  // but it has the batch slot); B and C wait behind it: the queue (2) is full.
  Reply a, b, c3;
  std::thread ta([&] { auto c = s.client(); a = post(*c, "/generate", req); });
  ASSERT_TRUE(s.model->wait_blocked());
  EXPECT_EQ(s.loop->stats().waiting, 1);
  std::thread tb([&] { auto c = s.client(); b = post(*c, "/generate", req); });
  ASSERT_TRUE(eventually([&] { return s.loop->stats().waiting == 2; }));
  std::thread tc([&] { auto c = s.client(); c3 = post(*c, "/generate", req); });
  ASSERT_TRUE(eventually([&] { return s.loop->stats().waiting == 3; }));
  auto c = s.client();
  const Reply full = post(*c, "/generate", req);
  expect_tgi_error(full, 429, "overloaded");
  EXPECT_EQ(full.headers.find("Retry-After")->second, "1");
  expect_openai_error(post(*c, "/v1/completions", json{{"prompt", "x"}}), 429, "overloaded");
  s.model->set_open(true);
  ta.join();
  tb.join();
  tc.join();
  EXPECT_EQ(a.status, 200) << a.body;
  EXPECT_EQ(b.status, 200) << b.body;
  EXPECT_EQ(c3.status, 200) << c3.body;
  EXPECT_EQ(post(*c, "/generate", req).status, 200) << "the queue has room again";
}

TEST(HttpLimits, ReadyAndRoutesAre503UntilTheModelIsAttached) {
  TestServerOptions o;
  o.attach = false;
  TestServer s(o);
  auto c = s.client();
  EXPECT_EQ(get(*c, "/health").status, 200);
  EXPECT_EQ(get(*c, "/ready").status, 503);
  expect_tgi_error(post(*c, "/generate", json{{"inputs", "x"}}), 503, "unavailable");
  expect_openai_error(get(*c, "/v1/models"), 503, "unavailable");
  s.attach();
  EXPECT_EQ(get(*c, "/ready").status, 200);
  EXPECT_EQ(post(*c, "/generate", json{{"inputs", "x"}, {"parameters", {{"max_new_tokens", 1}}}}).status, 200);
}

TEST(HttpLimits, DrainFinishesInFlightRequestsAndRefusesNewOnes) {
  TestServerOptions o;
  o.forward_delay_ms = 2;
  TestServer s(o);
  auto c = s.client();
  s.model->set_open(false);
  StreamReply inflight;
  std::thread t([&] {
    auto cc = s.client();
    inflight = post_stream(*cc, "/generate_stream", json{{"inputs", "And God said"}, {"parameters", {{"max_new_tokens", 30}, {"ignore_eos", true}}}});
  });
  ASSERT_TRUE(s.model->wait_blocked());
  bool drained = false;
  std::thread d([&] { drained = s.http->drain(std::chrono::seconds(60)); });
  ASSERT_TRUE(eventually([&] { return !s.http->ready(); }));
  EXPECT_EQ(get(*c, "/ready").status, 503);
  EXPECT_EQ(get(*c, "/health").status, 200);
  expect_tgi_error(post(*c, "/generate", json{{"inputs", "x"}}), 503, "unavailable");
  s.model->set_open(true);
  t.join();
  d.join();
  EXPECT_TRUE(drained);
  ASSERT_EQ(inflight.status, 200);
  ASSERT_EQ(inflight.events.size(), 30u) << inflight.raw;
  EXPECT_EQ(json::parse(inflight.events.back().data)["details"]["finish_reason"], "length");
}

TEST(HttpLimits, DrainTimeoutEndsWhatIsLeft) {
  TestServerOptions o;
  TestServer s(o);
  s.model->set_open(false);
  StreamReply inflight;
  std::thread t([&] {
    auto cc = s.client();
    inflight = post_stream(*cc, "/v1/completions", json{{"prompt", "And God said"}, {"max_tokens", 30}, {"stream", true}});
  });
  ASSERT_TRUE(s.model->wait_blocked());
  std::thread opener([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    s.model->set_open(true);
  });
  // The gate holds the request past the drain timeout: it is ended with an error event.
  EXPECT_FALSE(s.http->drain(std::chrono::milliseconds(100)));
  opener.join();
  t.join();
  ASSERT_EQ(inflight.status, 200);
  ASSERT_GE(inflight.events.size(), 2u) << inflight.raw;
  EXPECT_EQ(json::parse(inflight.events[inflight.events.size() - 2].data)["error"]["type"], "unavailable") << inflight.raw;
  EXPECT_EQ(inflight.events.back().data, "[DONE]");
}

TEST(HttpLimits, RequestTimeoutEndsTheRequestAndFreesItsBlocks) {
  TestServerOptions o;
  o.loop.request_timeout_s = 0.3;
  o.forward_delay_ms = 5;
  TestServer s(o);
  auto c = s.client();
  StreamReply st = post_stream(*c, "/generate_stream", json{{"inputs", "And God said"}, {"parameters", {{"max_new_tokens", 120}, {"ignore_eos", true}}}});
  ASSERT_EQ(st.status, 200);
  ASSERT_FALSE(st.events.empty());
  const json last = json::parse(st.events.back().data);
  EXPECT_EQ(last["error_type"], "timeout") << st.raw;
  EXPECT_LT(st.events.size(), 120u);
  // Non-streaming: the status says it (504), with the error object as the body.
  Reply r = post(*c, "/generate", json{{"inputs", "And God said"}, {"parameters", {{"max_new_tokens", 120}, {"ignore_eos", true}}}});
  EXPECT_EQ(r.status, 504);
  EXPECT_EQ(r.json()["error_type"], "timeout") << r.body;
  ASSERT_TRUE(eventually([&] { return s.loop->stats().free_blocks == s.loop->stats().total_blocks; }));
  EXPECT_EQ(metric_value(s.metrics.serialize(), "fineserve_request_aborted_total", "reason=\"timeout\""), 2);
}

TEST(HttpLimits, ClientDisconnectCancelsAndFreesKvBlocks) {
  TestServerOptions o;
  o.forward_delay_ms = 10;
  o.http.heartbeat_s = 0.05;
  TestServer s(o);
  // Streaming: hang up after two tokens.
  {
    auto c = s.client();
    int seen = 0;
    StreamReply st = post_stream(*c, "/generate_stream", json{{"inputs", "And God said"}, {"parameters", {{"max_new_tokens", 120}, {"ignore_eos", true}}}},
                                 [&](const SseEvent&) { return ++seen < 2; });
    EXPECT_EQ(seen, 2);
  }
  ASSERT_TRUE(eventually([&] {
    return metric_value(s.metrics.serialize(), "fineserve_request_aborted_total", "reason=\"disconnect\"") == 1;
  })) << s.metrics.serialize();
  ASSERT_TRUE(eventually([&] { return s.loop->stats().free_blocks == s.loop->stats().total_blocks && s.loop->in_flight() == 0; }));
  const std::string m = get(*s.client(), "/metrics").body;
  EXPECT_EQ(metric_value(m, "fineserve_kv_cache_usage_ratio"), 0) << m;
  EXPECT_EQ(metric_value(m, "fineserve_kv_cache_free_blocks"), s.loop->stats().total_blocks);
  EXPECT_EQ(metric_value(m, "fineserve_request_success_total", "finish_reason=\"length\""), -1) << "it never finished";

  // Non-streaming: the client sends its request and goes away; the heartbeat notices.
  {
    const std::string body = json{{"prompt", "And God said"}, {"max_tokens", 120}, {"ignore_eos", true}}.dump();
    const std::string request = "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                                "Content-Length: " + std::to_string(body.size()) + "\r\n\r\n" + body;
    const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    ASSERT_GE(fd, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(static_cast<uint16_t>(s.port));
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ASSERT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
    ASSERT_EQ(::send(fd, request.data(), request.size(), 0), static_cast<ssize_t>(request.size()));
    ASSERT_TRUE(eventually([&] { return s.loop->stats().running == 1; }));
    ::close(fd);
  }
  ASSERT_TRUE(eventually([&] {
    return metric_value(s.metrics.serialize(), "fineserve_request_aborted_total", "reason=\"disconnect\"") == 2;
  })) << s.metrics.serialize();
  ASSERT_TRUE(eventually([&] { return s.loop->stats().free_blocks == s.loop->stats().total_blocks && s.loop->in_flight() == 0; }));
}

// N concurrent greedy requests produce exactly the tokens each produces alone.
TEST(HttpBatching, ConcurrentGreedyRequestsMatchSoloRuns) {
  TestServerOptions o;
  o.engine.max_seqs = 16;
  o.engine.max_batch_tokens = 40;  // small: prompts are prefilled in chunks next to decodes
  TestServer s(o);
  const std::vector<std::string> prompts = {"And God said",
                                            "In the beginning God created the heaven and the earth",
                                            "The",
                                            "Blessed are the meek: for they shall inherit the earth",
                                            "Jesus wept",
                                            "For God so loved the world, that he gave his only begotten Son",
                                            "Let there be light",
                                            "And the evening and the morning were the first day",
                                            "Love is patient",
                                            "A soft answer turneth away wrath: but grievous words stir up anger"};
  auto body = [&](size_t i) {
    return json{{"inputs", prompts[i]}, {"parameters", {{"max_new_tokens", 10 + static_cast<int>(i) * 3}, {"details", true}, {"ignore_eos", true}}}};
  };
  std::vector<std::vector<int32_t>> solo(prompts.size()), together(prompts.size());
  auto c = s.client();
  for (size_t i = 0; i < prompts.size(); ++i) {
    Reply r = post(*c, "/generate", body(i));
    ASSERT_EQ(r.status, 200) << r.body;
    solo[i] = token_ids(r.json()["details"]);
  }
  const std::string before = s.metrics.serialize();
  // Hold the engine until every request is queued, so that they really share batches.
  s.model->set_open(false);
  std::vector<std::thread> threads;
  std::vector<int> status(prompts.size());
  for (size_t i = 0; i < prompts.size(); ++i)
    threads.emplace_back([&, i] {
      auto cc = s.client();
      Reply r = post(*cc, "/generate", body(i));
      status[i] = r.status;
      if (r.status == 200) together[i] = token_ids(r.json()["details"]);
    });
  ASSERT_TRUE(eventually([&] { return s.loop->in_flight() == static_cast<int>(prompts.size()); }));
  s.model->set_open(true);
  for (auto& t : threads) t.join();
  for (size_t i = 0; i < prompts.size(); ++i) {
    EXPECT_EQ(status[i], 200);
    EXPECT_EQ(together[i], solo[i]) << "prompt " << i;
  }
  const std::string after = s.metrics.serialize();
  const double seqs = metric_value(after, "fineserve_batch_size_sum") - metric_value(before, "fineserve_batch_size_sum");
  const double steps = metric_value(after, "fineserve_batch_size_count") - metric_value(before, "fineserve_batch_size_count");
  EXPECT_GT(seqs / steps, 3.0) << "the requests shared steps";
}

// A bounded load test: many clients, every route, zero errors, nothing left behind.
TEST(HttpLoad, ManyClientsZeroErrors) {
  TestServerOptions o;
  o.engine.max_seqs = 16;
  o.engine.max_batch_tokens = 64;
  TestServer s(o);
  constexpr int kClients = 64;
  const auto duration = std::chrono::seconds(5);
  std::atomic<int> ok{0}, errors{0};
  std::mutex err_mu;
  std::string first_error;
  const auto end = std::chrono::steady_clock::now() + duration;
  std::vector<std::thread> threads;
  for (int t = 0; t < kClients; ++t)
    threads.emplace_back([&, t] {
      std::mt19937 rng(static_cast<uint32_t>(t));
      auto c = s.client();
      auto fail = [&](const std::string& what) {
        ++errors;
        std::lock_guard lk(err_mu);
        if (first_error.empty()) first_error = what;
      };
      while (std::chrono::steady_clock::now() < end) {
        const int n = 1 + static_cast<int>(rng() % 24);
        const std::string prompt = std::string("And God said ") + std::to_string(rng() % 1000);
        switch (rng() % 4) {
          case 0: {
            Reply r = post(*c, "/generate", json{{"inputs", prompt}, {"parameters", {{"max_new_tokens", n}, {"do_sample", true}, {"details", true}, {"ignore_eos", true}}}});
            if (r.status != 200 || r.json()["details"]["generated_tokens"] != n) fail("generate " + std::to_string(r.status) + " " + r.body);
            else ++ok;
            break;
          }
          case 1: {
            StreamReply r = post_stream(*c, "/generate_stream", json{{"inputs", prompt}, {"parameters", {{"max_new_tokens", n}, {"ignore_eos", true}}}});
            if (r.status != 200 || static_cast<int>(r.events.size()) != n) fail("generate_stream " + std::to_string(r.status) + " " + r.raw);
            else ++ok;
            break;
          }
          case 2: {
            Reply r = post(*c, "/v1/completions", json{{"prompt", prompt}, {"max_tokens", n}, {"ignore_eos", true}});
            if (r.status != 200 || r.json()["usage"]["completion_tokens"] != n) fail("completions " + std::to_string(r.status) + " " + r.body);
            else ++ok;
            break;
          }
          default: {
            StreamReply r = post_stream(*c, "/v1/chat/completions", json{{"messages", {{{"role", "user"}, {"content", prompt}}}}, {"max_tokens", n}, {"stream", true}});
            if (r.status != 200 || r.events.empty() || r.events.back().data != "[DONE]") fail("chat " + std::to_string(r.status) + " " + r.raw);
            else ++ok;
            break;
          }
        }
      }
    });
  for (auto& t : threads) t.join();
  EXPECT_EQ(errors.load(), 0) << first_error;
  EXPECT_GT(ok.load(), kClients);
  ASSERT_TRUE(eventually([&] { return s.loop->in_flight() == 0; }));
  const EngineStats st = s.loop->stats();
  EXPECT_EQ(st.free_blocks, st.total_blocks) << "every KV block is back";
  EXPECT_EQ(st.running + st.waiting, 0);
}

}  // namespace
}  // namespace fineserve

namespace fineserve {
namespace {
using json = nlohmann::json;
using namespace fineserve::testing;

// One client, many requests: keep-alive connections are reused and renewed cleanly.
TEST(HttpKeepAlive, ManySequentialRequestsOnOneClient) {
  TestServer s;
  auto c = s.client();
  for (int i = 0; i < 36; ++i) {
    if (i % 3 == 2) {
      StreamReply r = post_stream(*c, "/generate_stream", json{{"inputs", "And God said"}, {"parameters", {{"max_new_tokens", 3}}}});
      EXPECT_EQ(r.status, 200) << i << " " << r.raw;
      continue;
    }
    const char* path = i % 3 ? "/generate" : "/v1/completions";
    const json body = i % 3 ? json{{"inputs", "And God said"}, {"parameters", {{"max_new_tokens", 3}}}}
                            : json{{"prompt", "And God said"}, {"max_tokens", 3}};
    Reply r = post(*c, path, body);
    EXPECT_EQ(r.status, 200) << i << " " << r.body;
  }
}

}  // namespace
}  // namespace fineserve
namespace fineserve {
namespace {
using json = nlohmann::json;
using namespace fineserve::testing;

// Many clients connecting at the same moment are all served (no accept-backlog overflow).
TEST(HttpLoad, BurstOfConnections) {
  TestServer s;
  std::atomic<int> errors{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 48; ++t)
    threads.emplace_back([&, t] {
      auto c = s.client();
      for (int i = 0; i < 3; ++i) {
        Reply r = post(*c, "/generate", json{{"inputs", "And God said"}, {"parameters", {{"max_new_tokens", 1 + (i * 7 + t) % 20}}}});
        if (r.status != 200) ++errors;
      }
    });
  for (auto& th : threads) th.join();
  EXPECT_EQ(errors.load(), 0);
}

}  // namespace
}  // namespace fineserve
