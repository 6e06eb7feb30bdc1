// Prefix caching seen from HTTP: OpenAI usage reports cached prompt tokens, the metrics count
// queried and hit tokens, and the answers are the same with the cache on and off.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <string>

#include "server/serve.h"
#include "server_util.h"

namespace fineserve {
namespace {

using json = nlohmann::json;
using namespace fineserve::testing;

// A prompt of a few cache blocks (16 tokens each by default).
const std::string kPrompt =
    "You are a careful assistant. Answer in one sentence, cite nothing, and keep a friendly tone. "
    "The question follows after this line of instructions, which every request shares.";

json completion(const std::string& prompt) {
  return {{"model", "opt-preln"}, {"prompt", prompt}, {"max_tokens", 6}, {"temperature", 0}, {"ignore_eos", true}};
}

TEST(PrefixCacheHttp, SecondIdenticalRequestReportsCachedTokens) {
  TestServer s;
  auto c = s.client();
  const int n_prompt = static_cast<int>(s.tokenizer->encode(kPrompt).size());
  ASSERT_GT(n_prompt, 2 * 16);

  const Reply first = post(*c, "/v1/completions", completion(kPrompt));
  ASSERT_EQ(first.status, 200) << first.body;
  EXPECT_EQ(first.json()["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
  const Reply second = post(*c, "/v1/completions", completion(kPrompt));
  ASSERT_EQ(second.status, 200) << second.body;
  const int cached = (n_prompt - 1) / 16 * 16;  // full blocks, never the last token
  EXPECT_EQ(second.json()["usage"]["prompt_tokens_details"]["cached_tokens"], cached);
  EXPECT_EQ(second.json()["choices"][0]["text"], first.json()["choices"][0]["text"]);

  // Chat usage carries it too (the chat template's prefix differs from the raw prompt's).
  const json chat = {{"model", "opt-preln"}, {"messages", {{{"role", "user"}, {"content", kPrompt}}}},
                     {"max_tokens", 4}, {"temperature", 0}, {"ignore_eos", true}};
  ASSERT_EQ(post(*c, "/v1/chat/completions", chat).status, 200);
  const Reply chat2 = post(*c, "/v1/chat/completions", chat);
  ASSERT_EQ(chat2.status, 200) << chat2.body;
  EXPECT_GT(chat2.json()["usage"]["prompt_tokens_details"]["cached_tokens"].get<int>(), 0);

  // Streaming usage, too.
  json st = completion(kPrompt);
  st["stream"] = true;
  st["stream_options"] = {{"include_usage", true}};
  const StreamReply sr = post_stream(*c, "/v1/completions", st);
  ASSERT_EQ(sr.status, 200);
  ASSERT_GE(sr.events.size(), 2u);
  EXPECT_EQ(json::parse(sr.events[sr.events.size() - 2].data)["usage"]["prompt_tokens_details"]["cached_tokens"], cached);

  // vLLM's meaning: every admitted prompt's tokens are queried; hits are the tokens reused.
  const std::string m = get(*c, "/metrics").body;
  const double queries = metric_value(m, "fineserve_prefix_cache_queries_total");
  const double hits = metric_value(m, "fineserve_prefix_cache_hits_total");
  EXPECT_GE(queries, 3.0 * n_prompt);
  EXPECT_GE(hits, 2.0 * cached);
  EXPECT_LT(hits, queries);
}

TEST(PrefixCacheHttp, OffReportsNoCachedTokensAndSameText) {
  TestServerOptions o;
  o.engine.prefix_caching = false;
  TestServer off(o);
  TestServer on;
  auto c_off = off.client(), c_on = on.client();
  for (int i = 0; i < 2; ++i) {
    const Reply a = post(*c_off, "/v1/completions", completion(kPrompt));
    const Reply b = post(*c_on, "/v1/completions", completion(kPrompt));
    ASSERT_EQ(a.status, 200) << a.body;
    ASSERT_EQ(b.status, 200) << b.body;
    EXPECT_EQ(a.json()["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    EXPECT_EQ(a.json()["choices"][0]["text"], b.json()["choices"][0]["text"]);
  }
  const std::string m = get(*c_off, "/metrics").body;
  EXPECT_EQ(metric_value(m, "fineserve_prefix_cache_queries_total"), 0);
  EXPECT_EQ(metric_value(m, "fineserve_prefix_cache_hits_total"), 0);
}

TEST(PrefixCacheHttp, ConfigKey) {
  ServeOptions o = default_serve_options();
  EXPECT_TRUE(o.engine.prefix_caching);  // on by default
  load_server_config("configs/server.json", o);
  EXPECT_TRUE(o.engine.prefix_caching);
  apply_server_config(json{{"prefix_caching", false}}, "test", o);
  EXPECT_FALSE(o.engine.prefix_caching);
  EXPECT_THROW(apply_server_config(json{{"prefix_caching", "no"}}, "test", o), Error);
}

}  // namespace
}  // namespace fineserve
