// The request fields clients and harnesses send beyond the basics, over real loopback HTTP:
// logprobs (checked against log_softmax of the model's own logits), echo and prompt scoring, n and
// best_of, penalties and logit_bias (checked against a hand-written greedy reference), min_tokens,
// stop_token_ids, TGI's root route and details, tokenize/detokenize, /openapi.json.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <fstream>
#include <map>
#include <numeric>

#include "server_util.h"

namespace fineserve {
namespace {

using json = nlohmann::json;
using namespace fineserve::testing;

class HttpFields : public SharedServerTest {};

// The golden model's logits at every position of `tokens`, from one full forward pass outside the
// server: row i is the distribution of the token after position i.
std::vector<std::vector<float>> reference_logits(const std::vector<int32_t>& tokens) {
  static auto backend = make_backend("cpu");
  static auto model = [] {
    auto m = load_model(kModelDir, *backend);
    m->allocate_kv_cache(16, 16);
    return m;
  }();
  const int n = static_cast<int>(tokens.size());
  StepInput in;
  in.token_ids = tokens;
  for (int i = 0; i < n; ++i) {
    in.positions.push_back(i);
    in.logit_rows.push_back(i);
  }
  in.query_start = {0, n};
  in.context_len = {n};
  in.max_blocks = (n + 15) / 16;
  for (int b = 0; b < in.max_blocks; ++b) in.block_table.push_back(b);
  const auto vocab = static_cast<size_t>(model->info().vocab_size);
  std::vector<float> flat(static_cast<size_t>(n) * vocab);
  model->forward(in, flat.data());
  std::vector<std::vector<float>> rows;
  for (int i = 0; i < n; ++i) rows.emplace_back(flat.begin() + static_cast<std::ptrdiff_t>(i * vocab), flat.begin() + static_cast<std::ptrdiff_t>((i + 1) * vocab));
  return rows;
}

double log_softmax(const std::vector<float>& row, int32_t token) {
  double max = -INFINITY;
  for (float x : row) max = std::max(max, static_cast<double>(x));
  double z = 0;
  for (float x : row) z += std::exp(static_cast<double>(x) - max);
  return static_cast<double>(row[static_cast<size_t>(token)]) - max - std::log(z);
}

// Ids of the k largest logits (ties: lower id).
std::vector<int32_t> top_ids(const std::vector<float>& row, int k) {
  std::vector<int32_t> ids(row.size());
  std::iota(ids.begin(), ids.end(), 0);
  std::stable_sort(ids.begin(), ids.end(), [&](int32_t a, int32_t b) { return row[static_cast<size_t>(a)] > row[static_cast<size_t>(b)]; });
  ids.resize(static_cast<size_t>(k));
  return ids;
}

const std::string kPrompt = "And God said, Let there be light";

TEST_F(HttpFields, CompletionLogprobsWithEchoAreTheModelsLogSoftmax) {
  auto c = server().client();
  const std::vector<int32_t> prompt = server().tokenizer->encode(kPrompt);
  Reply r = post(*c, "/v1/completions", json{{"prompt", kPrompt}, {"max_tokens", 5}, {"temperature", 0}, {"ignore_eos", true},
                                            {"logprobs", 3}, {"echo", true}});
  ASSERT_EQ(r.status, 200) << r.body;
  const json choice = r.json()["choices"][0];
  const json& lp = choice["logprobs"];
  const size_t n_prompt = prompt.size();
  ASSERT_EQ(lp["tokens"].size(), n_prompt + 5);
  ASSERT_EQ(lp["token_logprobs"].size(), n_prompt + 5);
  EXPECT_TRUE(lp["token_logprobs"][0].is_null()) << "the first prompt token has no logprob, as OpenAI";
  EXPECT_TRUE(lp["top_logprobs"][0].is_null());
  EXPECT_EQ(choice["text"].get<std::string>().rfind(kPrompt, 0), 0u) << "echo prepends the prompt";
  EXPECT_EQ(lp["text_offset"][0], 0);

  // The whole sequence: prompt + generated ids (generated ids from TGI-style tokenization of the
  // text would be ambiguous, so take them from the same request over /generate with details).
  Reply g = post(*c, "/generate", json{{"inputs", kPrompt}, {"parameters", {{"max_new_tokens", 5}, {"details", true}, {"ignore_eos", true},
                                                                          {"decoder_input_details", true}, {"top_n_tokens", 3}}}});
  ASSERT_EQ(g.status, 200) << g.body;
  const json details = g.json()["details"];
  std::vector<int32_t> all = prompt;
  for (const json& t : details["tokens"]) all.push_back(t["id"].get<int32_t>());
  ASSERT_EQ(all.size(), n_prompt + 5);
  const auto logits = reference_logits(all);

  for (size_t i = 1; i < all.size(); ++i) {
    const double want = log_softmax(logits[i - 1], all[i]);
    EXPECT_NEAR(lp["token_logprobs"][i].get<double>(), want, 1e-4) << "position " << i;
    // The top-3 alternatives are the 3 largest logits, with their log_softmax.
    const json& top = lp["top_logprobs"][i];
    for (int32_t id : top_ids(logits[i - 1], 3)) {
      std::string s;
      server().tokenizer->append_token_bytes(id, false, false, s);
      if (!top.contains(s)) continue;  // bytes that are not UTF-8 alone are spelled bytes:\x..
      EXPECT_NEAR(top[s].get<double>(), log_softmax(logits[i - 1], id), 1e-4) << "position " << i;
    }
    EXPECT_GE(top.size(), 3u);
  }
  // TGI's details: the prefill (first logprob null) and the generated tokens, with top_tokens.
  ASSERT_EQ(details["prefill"].size(), n_prompt);
  EXPECT_TRUE(details["prefill"][0]["logprob"].is_null());
  for (size_t i = 1; i < n_prompt; ++i) {
    EXPECT_EQ(details["prefill"][i]["id"], all[i]);
    EXPECT_NEAR(details["prefill"][i]["logprob"].get<double>(), log_softmax(logits[i - 1], all[i]), 1e-4);
  }
  ASSERT_EQ(details["top_tokens"].size(), 5u);
  for (size_t k = 0; k < 5; ++k) {
    const size_t pos = n_prompt + k;
    EXPECT_NEAR(details["tokens"][k]["logprob"].get<double>(), log_softmax(logits[pos - 1], all[pos]), 1e-4);
    const std::vector<int32_t> best = top_ids(logits[pos - 1], 3);
    ASSERT_EQ(details["top_tokens"][k].size(), 3u);
    for (size_t j = 0; j < 3; ++j) {
      EXPECT_EQ(details["top_tokens"][k][j]["id"], best[j]);
      EXPECT_NEAR(details["top_tokens"][k][j]["logprob"].get<double>(), log_softmax(logits[pos - 1], best[j]), 1e-4);
    }
    EXPECT_EQ(all[pos], best[0]) << "greedy picks the top token";
  }
}

TEST_F(HttpFields, LogprobsAreOfTheRawDistributionNotTheSampledOne) {
  // vLLM's default: temperature and penalties do not change the reported logprobs.
  auto c = server().client();
  const json base = {{"prompt", kPrompt}, {"max_tokens", 1}, {"logprobs", 1}, {"seed", 3}};
  Reply a = post(*c, "/v1/completions", base);
  json hot = base;
  hot["temperature"] = 1.7;
  hot["frequency_penalty"] = 1.5;
  Reply b = post(*c, "/v1/completions", hot);
  ASSERT_EQ(a.status, 200);
  ASSERT_EQ(b.status, 200);
  const std::vector<int32_t> prompt = server().tokenizer->encode(kPrompt);
  const auto logits = reference_logits(prompt);
  for (const Reply* r : {&a, &b}) {
    const json lp = r->json()["choices"][0]["logprobs"];
    const std::string tok = lp["tokens"][0];
    const std::vector<int32_t> ids = server().tokenizer->encode(tok, false);
    if (ids.size() != 1) continue;
    EXPECT_NEAR(lp["token_logprobs"][0].get<double>(), log_softmax(logits.back(), ids[0]), 1e-4);
  }
}

TEST_F(HttpFields, MaxTokensZeroWithEchoScoresThePrompt) {
  auto c = server().client();
  Reply r = post(*c, "/v1/completions", json{{"prompt", kPrompt}, {"max_tokens", 0}, {"echo", true}, {"logprobs", 1}});
  ASSERT_EQ(r.status, 200) << r.body;
  const json j = r.json();
  EXPECT_EQ(j["choices"][0]["text"], kPrompt);
  EXPECT_EQ(j["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(j["usage"]["completion_tokens"], 0);
  const std::vector<int32_t> prompt = server().tokenizer->encode(kPrompt);
  const auto logits = reference_logits(prompt);
  const json& lp = j["choices"][0]["logprobs"]["token_logprobs"];
  ASSERT_EQ(lp.size(), prompt.size());
  double sum = 0;
  for (size_t i = 1; i < prompt.size(); ++i) {
    EXPECT_NEAR(lp[i].get<double>(), log_softmax(logits[i - 1], prompt[i]), 1e-4);
    sum += lp[i].get<double>();
  }
  EXPECT_LT(sum, 0);
  // Streamed: one chunk with the prompt and its logprobs, then [DONE].
  StreamReply s = post_stream(*c, "/v1/completions", json{{"prompt", kPrompt}, {"max_tokens", 0}, {"echo", true}, {"logprobs", 0}, {"stream", true}});
  ASSERT_EQ(s.status, 200);
  ASSERT_EQ(s.events.size(), 2u) << s.raw;
  const json chunk = json::parse(s.events[0].data);
  EXPECT_EQ(chunk["choices"][0]["text"], kPrompt);
  EXPECT_EQ(chunk["choices"][0]["logprobs"]["token_logprobs"].size(), prompt.size());
  EXPECT_EQ(s.events[1].data, "[DONE]");
  // Without echo there is nothing to return: 422, as OpenAI.
  EXPECT_EQ(post(*c, "/v1/completions", json{{"prompt", kPrompt}, {"max_tokens", 0}}).status, 422);
}

TEST_F(HttpFields, ChatLogprobsAndTopLogprobs) {
  auto c = server().client();
  const json req = {{"messages", {{{"role", "user"}, {"content", "Hello"}}}}, {"max_tokens", 4}, {"temperature", 0},
                    {"ignore_eos", true}, {"logprobs", true}, {"top_logprobs", 2}};
  Reply r = post(*c, "/v1/chat/completions", req);
  ASSERT_EQ(r.status, 200) << r.body;
  const json content = r.json()["choices"][0]["logprobs"]["content"];
  ASSERT_EQ(content.size(), r.json()["usage"]["completion_tokens"].get<size_t>());
  for (const json& t : content) {
    ASSERT_EQ(t["top_logprobs"].size(), 2u);
    EXPECT_EQ(t["top_logprobs"][0]["logprob"], t["logprob"]) << "greedy: the chosen token is the most likely";
    EXPECT_GE(t["top_logprobs"][0]["logprob"].get<double>(), t["top_logprobs"][1]["logprob"].get<double>());
    EXPECT_TRUE(t["bytes"].is_array());
  }
  // Streamed: every token's logprobs arrive in its chunk.
  json sreq = req;
  sreq["stream"] = true;
  StreamReply s = post_stream(*c, "/v1/chat/completions", sreq);
  ASSERT_EQ(s.status, 200);
  json streamed = json::array();
  for (const SseEvent& e : s.events) {
    if (e.data == "[DONE]") continue;
    const json ch = json::parse(e.data);
    if (ch["choices"][0]["logprobs"].is_object())
      for (const json& t : ch["choices"][0]["logprobs"]["content"]) streamed.push_back(t);
  }
  EXPECT_EQ(streamed, content);
  // Without logprobs, none.
  EXPECT_TRUE(post(*c, "/v1/chat/completions", json{{"messages", {{{"role", "user"}, {"content", "Hi"}}}}, {"max_tokens", 2}})
                  .json()["choices"][0]["logprobs"].is_null());
}

TEST_F(HttpFields, GreedyChoicesAreIdenticalAndMatchNEqualsOne) {
  auto c = server().client();
  const json one = {{"prompt", kPrompt}, {"max_tokens", 8}, {"temperature", 0}, {"ignore_eos", true}};
  json three = one;
  three["n"] = 3;
  Reply a = post(*c, "/v1/completions", one);
  Reply b = post(*c, "/v1/completions", three);
  ASSERT_EQ(a.status, 200);
  ASSERT_EQ(b.status, 200) << b.body;
  const json jb = b.json();
  ASSERT_EQ(jb["choices"].size(), 3u);
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(jb["choices"][i]["index"], i);
    EXPECT_EQ(jb["choices"][i]["text"], a.json()["choices"][0]["text"]);
  }
  EXPECT_EQ(jb["usage"]["completion_tokens"], 24) << "usage counts every choice's tokens";
  EXPECT_EQ(jb["usage"]["prompt_tokens"], a.json()["usage"]["prompt_tokens"]) << "and the prompt once";

  // Chat, streamed: each choice's chunks carry its index; one [DONE] at the end.
  StreamReply s = post_stream(*c, "/v1/chat/completions", json{{"messages", {{{"role", "user"}, {"content", "Hi"}}}}, {"max_tokens", 5},
                                                               {"temperature", 0}, {"n", 2}, {"stream", true}, {"ignore_eos", true}});
  ASSERT_EQ(s.status, 200);
  std::map<int, std::string> text;
  std::map<int, int> finishes;
  for (const SseEvent& e : s.events) {
    if (e.data == "[DONE]") continue;
    const json ch = json::parse(e.data);
    const int i = ch["choices"][0]["index"];
    text[i] += ch["choices"][0]["delta"].value("content", "");
    if (!ch["choices"][0]["finish_reason"].is_null()) ++finishes[i];
  }
  EXPECT_EQ(s.events.back().data, "[DONE]");
  ASSERT_EQ(text.size(), 2u);
  EXPECT_EQ(text[0], text[1]);
  EXPECT_EQ(finishes[0], 1);
  EXPECT_EQ(finishes[1], 1);
}

TEST_F(HttpFields, SeedIsReproduciblePerChoice) {
  auto c = server().client();
  const json base = {{"prompt", kPrompt}, {"max_tokens", 10}, {"temperature", 1.0}, {"ignore_eos", true}};
  json n3 = base;
  n3["n"] = 3;
  n3["seed"] = 40;
  const json a = post(*c, "/v1/completions", n3).json();
  const json b = post(*c, "/v1/completions", n3).json();
  EXPECT_EQ(a["choices"], b["choices"]) << "same seed, same choices";
  for (int i = 0; i < 3; ++i) {
    json single = base;
    single["seed"] = 40 + i;  // choice i draws with seed + i
    EXPECT_EQ(post(*c, "/v1/completions", single).json()["choices"][0]["text"], a["choices"][i]["text"]) << "choice " << i;
  }
  EXPECT_NE(a["choices"][0]["text"], a["choices"][1]["text"]) << "independent draws (10 sampled tokens at T=1)";
}

TEST_F(HttpFields, BestOfReturnsTheMostLikelySequences) {
  auto c = server().client();
  Reply r = post(*c, "/v1/completions", json{{"prompt", kPrompt}, {"max_tokens", 6}, {"seed", 1}, {"ignore_eos", true},
                                            {"n", 2}, {"best_of", 4}, {"logprobs", 0}});
  ASSERT_EQ(r.status, 200) << r.body;
  const json j = r.json();
  ASSERT_EQ(j["choices"].size(), 2u);
  EXPECT_EQ(j["usage"]["completion_tokens"], 24) << "every sequence generated is counted, as OpenAI bills best_of";
  const auto total = [](const json& ch) {
    double s = 0;
    for (const json& x : ch["logprobs"]["token_logprobs"]) s += x.get<double>();
    return s;
  };
  EXPECT_GE(total(j["choices"][0]), total(j["choices"][1]));
  // The 4 candidates are the n = 4 choices with the same seed: the best two of them.
  const json all = post(*c, "/v1/completions", json{{"prompt", kPrompt}, {"max_tokens", 6}, {"seed", 1}, {"ignore_eos", true},
                                                    {"n", 4}, {"logprobs", 0}}).json();
  std::vector<double> totals;
  for (const json& ch : all["choices"]) totals.push_back(total(ch));
  std::sort(totals.rbegin(), totals.rend());
  EXPECT_NEAR(total(j["choices"][0]), totals[0], 1e-3);
  EXPECT_NEAR(total(j["choices"][1]), totals[1], 1e-3);

  // TGI: the best one, the others in details.best_of_sequences.
  Reply t = post(*c, "/generate", json{{"inputs", kPrompt}, {"parameters", {{"max_new_tokens", 4}, {"best_of", 3}, {"do_sample", true},
                                                                          {"seed", 5}, {"details", true}, {"ignore_eos", true}}}});
  ASSERT_EQ(t.status, 200) << t.body;
  const json d = t.json()["details"];
  ASSERT_EQ(d["best_of_sequences"].size(), 2u);
  EXPECT_EQ(d["best_of_sequences"][0]["generated_tokens"], 4);
}

// Greedy decoding with OpenAI's penalties and logit_bias, computed by hand from the model's logits.
std::vector<int32_t> reference_penalised_greedy(const std::vector<int32_t>& prompt, int n, float presence, float frequency,
                                                const std::map<int32_t, float>& bias) {
  std::vector<int32_t> all = prompt, out;
  for (int step = 0; step < n; ++step) {
    std::vector<float> row = reference_logits(all).back();
    std::map<int32_t, int> count;
    for (int32_t t : out) ++count[t];
    for (const auto& [t, k] : count) row[static_cast<size_t>(t)] -= static_cast<float>(k) * frequency + presence;
    for (const auto& [t, b] : bias) row[static_cast<size_t>(t)] += b;
    const int32_t next = static_cast<int32_t>(std::max_element(row.begin(), row.end()) - row.begin());
    out.push_back(next);
    all.push_back(next);
  }
  return out;
}

std::vector<int32_t> generated_ids(const Reply& r) {
  EXPECT_EQ(r.status, 200) << r.body;
  std::vector<int32_t> ids;
  const json j = r.json();  // (a named value: a range-for does not keep r.json()'s temporary alive)
  for (const json& t : j["details"]["tokens"]) ids.push_back(t["id"]);
  return ids;
}

TEST_F(HttpFields, PenaltiesAndLogitBiasMatchAHandComputedReference) {
  auto c = server().client();
  const std::vector<int32_t> prompt = server().tokenizer->encode(kPrompt);
  const int n = 8;
  // Greedy on this tiny model repeats itself, so penalties change the path.
  const std::vector<int32_t> plain = reference_penalised_greedy(prompt, n, 0, 0, {});
  const auto tgi = [&](json params) {
    params["max_new_tokens"] = n;
    params["details"] = true;
    params["ignore_eos"] = true;
    return post(*c, "/generate", json{{"inputs", kPrompt}, {"parameters", params}});
  };
  EXPECT_EQ(generated_ids(tgi(json::object())), plain);
  for (const auto& [presence, frequency] : std::vector<std::pair<float, float>>{{1.5f, 0}, {0, 0.8f}, {0.5f, 1.0f}, {-1.0f, 0}}) {
    const auto want = reference_penalised_greedy(prompt, n, presence, frequency, {});
    Reply r = tgi(json{{"presence_penalty", presence}, {"frequency_penalty", frequency}});
    ASSERT_EQ(r.status, 200) << r.body;
    EXPECT_EQ(generated_ids(r), want) << "presence " << presence << " frequency " << frequency;
  }
  // A bias against the greedy path's first token, and one towards another token.
  const std::map<int32_t, float> bias = {{plain[0], -100.0f}, {17, 3.5f}};
  json lb = json::object();
  for (const auto& [t, b] : bias) lb[std::to_string(t)] = b;
  const auto want = reference_penalised_greedy(prompt, n, 0, 0, bias);
  EXPECT_NE(want, plain);
  Reply r = post(*c, "/v1/completions", json{{"prompt", kPrompt}, {"max_tokens", n}, {"temperature", 0}, {"ignore_eos", true},
                                            {"logit_bias", lb}, {"logprobs", 0}});
  ASSERT_EQ(r.status, 200) << r.body;
  Reply rt = tgi(json{{"logit_bias", lb}});
  EXPECT_EQ(generated_ids(rt), want);
  EXPECT_EQ(r.json()["choices"][0]["logprobs"]["tokens"].size(), static_cast<size_t>(n));
}

TEST_F(HttpFields, MinTokensStopTokenIdsAndIgnoreEos) {
  auto c = server().client();
  const int eos = 2;  // the golden OPT's
  const json push_eos = {{std::to_string(eos), 100}};
  // EOS is forced by the bias: it ends the request at once...
  Reply r = post(*c, "/v1/completions", json{{"prompt", kPrompt}, {"max_tokens", 8}, {"temperature", 0}, {"logit_bias", push_eos}});
  ASSERT_EQ(r.status, 200) << r.body;
  EXPECT_EQ(r.json()["usage"]["completion_tokens"], 1);
  EXPECT_EQ(r.json()["choices"][0]["finish_reason"], "stop");
  // ...unless min_tokens holds it back,
  r = post(*c, "/v1/completions", json{{"prompt", kPrompt}, {"max_tokens", 8}, {"temperature", 0}, {"logit_bias", push_eos}, {"min_tokens", 3}});
  EXPECT_EQ(r.json()["usage"]["completion_tokens"], 4) << r.body;
  EXPECT_EQ(r.json()["choices"][0]["finish_reason"], "stop");
  // ...or ignore_eos keeps going.
  r = post(*c, "/v1/completions", json{{"prompt", kPrompt}, {"max_tokens", 5}, {"temperature", 0}, {"logit_bias", push_eos}, {"ignore_eos", true}});
  EXPECT_EQ(r.json()["usage"]["completion_tokens"], 5);
  EXPECT_EQ(r.json()["choices"][0]["finish_reason"], "length");
  // stop_token_ids end generation like EOS (TGI says eos_token), also with ignore_eos.
  Reply g = post(*c, "/generate", json{{"inputs", kPrompt}, {"parameters", {{"max_new_tokens", 8}, {"logit_bias", {{"17", 100}}},
                                                                          {"stop_token_ids", {17}}, {"ignore_eos", true}, {"details", true}}}});
  ASSERT_EQ(g.status, 200) << g.body;
  EXPECT_EQ(g.json()["details"]["generated_tokens"], 1);
  EXPECT_EQ(g.json()["details"]["finish_reason"], "eos_token");
}

TEST_F(HttpFields, TgiRootRouteDispatchesOnStream) {
  auto c = server().client();
  const json params = {{"max_new_tokens", 4}, {"ignore_eos", true}, {"details", true}};
  Reply a = post(*c, "/", json{{"inputs", kPrompt}, {"parameters", params}});
  Reply b = post(*c, "/generate", json{{"inputs", kPrompt}, {"parameters", params}});
  ASSERT_EQ(a.status, 200) << a.body;
  ASSERT_TRUE(a.json().is_array()) << "TGI's root route answers an array of one response";
  EXPECT_EQ(a.json()[0]["generated_text"], b.json()["generated_text"]);
  StreamReply s = post_stream(*c, "/", json{{"inputs", kPrompt}, {"parameters", params}, {"stream", true}});
  ASSERT_EQ(s.status, 200);
  ASSERT_EQ(s.events.size(), 4u) << s.raw;
  EXPECT_EQ(json::parse(s.events.back().data)["generated_text"], b.json()["generated_text"]);
  EXPECT_EQ(post(*c, "/", std::string("{")).status, 400);
  EXPECT_EQ(post(*c, "/", json{{"inputs", ""}}).status, 422);
}

TEST_F(HttpFields, TokenizeAndDetokenize) {
  auto c = server().client();
  Reply r = post(*c, "/tokenize", json{{"prompt", kPrompt}});
  ASSERT_EQ(r.status, 200) << r.body;
  const std::vector<int32_t> want = server().tokenizer->encode(kPrompt);
  EXPECT_EQ(r.json()["tokens"].get<std::vector<int32_t>>(), want);
  EXPECT_EQ(r.json()["count"], want.size());
  EXPECT_EQ(r.json()["max_model_len"], 128);
  r = post(*c, "/tokenize", json{{"prompt", kPrompt}, {"add_special_tokens", false}});
  EXPECT_EQ(r.json()["tokens"].get<std::vector<int32_t>>(), server().tokenizer->encode(kPrompt, false));
  r = post(*c, "/tokenize", json{{"messages", {{{"role", "user"}, {"content", "Hi"}}}}});
  ASSERT_EQ(r.status, 200) << r.body;
  EXPECT_EQ(r.json()["tokens"].get<std::vector<int32_t>>(),
            server().tokenizer->encode(render_chat_template({{"user", "Hi"}}, true)));
  r = post(*c, "/detokenize", json{{"tokens", server().tokenizer->encode(kPrompt, false)}});
  ASSERT_EQ(r.status, 200) << r.body;
  EXPECT_EQ(r.json()["prompt"], kPrompt);
  EXPECT_EQ(post(*c, "/detokenize", json{{"tokens", {1, 1000}}}).status, 422);
  EXPECT_EQ(post(*c, "/detokenize", json{{"tokens", "abc"}}).status, 400);
  EXPECT_EQ(post(*c, "/tokenize", json{{"prompt", 1}}).status, 400);
  EXPECT_EQ(post(*c, "/tokenize", json::object()).status, 422);
}

TEST_F(HttpFields, NewFieldErrorsOverHttp) {
  auto c = server().client();
  const auto status = [&](const std::string& path, const json& body) { return post(*c, path, body).status; };
  const json chat_msgs = {{{"role", "user"}, {"content", "x"}}};
  EXPECT_EQ(status("/v1/completions", {{"prompt", "x"}, {"logprobs", 21}}), 422);
  EXPECT_EQ(status("/v1/completions", {{"prompt", "x"}, {"n", 0}}), 422);
  EXPECT_EQ(status("/v1/completions", {{"prompt", "x"}, {"n", 2}, {"best_of", 1}}), 422);
  EXPECT_EQ(status("/v1/completions", {{"prompt", "x"}, {"presence_penalty", 3}}), 422);
  EXPECT_EQ(status("/v1/completions", {{"prompt", "x"}, {"frequency_penalty", "1"}}), 400);
  EXPECT_EQ(status("/v1/completions", {{"prompt", "x"}, {"logit_bias", {{"1000", 1}}}}), 422);
  EXPECT_EQ(status("/v1/completions", {{"prompt", "x"}, {"logit_bias", {{"1", -101}}}}), 422);
  EXPECT_EQ(status("/v1/completions", {{"prompt", "x"}, {"min_tokens", 20}, {"max_tokens", 2}}), 422);
  EXPECT_EQ(status("/v1/completions", {{"prompt", "x"}, {"stop_token_ids", {5000}}}), 422);
  EXPECT_EQ(status("/v1/chat/completions", {{"messages", chat_msgs}, {"top_logprobs", 3}}), 422);
  EXPECT_EQ(status("/v1/chat/completions", {{"messages", chat_msgs}, {"logprobs", 1}}), 400);
  EXPECT_EQ(status("/generate", {{"inputs", "x"}, {"parameters", {{"top_n_tokens", 50}}}}), 422);
  EXPECT_EQ(status("/generate", {{"inputs", "x"}, {"parameters", {{"best_of", 2}}}}), 422) << "needs sampling";
  EXPECT_EQ(status("/generate_stream", {{"inputs", "x"}, {"parameters", {{"best_of", 2}, {"do_sample", true}}}}), 422);
  // Unknown fields pass.
  EXPECT_EQ(status("/v1/completions", {{"prompt", "x"}, {"max_tokens", 1}, {"some_future_field", {1, 2}}}), 200);
  EXPECT_EQ(status("/v1/chat/completions", {{"messages", chat_msgs}, {"max_tokens", 1}, {"metadata", {{"a", "b"}}}}), 200);
}

// Chunked prefill (4 tokens a step) scores the prompt across chunks, each position once.
TEST(HttpFieldsChunked, PromptLogprobsAcrossPrefillChunks) {
  TestServerOptions o;
  o.engine.max_batch_tokens = 4;
  TestServer s(o);
  auto c = s.client();
  Reply r = post(*c, "/v1/completions", json{{"prompt", kPrompt}, {"max_tokens", 2}, {"echo", true}, {"logprobs", 2}, {"n", 2},
                                            {"temperature", 0}, {"ignore_eos", true}});
  ASSERT_EQ(r.status, 200) << r.body;
  const std::vector<int32_t> prompt = s.tokenizer->encode(kPrompt);
  const auto logits = reference_logits(prompt);
  const json j = r.json();
  for (const json& choice : j["choices"]) {
    const json& lp = choice["logprobs"]["token_logprobs"];
    ASSERT_EQ(lp.size(), prompt.size() + 2);
    for (size_t i = 1; i < prompt.size(); ++i) EXPECT_NEAR(lp[i].get<double>(), log_softmax(logits[i - 1], prompt[i]), 1e-4) << i;
  }
}

TEST(HttpFieldsCancel, DisconnectFreesEveryChoice) {
  TestServerOptions o;
  o.forward_delay_ms = 10;
  TestServer s(o);
  auto c = s.client();
  int seen = 0;
  StreamReply st = post_stream(*c, "/v1/completions", json{{"prompt", kPrompt}, {"max_tokens", 100}, {"n", 4}, {"stream", true}, {"ignore_eos", true}},
                               [&](const SseEvent&) { return ++seen < 3; });
  EXPECT_EQ(seen, 3);
  ASSERT_TRUE(eventually([&] {
    const EngineStats st2 = s.loop->stats();
    return st2.free_blocks == st2.total_blocks && st2.running == 0 && s.loop->in_flight() == 0;
  })) << "all 4 sequences left the engine";
}

// The n choices share one prefill: the prefix-cache metrics show choices 1..3 finding choice 0's
// full prompt blocks, and the first request still reports no cached prompt tokens.
TEST(HttpFieldsShared, NChoicesComputeThePromptOnce) {
  TestServer s;
  auto c = s.client();
  std::string prompt = kPrompt;
  for (int i = 0; i < 6; ++i) prompt += ". " + kPrompt;
  const int n_prompt = static_cast<int>(s.tokenizer->encode(prompt).size());
  ASSERT_GT(n_prompt, 2 * 16);
  const Reply r = post(*c, "/v1/completions", json{{"prompt", prompt}, {"max_tokens", 3}, {"n", 4}, {"temperature", 0}, {"ignore_eos", true}});
  ASSERT_EQ(r.status, 200) << r.body;
  const json j = r.json();
  ASSERT_EQ(j["choices"].size(), 4u);
  for (const json& choice : j["choices"]) EXPECT_EQ(choice["text"], j["choices"][0]["text"]);
  EXPECT_EQ(j["usage"]["prompt_tokens"], n_prompt);
  EXPECT_EQ(j["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
  const std::string m = get(*c, "/metrics").body;
  const int shared = (n_prompt - 1) / 16 * 16;  // full blocks, never the last token
  EXPECT_EQ(metric_value(m, "fineserve_prefix_cache_hits_total"), 3.0 * shared);
}

TEST_F(HttpFields, OpenApiDocumentIsServedAndListsTheRoutes) {
  auto c = server().client();
  Reply r = get(*c, "/openapi.json");
  ASSERT_EQ(r.status, 200);
  const json doc = r.json();
  std::ifstream committed(std::string(FINESERVE_TEST_DATA) + "/../../docs/openapi.json");
  ASSERT_TRUE(committed.good());
  EXPECT_EQ(doc, json::parse(committed)) << "the server serves the committed document";
  EXPECT_EQ(doc["openapi"].get<std::string>().substr(0, 2), "3.");
  // Every route the document lists answers (no 404), and every POST route is listed.
  for (auto it = doc["paths"].begin(); it != doc["paths"].end(); ++it) {
    for (auto op = it.value().begin(); op != it.value().end(); ++op) {
      const Reply probe = op.key() == "get" ? get(*c, it.key()) : post(*c, it.key(), std::string("{}"));
      EXPECT_NE(probe.status, 404) << op.key() << " " << it.key();
    }
  }
  for (const char* path : {"/", "/generate", "/generate_stream", "/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"})
    EXPECT_TRUE(doc["paths"].contains(path)) << path;
}

}  // namespace
}  // namespace fineserve
