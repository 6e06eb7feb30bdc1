// Request parsing and validation, response shapes, SSE framing: no sockets.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <random>

#include "kernels/base.h"
#include "server/api.h"
#include "server/responses.h"
#include "server/serve.h"
#include "server/sse.h"

namespace fineserve {
namespace {

using json = nlohmann::json;

ApiLimits limits() {
  ApiLimits l;
  l.model_name = "tiny";
  l.max_context = 128;
  l.default_max_new_tokens = 20;
  l.vocab_size = 1000;
  return l;
}

// Parses and resolves with a prompt of `prompt_tokens` tokens (token-id prompts keep theirs).
GenerationRequest resolved(Endpoint e, const std::string& body, int prompt_tokens = 3) {
  const ApiRequest r = parse_request(e, body, limits());
  return resolve_request(r, std::vector<int32_t>(static_cast<size_t>(prompt_tokens), 7), limits(), /*random_seed=*/99);
}

int status_of(Endpoint e, const std::string& body) {
  try {
    resolved(e, body);
  } catch (const ApiError& err) {
    return err.status();
  }
  return 200;
}

TEST(ApiParse, TgiDefaultsAndParameters) {
  ApiRequest r = parse_request(Endpoint::Generate, R"({"inputs": "Hello"})", limits());
  EXPECT_EQ(r.prompt, "Hello");
  EXPECT_FALSE(r.stream);
  EXPECT_FALSE(r.sampling.do_sample);
  EXPECT_FALSE(r.max_new_tokens);
  EXPECT_EQ(resolved(Endpoint::Generate, R"({"inputs": "Hello"})").stop.max_new_tokens, 20);
  EXPECT_EQ(resolved(Endpoint::Generate, R"({"inputs": "Hello"})", 120).stop.max_new_tokens, 8) << "lowered to the room left";

  r = parse_request(Endpoint::GenerateStream,
                    R"({"inputs": "Hi", "parameters": {"max_new_tokens": 7, "temperature": 0.5, "top_k": 3,
                        "top_p": 0.9, "repetition_penalty": 1.2, "seed": 42, "stop": ["a", "bc"], "details": true,
                        "return_full_text": true, "ignore_eos": true}})",
                    limits());
  EXPECT_TRUE(r.stream);
  EXPECT_EQ(r.max_new_tokens, 7);
  EXPECT_TRUE(r.sampling.do_sample) << "TGI samples when a sampling parameter is set";
  EXPECT_FLOAT_EQ(r.sampling.temperature, 0.5f);
  EXPECT_EQ(r.sampling.top_k, 3);
  EXPECT_FLOAT_EQ(r.sampling.top_p, 0.9f);
  EXPECT_FLOAT_EQ(r.sampling.repetition_penalty, 1.2f);
  EXPECT_EQ(r.seed, 42u);
  EXPECT_EQ(r.stop, (std::vector<std::string>{"a", "bc"}));
  EXPECT_TRUE(r.details);
  EXPECT_TRUE(r.return_full_text);
  EXPECT_TRUE(r.ignore_eos);

  r = parse_request(Endpoint::Generate, R"({"inputs": "Hi", "parameters": {"temperature": 1.0, "do_sample": false}})", limits());
  EXPECT_FALSE(r.sampling.do_sample) << "temperature 1 is neutral";
  r = parse_request(Endpoint::Generate, R"({"inputs": "Hi", "parameters": {"do_sample": true, "best_of": 1, "watermark": false}})", limits());
  EXPECT_TRUE(r.sampling.do_sample);
}

