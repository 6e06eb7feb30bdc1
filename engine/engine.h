// The generation loop: continuous batching over a paged KV cache, one model step at a time.
//
// Scheduling rule (DESIGN): every sequence has num_computed (tokens whose keys and values are in
// the cache) and num_tokens (prompt + generated). Each step hands out tokens under a token budget
// (max_batch_tokens) and a sequence cap (max_seqs), first to running sequences in arrival order,
// then to waiting ones (FCFS): a decoding sequence takes 1 token, a prefilling one
// min(remaining, budget left) (chunked prefill). A sequence is admitted only when KV blocks for
// its chunk are free; when a running sequence cannot grow, the youngest running sequence is
// preempted (its blocks freed) and recomputed from its tokens later. With prefix caching
// (EngineConfig::prefix_caching), admission starts a sequence after its longest cached full-block
// prefix (BlockManager::match_prefix) and each step registers the blocks it filled (commit).
//
// The n choices of one request share its prompt's KV blocks: choice 0 prefills, the others are
// admitted after it and take its full blocks from the prefix cache (awaits_shared_prefill).
//
// The same loop serves `fineserve generate` (generate()) and the HTTP server (add/step/cancel).
#pragma once

#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "engine/grammar/grammar.h"
#include "engine/kv_cache.h"
#include "engine/sampler.h"
#include "engine/stop.h"
#include "models/model.h"
#include "models/tokenizer/tokenizer.h"

namespace fineserve {

struct EngineConfig {
  int block_size = 16;
  int num_blocks = 0;            // 0: derived from kv_cache_bytes
  uint64_t kv_cache_bytes = 256ull << 20;
  int max_batch_tokens = 512;    // tokens per step (prefill chunks + decodes)
  int max_seqs = 32;             // sequences per step
  bool prefix_caching = true;    // share the KV blocks of common prompt prefixes (kv_cache.h)
};

// A fully resolved request: its caller (the HTTP API's resolve_request, `fineserve generate`)
// has checked it against the model, and Engine::add only asserts these invariants:
//   prompt non-empty, every id in [0, vocab); prompt.size() + stop.max_new_tokens <= max_context;
//   sampling and stop valid; n >= 1; logit_bias ids in [0, vocab).
struct GenerationRequest {
  std::vector<int32_t> prompt;  // token ids (BOS already applied by the tokenizer)
  SamplingParams sampling;      // choice i draws with seed sampling.seed + i
  StopConditions stop;          // the model's EOS is added to stop.eos_token_ids unless ignore_eos
  bool ignore_eos = false;
  int n = 1;                    // independent sequences (choices) generated from the prompt,
                                // sharing its prefill when prefix caching is on
  int top_logprobs = 0;         // alternatives reported per generated token (TokenEvent::top)
  bool prompt_logprobs = false; // report the prompt's logprobs (choice 0's first event)
  // Constrained decoding (engine/grammar): only tokens the grammar allows are sampled; null: none.
  // Each choice runs its own automaton.
  std::shared_ptr<const grammar::Grammar> grammar;
};

// One generated token of one choice, as the engine reports it after a step. Log-probabilities
// are of the model's raw distribution (log_softmax of its logits, before penalties, bias and
// temperature), as vLLM reports them; a grammar's mask, like vLLM's, applies before them.
struct TokenEvent {
  uint64_t request_id = 0;
  int choice = 0;            // which of the request's n sequences
  int32_t token = -1;        // -1: no token (a max_new_tokens == 0 request ending after its prefill)
  float logprob = 0;
  std::vector<TokenLogprob> top;  // GenerationRequest::top_logprobs best alternatives, best first
  std::string text;  // text that is safe to emit now (stop strings held back)
  std::optional<FinishReason> finish;
  int cached_tokens = 0;  // prompt tokens found in the prefix cache when the sequence was admitted
  // With choice 0's first event when prompt_logprobs: one entry per prompt token after the first
  // (the first has no context to be predicted from), with top_logprobs alternatives.
  std::vector<PositionLogprobs> prompt_logprobs;
};

struct GenerationResult {  // of choice 0
  std::vector<int32_t> tokens;
  std::string text;
  FinishReason finish = FinishReason::Length;
};

// What the last step() scheduled, for the server's metrics (batch size, batched tokens, queue time).
struct StepStats {
  int seqs = 0;               // sequences in the step
  int tokens = 0;             // tokens in the step (prefill chunks + decodes)
  std::vector<uint64_t> ids;  // their request ids
};

struct EngineStats {
  int running = 0, waiting = 0;  // sequences (a request with n choices counts n)
  double kv_usage = 0;
  int free_blocks = 0, total_blocks = 0;
  uint64_t preemptions = 0;
  PrefixCacheStats prefix_cache;  // cumulative, in tokens
};

class Engine {
 public:
  // tokenizer may be null (benchmarks on synthetic models): events then carry no text and stop
  // strings never match.
  Engine(Model& model, const Tokenizer* tokenizer, const EngineConfig& config);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Queues a request (n sequences). Throws fineserve::Error when one of its sequences could never
  // fit in the KV cache; a request breaking GenerationRequest's invariants is a bug (FS_ASSERT).
  uint64_t add(GenerationRequest request);
  // Drops a request (finished or not, all its sequences) and frees their KV blocks; unknown ids
  // are ignored.
  void cancel(uint64_t request_id);
  // Schedules and runs one step; returns the tokens it generated. Empty when idle.
  std::vector<TokenEvent> step();
  bool idle() const { return running_.empty() && waiting_.empty(); }
  EngineStats stats() const;
  const StepStats& last_step() const { return last_step_; }
  const EngineConfig& config() const { return config_; }
  const Model& model() const { return model_; }
  const BlockManager& blocks() const { return blocks_; }

  // Runs requests to completion (prefill then decode, batched); on_event sees every token.
  std::vector<GenerationResult> generate(std::vector<GenerationRequest> requests,
                                         const std::function<void(const TokenEvent&)>& on_event = {});

 private:
  struct Sequence;
  bool try_grow(Sequence& seq, int64_t n_tokens);
  bool awaits_shared_prefill(const Sequence& seq) const;
  void preempt(Sequence& seq);
  void finish(SeqId key);

  Model& model_;
  const Tokenizer* tokenizer_;
  EngineConfig config_;
  BlockManager blocks_;
  uint64_t next_id_ = 1;
  SeqId next_key_ = 1;  // KV-cache key of each sequence
  uint64_t preemptions_ = 0;
  std::vector<std::unique_ptr<Sequence>> running_;  // arrival order
  std::deque<std::unique_ptr<Sequence>> waiting_;   // FCFS
  std::vector<float> logits_;
  StepStats last_step_;
};

}  // namespace fineserve
