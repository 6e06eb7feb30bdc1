// The server's Prometheus metrics (prometheus-cpp), named after vLLM's and TGI's with the prefix
// fineserve_. docs/api.md lists them. Thread-safe: HTTP threads and the engine thread update them.
#pragma once

#include <memory>
#include <string>

#include "engine/engine.h"

namespace prometheus {
class Registry;
class Counter;
class Gauge;
class Histogram;
template <typename T>
class Family;
}  // namespace prometheus

namespace fineserve {

class Metrics {
 public:
  Metrics();
  ~Metrics();
  Metrics(const Metrics&) = delete;
  Metrics& operator=(const Metrics&) = delete;

  // HTTP side: one per generation request, with the status it was answered with.
  void count_request(std::string_view endpoint, int status);
  // Engine side, per request.
  void count_finished(FinishReason reason);
  void count_aborted(std::string_view reason);  // disconnect, timeout, shutdown, error
  void observe_request(double queue_s, double ttft_s, double e2e_s, double tpot_s, int prompt_tokens,
                       int generated_tokens);  // tpot_s < 0: fewer than two tokens
  void count_prompt_tokens(int n);
  void count_generated_tokens(int n);
  // Engine side, per step.
  void observe_step(int seqs, int tokens);
  void set_engine_state(const EngineStats& stats);

  // The text exposition format (GET /metrics).
  std::string serialize() const;

 private:
  std::shared_ptr<prometheus::Registry> registry_;
  prometheus::Family<prometheus::Counter>* requests_;
  prometheus::Family<prometheus::Counter>* success_;
  prometheus::Family<prometheus::Counter>* aborted_;
  prometheus::Counter* prompt_tokens_;
  prometheus::Counter* generation_tokens_;
  prometheus::Counter* preemptions_;
  uint64_t preemptions_seen_ = 0;  // engine thread only
  prometheus::Counter* prefix_cache_queries_;
  prometheus::Counter* prefix_cache_hits_;
  PrefixCacheStats prefix_cache_seen_;  // engine thread only
  prometheus::Histogram* ttft_;
  prometheus::Histogram* tpot_;
  prometheus::Histogram* e2e_;
  prometheus::Histogram* queue_;
  prometheus::Histogram* prompt_len_;
  prometheus::Histogram* generation_len_;
  prometheus::Histogram* batch_size_;
  prometheus::Histogram* batch_tokens_;
  prometheus::Gauge* running_;
  prometheus::Gauge* waiting_;
  prometheus::Gauge* kv_usage_;
  prometheus::Gauge* kv_free_blocks_;
  prometheus::Gauge* kv_total_blocks_;
};

}  // namespace fineserve