TEST(ApiParse, ErrorStatuses) {
  const auto G = Endpoint::Generate;
  // Malformed bodies: 400.
  EXPECT_EQ(status_of(G, ""), 400);
  EXPECT_EQ(status_of(G, "{"), 400);
  EXPECT_EQ(status_of(G, "[1,2]"), 400);
  EXPECT_EQ(status_of(G, "\"text\""), 400);
  EXPECT_EQ(status_of(G, R"({"inputs": 5})"), 400);
  EXPECT_EQ(status_of(G, R"({"inputs": "x", "parameters": 3})"), 400);
  EXPECT_EQ(status_of(G, R"({"inputs": "x", "parameters": {"max_new_tokens": "5"}})"), 400);
  EXPECT_EQ(status_of(G, R"({"inputs": "x", "parameters": {"max_new_tokens": 1.5}})"), 400);
  EXPECT_EQ(status_of(G, R"({"inputs": "x", "parameters": {"do_sample": 1}})"), 400);
  EXPECT_EQ(status_of(G, R"({"inputs": "x", "parameters": {"stop": [1]}})"), 400);
  // Missing, out of range: 422. Unknown fields are ignored (logged once), as vLLM and TGI do.
  EXPECT_EQ(status_of(G, R"({})"), 422);
  EXPECT_EQ(status_of(G, R"({"inputs": ""})"), 422);
  EXPECT_EQ(status_of(G, R"({"inputs": "x", "bogus": 1})"), 200);
  EXPECT_EQ(status_of(G, R"({"inputs": "x", "parameters": {"bogus": 1}})"), 200);
  EXPECT_EQ(status_of(G, R"({"inputs": "x", "parameters": {"max_new_tokens": 0}})"), 422);
  EXPECT_EQ(status_of(G, R"({"inputs": "x", "parameters": {"max_new_tokens": 128}})"), 422) << "no room for the prompt";
  EXPECT_EQ(status_of(G, R"({"inputs": "x", "parameters": {"max_new_tokens": 4294967296}})"), 422);
  EXPECT_EQ(status_of(G, R"({"inputs": "x", "parameters": {"temperature": 0}})"), 422);
  EXPECT_EQ(status_of(G, R"({"inputs": "x", "parameters": {"temperature": -1}})"), 422);
  EXPECT_EQ(status_of(G, R"({"inputs": "x", "parameters": {"top_p": 1.5}})"), 422);
  EXPECT_EQ(status_of(G, R"({"inputs": "x", "parameters": {"top_p": 0}})"), 422);
  EXPECT_EQ(status_of(G, R"({"inputs": "x", "parameters": {"top_k": 0}})"), 422);
  EXPECT_EQ(status_of(G, R"({"inputs": "x", "parameters": {"repetition_penalty": 0}})"), 422);
  EXPECT_EQ(status_of(G, R"({"inputs": "x", "parameters": {"seed": -1}})"), 422);
  EXPECT_EQ(status_of(G, R"({"inputs": "x", "parameters": {"stop": [""]}})"), 422);
  EXPECT_EQ(status_of(G, R"({"inputs": "x", "parameters": {"stop": ["a","b","c","d","e"]}})"), 422);
  EXPECT_EQ(status_of(G, R"({"inputs": "x", "parameters": {"best_of": 2}})"), 422) << "best_of needs sampling";
  EXPECT_EQ(status_of(G, R"({"inputs": "x", "parameters": {"best_of": 2, "do_sample": true}})"), 200);
  EXPECT_EQ(status_of(Endpoint::GenerateStream, R"({"inputs": "x", "parameters": {"best_of": 2, "do_sample": true}})"), 422);
  EXPECT_EQ(status_of(G, R"({"inputs": "x", "parameters": {"best_of": 17, "do_sample": true}})"), 422);
  EXPECT_EQ(status_of(G, R"({"inputs": "x", "parameters": {"top_n_tokens": 21}})"), 422);
  EXPECT_EQ(status_of(G, R"({"inputs": "x", "parameters": {"top_n_tokens": 5, "frequency_penalty": 0.5}})"), 200);
  EXPECT_EQ(status_of(G, R"({"inputs": "x", "parameters": {"typical_p": 0.5}})"), 422);
  EXPECT_EQ(status_of(G, R"({"inputs": "x", "stream": true})"), 422) << "/generate does not stream";
  EXPECT_EQ(status_of(G, R"({"inputs": "x", "parameters": {"temperature": 1e999}})"), 400) << "not JSON";

  const auto C = Endpoint::Completions;
  EXPECT_EQ(status_of(C, R"({"model": "other", "prompt": "x"})"), 404);
  EXPECT_EQ(status_of(C, R"({"prompt": "x", "n": 2})"), 200);
  EXPECT_EQ(status_of(C, R"({"prompt": "x", "n": 0})"), 422);
  EXPECT_EQ(status_of(C, R"({"prompt": "x", "n": 17})"), 422);
  EXPECT_EQ(status_of(C, R"({"prompt": "x", "n": 3, "best_of": 2})"), 422) << "best_of < n";
  EXPECT_EQ(status_of(C, R"({"prompt": "x", "n": 1, "best_of": 2, "stream": true})"), 422);
  EXPECT_EQ(status_of(C, R"({"prompt": "x", "temperature": 2.5})"), 422);
  EXPECT_EQ(status_of(C, R"({"prompt": "x", "logprobs": 2})"), 200);
  EXPECT_EQ(status_of(C, R"({"prompt": "x", "logprobs": 21})"), 422);
  EXPECT_EQ(status_of(C, R"({"prompt": "x", "logprobs": -1})"), 422);
  EXPECT_EQ(status_of(C, R"({"prompt": "x", "logprobs": true})"), 400);
  EXPECT_EQ(status_of(C, R"({"prompt": "x", "presence_penalty": 0.5})"), 200);
  EXPECT_EQ(status_of(C, R"({"prompt": "x", "presence_penalty": 2.5})"), 422);
  EXPECT_EQ(status_of(C, R"({"prompt": "x", "frequency_penalty": -2.01})"), 422);
  EXPECT_EQ(status_of(C, R"({"prompt": "x", "logit_bias": {"5": 100}})"), 200);
  EXPECT_EQ(status_of(C, R"({"prompt": "x", "logit_bias": {"5": 101}})"), 422);
  EXPECT_EQ(status_of(C, R"({"prompt": "x", "logit_bias": {"x": 1}})"), 422);
  EXPECT_EQ(status_of(C, R"({"prompt": "x", "logit_bias": {"1000": 1}})"), 422) << "outside the vocabulary";
  EXPECT_EQ(status_of(C, R"({"prompt": "x", "logit_bias": {"5": "1"}})"), 400);
  EXPECT_EQ(status_of(C, R"({"prompt": "x", "logit_bias": [1]})"), 400);
  EXPECT_EQ(status_of(C, R"({"prompt": "x", "min_tokens": 3, "max_tokens": 4})"), 200);
  EXPECT_EQ(status_of(C, R"({"prompt": "x", "min_tokens": 5, "max_tokens": 4})"), 422);
  EXPECT_EQ(status_of(C, R"({"prompt": "x", "min_tokens": -1})"), 422);
  EXPECT_EQ(status_of(C, R"({"prompt": "x", "stop_token_ids": [1, 999]})"), 200);
  EXPECT_EQ(status_of(C, R"({"prompt": "x", "stop_token_ids": [1000]})"), 422);
  EXPECT_EQ(status_of(C, R"({"prompt": "x", "stop_token_ids": [-1]})"), 422);
  EXPECT_EQ(status_of(C, R"({"prompt": "x", "stop_token_ids": 5})"), 400);
  EXPECT_EQ(status_of(C, R"({"prompt": "x", "echo": true, "max_tokens": 0})"), 200) << "prompt scoring";
  EXPECT_EQ(status_of(C, R"({"prompt": [999]})"), 200);
  EXPECT_EQ(status_of(C, R"({"prompt": [1000]})"), 422) << "outside the vocabulary";
  EXPECT_EQ(status_of(C, R"({"prompt": ["a", "b"]})"), 422);
  EXPECT_EQ(status_of(C, R"({"prompt": []})"), 422);
  EXPECT_EQ(status_of(C, R"({"prompt": [1, -2]})"), 422);
  EXPECT_EQ(status_of(C, R"({"prompt": {"a": 1}})"), 400);
  EXPECT_EQ(status_of(C, R"({"prompt": "x", "stream_options": {"include_usage": true}})"), 422) << "needs stream";
  EXPECT_EQ(status_of(C, R"({"prompt": "x", "max_tokens": 0})"), 422);

  const auto H = Endpoint::ChatCompletions;
  EXPECT_EQ(status_of(H, R"({"messages": []})"), 422);
  EXPECT_EQ(status_of(H, R"({"messages": "hi"})"), 400);
  EXPECT_EQ(status_of(H, R"({"messages": [{"role": "wizard", "content": "x"}]})"), 422);
  EXPECT_EQ(status_of(H, R"({"messages": [{"role": "user"}]})"), 422);
  EXPECT_EQ(status_of(H, R"({"messages": [{"role": "user", "content": 3}]})"), 400);
  EXPECT_EQ(status_of(H, R"({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]})"), 422);
  EXPECT_EQ(status_of(H, R"({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]})"), 422);
  EXPECT_EQ(status_of(H, R"({"messages": [{"role": "user", "content": "x"}], "logprobs": true, "top_logprobs": 20})"), 200);
  EXPECT_EQ(status_of(H, R"({"messages": [{"role": "user", "content": "x"}], "logprobs": true, "top_logprobs": 21})"), 422);
  EXPECT_EQ(status_of(H, R"({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2})"), 422) << "needs logprobs";
  EXPECT_EQ(status_of(H, R"({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0})"), 422);
  EXPECT_EQ(status_of(H, R"({"messages": [{"role": "user", "content": "x", "extra": 1}], "what": 2})"), 200);
}

TEST(ApiParse, OpenAiCompletionsAndChat) {
  ApiRequest r = parse_request(Endpoint::Completions, R"({"model": "tiny", "prompt": "Say", "max_tokens": 5,
      "temperature": 0, "stream": true, "stream_options": {"include_usage": true}, "stop": "x", "echo": true, "user": "u"})",
                               limits());
  EXPECT_EQ(r.prompt, "Say");
  EXPECT_FALSE(r.sampling.do_sample) << "temperature 0 is greedy";
  EXPECT_TRUE(r.stream);
  EXPECT_TRUE(r.include_usage);
  EXPECT_TRUE(r.echo);
  EXPECT_EQ(r.stop, std::vector<std::string>{"x"});
  EXPECT_EQ(r.max_new_tokens, 5);

  r = parse_request(Endpoint::Completions, R"({"prompt": [5, 6, 7]})", limits());
  EXPECT_EQ(r.prompt_ids, (std::vector<int64_t>{5, 6, 7}));
  EXPECT_TRUE(r.sampling.do_sample) << "OpenAI samples by default";
  EXPECT_FALSE(r.max_new_tokens);
  EXPECT_EQ(resolved(Endpoint::Completions, R"({"prompt": [5, 6, 7]})").stop.max_new_tokens, 16);
  EXPECT_EQ(resolved(Endpoint::Completions, R"({"prompt": [5, 6, 7]})").prompt, (std::vector<int32_t>{5, 6, 7}));
  r = parse_request(Endpoint::Completions, R"({"prompt": [[9]]})", limits());
  EXPECT_EQ(r.prompt_ids, std::vector<int64_t>{9});

  r = parse_request(Endpoint::ChatCompletions, R"({"model": "tiny", "messages": [
      {"role": "system", "content": "Be brief."},
      {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
      {"role": "assistant", "content": null}, {"role": "user", "content": "?", "name": "bob"}],
      "max_completion_tokens": 9, "top_k": -1})",
                    limits());
  EXPECT_EQ(r.prompt,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
            "<|im_start|>assistant\n<|im_end|>\n<|im_start|>user\n?<|im_end|>\n<|im_start|>assistant\n");
  EXPECT_EQ(r.max_new_tokens, 9);
  EXPECT_EQ(r.sampling.top_k, 0);
  EXPECT_EQ(r.stop, std::vector<std::string>{kChatEndOfTurn});
  EXPECT_EQ(resolved(Endpoint::ChatCompletions, R"({"messages": [{"role": "user", "content": "x"}]})", 28).stop.max_new_tokens, 100)
      << "chat defaults to the rest of the context";
}

// The one step that resolves limits: everything the engine asserts comes out of it.
TEST(ApiResolve, ProducesAFullyResolvedRequest) {
  GenerationRequest g = resolved(Endpoint::Completions, R"({"prompt": "x", "n": 3, "best_of": 4, "seed": 5, "logprobs": 2,
      "echo": true, "presence_penalty": 0.5, "frequency_penalty": -0.25, "logit_bias": {"7": -100, "9": 2.5},
      "min_tokens": 2, "max_tokens": 6, "stop_token_ids": [11], "ignore_eos": true})");
  EXPECT_EQ(g.n, 4) << "best_of sequences are generated";
  EXPECT_EQ(g.sampling.seed, 5u);
  EXPECT_EQ(g.top_logprobs, 2);
  EXPECT_TRUE(g.prompt_logprobs);
  EXPECT_FLOAT_EQ(g.sampling.presence_penalty, 0.5f);
  EXPECT_FLOAT_EQ(g.sampling.frequency_penalty, -0.25f);
  EXPECT_EQ(g.sampling.logit_bias, (std::vector<std::pair<int32_t, float>>{{7, -100.0f}, {9, 2.5f}}));
  EXPECT_EQ(g.sampling.min_tokens, 2);
  EXPECT_EQ(g.stop.max_new_tokens, 6);
  EXPECT_EQ(g.stop.eos_token_ids, std::vector<int32_t>{11});
  EXPECT_TRUE(g.ignore_eos);
  EXPECT_EQ(resolved(Endpoint::Completions, R"({"prompt": "x"})").sampling.seed, 99u) << "the server's random seed";
  // The context: a given max_tokens must fit; a default is lowered to fit.
  EXPECT_THROW(resolved(Endpoint::Completions, R"({"prompt": "x", "max_tokens": 126})", 3), ApiError);
  EXPECT_EQ(resolved(Endpoint::Completions, R"({"prompt": "x", "max_tokens": 125})", 3).stop.max_new_tokens, 125);
  EXPECT_EQ(resolved(Endpoint::Completions, R"({"prompt": "x"})", 120).stop.max_new_tokens, 8);
  EXPECT_THROW(resolved(Endpoint::Completions, R"({"prompt": "x"})", 128), ApiError) << "no room to generate";
  EXPECT_EQ(resolved(Endpoint::Completions, R"({"prompt": "x", "echo": true, "max_tokens": 0})", 128).stop.max_new_tokens, 0)
      << "scoring a full-context prompt";
  EXPECT_THROW(resolved(Endpoint::Completions, R"({"prompt": "x"})", 0), ApiError) << "empty after tokenization";
  // TGI: decoder_input_details asks for the prompt's logprobs, top_n_tokens for alternatives.
  g = resolved(Endpoint::Generate, R"({"inputs": "x", "parameters": {"decoder_input_details": true, "top_n_tokens": 3,
      "best_of": 2, "do_sample": true}})");
  EXPECT_TRUE(g.prompt_logprobs);
  EXPECT_EQ(g.top_logprobs, 3);
  EXPECT_EQ(g.n, 2);
}

TEST(ApiParse, TokenizeAndDetokenize) {
  TokenizeRequest t = parse_tokenize(R"({"prompt": "hi", "add_special_tokens": false})", limits());
  EXPECT_EQ(t.prompt, "hi");
  EXPECT_FALSE(t.add_special_tokens);
  t = parse_tokenize(R"({"model": "tiny", "messages": [{"role": "user", "content": "x"}]})", limits());
  EXPECT_EQ(t.prompt, "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n");
  const auto status = [](auto fn) {
    try {
      fn();
    } catch (const ApiError& e) {
      return e.status();
    }
    return 200;
  };
  EXPECT_EQ(status([] { parse_tokenize(R"({})", limits()); }), 422);
  EXPECT_EQ(status([] { parse_tokenize(R"({"prompt": "a", "messages": []})", limits()); }), 422);
  EXPECT_EQ(status([] { parse_tokenize(R"({"prompt": 3})", limits()); }), 400);
  EXPECT_EQ(status([] { parse_tokenize(R"({"prompt": "a", "model": "other"})", limits()); }), 404);
  EXPECT_EQ(parse_detokenize(R"({"tokens": [1, 2, 999]})", limits()), (std::vector<int32_t>{1, 2, 999}));
  EXPECT_EQ(status([] { parse_detokenize(R"({"tokens": [1000]})", limits()); }), 422);
  EXPECT_EQ(status([] { parse_detokenize(R"({"tokens": "1"})", limits()); }), 400);
  EXPECT_EQ(status([] { parse_detokenize(R"({})", limits()); }), 422);
}

TEST(ApiParse, RandomBytesNeverCrash) {
  std::mt19937 rng(7);
  const std::string seeds[] = {R"({"inputs": "x", "parameters": {"max_new_tokens": 3}})",
                               R"({"model": "tiny", "messages": [{"role": "user", "content": "x"}]})",
                               R"({"prompt": [1, 2, 3], "stream": true})"};
  for (int i = 0; i < 3000; ++i) {
    std::string s = seeds[i % 3];
    const int edits = 1 + static_cast<int>(rng() % 4);
    for (int k = 0; k < edits; ++k) s[rng() % s.size()] = static_cast<char>(rng() % 256);
    for (Endpoint e : {Endpoint::Generate, Endpoint::Completions, Endpoint::ChatCompletions}) {
      try {
        parse_request(e, s, limits());
      } catch (const ApiError& err) {
        EXPECT_TRUE(err.status() == 400 || err.status() == 404 || err.status() == 422) << err.status();
      }
    }
  }
}

TEST(Sse, FormatsAndParses) {
  EXPECT_EQ(sse_event("{\"a\":1}"), "data: {\"a\":1}\n\n");
  EXPECT_EQ(sse_event("a\nb"), "data: a\ndata: b\n\n");
  SseParser p;
  std::string stream = sse_event("one") + std::string(kSseHeartbeat) + "event: x\r\ndata:two\r\nid: 5\r\n\r\n" + sse_event("a\nb") + "data: tail";
  std::vector<SseEvent> all;
  // Fed one byte at a time: events must not depend on how the bytes were split.
  for (char c : stream)
    for (auto& e : p.feed(std::string_view(&c, 1))) all.push_back(e);
  ASSERT_EQ(all.size(), 3u);
  EXPECT_EQ(all[0].data, "one");
  EXPECT_EQ(all[1].data, "two");
  EXPECT_EQ(all[1].event, "x");
  EXPECT_EQ(all[1].id, "5");
  EXPECT_EQ(all[2].data, "a\nb");
  EXPECT_EQ(p.feed("\n\n").size(), 1u) << "the unterminated event completes on its blank line";
}

TokenEvent ev(int32_t tok, std::string text, std::optional<FinishReason> f = std::nullopt) {
  TokenEvent e;
  e.request_id = 1;
  e.token = tok;
  e.logprob = -0.5f;
  e.text = std::move(text);
  e.finish = f;
  return e;
}

ResponseContext context(Endpoint e, bool stream) {
  ResponseContext c;
  c.request.endpoint = e;
  c.request.stream = stream;
  c.prompt_text = "P:";
  c.prompt_tokens = 3;
  c.seed = 11;
  c.model_name = "tiny";
  c.id = "cmpl-1";
  c.created = 5;
  return c;
}

std::vector<json> events_of(const std::string& bytes) {
  SseParser p;
  std::vector<json> out;
  for (auto& e : p.feed(bytes)) out.push_back(e.data == "[DONE]" ? json("[DONE]") : json::parse(e.data));
  return out;
}

TEST(Responses, TgiShapes) {
  ResponseContext c = context(Endpoint::Generate, false);
  c.request.details = true;
  c.request.return_full_text = true;
  ResponseWriter w(c);
  EXPECT_EQ(w.on_events({ev(4, "a"), ev(5, "")}), "") << "non-streaming: nothing until the end";
  const json body = json::parse(w.on_events({ev(6, "bc", FinishReason::StopSequence)}));
  EXPECT_EQ(body["generated_text"], "P:abc");
  EXPECT_EQ(body["details"]["finish_reason"], "stop_sequence");
  EXPECT_EQ(body["details"]["generated_tokens"], 3);
  EXPECT_TRUE(body["details"]["seed"].is_null()) << "greedy requests have no seed";
  ASSERT_EQ(body["details"]["tokens"].size(), 3u);
  EXPECT_EQ(body["details"]["tokens"][2]["id"], 6);
  EXPECT_TRUE(w.finished());

  ResponseContext s = context(Endpoint::GenerateStream, true);
  s.request.sampling.do_sample = true;
  ResponseWriter ws(s);
  EXPECT_EQ(ws.content_type(), "text/event-stream");
  auto evs = events_of(ws.on_events({ev(4, "a"), ev(5, "b", FinishReason::Length)}));
  ASSERT_EQ(evs.size(), 2u);
  EXPECT_EQ(evs[0]["index"], 1);
  EXPECT_EQ(evs[0]["token"]["text"], "a");
  EXPECT_TRUE(evs[0]["generated_text"].is_null());
  EXPECT_EQ(evs[1]["generated_text"], "ab");
  EXPECT_EQ(evs[1]["details"]["finish_reason"], "length");
  EXPECT_EQ(evs[1]["details"]["seed"], 11);
}

TEST(Responses, OpenAiShapes) {
  ResponseContext c = context(Endpoint::Completions, true);
  c.request.include_usage = true;
  c.request.echo = true;
  ResponseWriter w(c);
  auto evs = events_of(w.on_events({ev(4, "x"), ev(5, ""), ev(6, "y", FinishReason::EosToken)}));
  ASSERT_EQ(evs.size(), 4u) << "held-back text sends no chunk; usage chunk; [DONE]";
  EXPECT_EQ(evs[0]["choices"][0]["text"], "P:x");
  EXPECT_TRUE(evs[0]["choices"][0]["finish_reason"].is_null());
  EXPECT_EQ(evs[1]["choices"][0]["finish_reason"], "stop");
  EXPECT_EQ(evs[2]["usage"]["completion_tokens"], 3);
  EXPECT_EQ(evs[2]["usage"]["total_tokens"], 6);
  EXPECT_EQ(evs[3], "[DONE]");

  ResponseWriter chat(context(Endpoint::ChatCompletions, false));
  const json body = json::parse(chat.on_events({ev(4, "hi", FinishReason::Length)}));
  EXPECT_EQ(body["object"], "chat.completion");
  EXPECT_EQ(body["choices"][0]["message"]["role"], "assistant");
  EXPECT_EQ(body["choices"][0]["message"]["content"], "hi");
  EXPECT_EQ(body["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(body["usage"]["prompt_tokens"], 3);

  ResponseWriter cs(context(Endpoint::ChatCompletions, true));
  evs = events_of(cs.on_events({ev(4, "hi", FinishReason::Length)}));
  ASSERT_EQ(evs.size(), 4u);
  EXPECT_EQ(evs[0]["choices"][0]["delta"]["role"], "assistant");
  EXPECT_EQ(evs[1]["choices"][0]["delta"]["content"], "hi");
  EXPECT_EQ(evs[2]["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(evs[3], "[DONE]");

  ResponseWriter failing(context(Endpoint::ChatCompletions, true));
  evs = events_of(failing.on_failure(ApiError(504, "timeout", "too slow")));
  ASSERT_EQ(evs.size(), 2u);
  EXPECT_EQ(evs[0]["error"]["type"], "timeout");
  EXPECT_EQ(evs[0]["error"]["code"], 504);
}

TEST(ServerConfig, FileAndErrors) {
  ServeOptions o = default_serve_options();
  load_server_config("configs/server.json", o);
  EXPECT_EQ(o.http.port, 8080);
  EXPECT_GT(o.loop.max_queue, 0);
  apply_server_config(json{{"port", 0}, {"max_seqs", 3}, {"kv_cache_mb", 2.5}}, "test", o);
  EXPECT_EQ(o.http.port, 0);
  EXPECT_EQ(o.engine.max_seqs, 3);
  EXPECT_DOUBLE_EQ(o.kv_cache_mb, 2.5);
  EXPECT_THROW(apply_server_config(json{{"prot", 1}}, "test", o), Error);
  EXPECT_THROW(apply_server_config(json{{"port", 70000}}, "test", o), Error);
  EXPECT_THROW(apply_server_config(json{{"max_seqs", "3"}}, "test", o), Error);
  EXPECT_THROW(apply_server_config(json::array(), "test", o), Error);
  EXPECT_THROW(load_server_config("does/not/exist.json", o), Error);
}

}  // namespace
}  // namespace fineserve
