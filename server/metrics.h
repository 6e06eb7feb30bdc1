// The server's Prometheus metrics (prometheus-cpp), named after vLLM's and TGI's with the prefix
// fineserve_, each labelled model_name. With MetricsOptions::vllm_names the same values are also
// exposed under vLLM's own names (vllm:num_requests_running, vllm:time_to_first_token_seconds,
// ...), so that dashboards and autoscalers written for vLLM work unchanged. docs/api.md lists them.
// Thread-safe: HTTP threads and the engine thread update them.
#pragma once

#include <memory>
#include <string>
#include <vector>

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

struct MetricsOptions {
  std::string model_name;   // the model_name label ("" for tests)
  bool vllm_names = false;  // also expose the vllm: families
};

class Metrics {
 public:
  explicit Metrics(const MetricsOptions& options = {});
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
  // fineserve_model_info{model, architecture, quantization, source_format} = 1 (set once at startup).
  void set_model_info(const std::string& name, const ModelInfo& info);

  // The text exposition format (GET /metrics).
  std::string serialize() const;

 private:
  // One set of families: fineserve_* always, vllm:* when asked for. Families absent from a set
  // (vLLM has no per-endpoint HTTP counter, for one) are null.
  struct Set {
    prometheus::Family<prometheus::Counter>* requests = nullptr;
    prometheus::Family<prometheus::Counter>* success = nullptr;
    prometheus::Family<prometheus::Counter>* aborted = nullptr;
    std::string success_label;  // finish_reason (ours) / finished_reason (vLLM's)
    prometheus::Counter* prompt_tokens = nullptr;
    prometheus::Counter* generation_tokens = nullptr;
    prometheus::Counter* preemptions = nullptr;
    prometheus::Counter* prefix_cache_queries = nullptr;
    prometheus::Counter* prefix_cache_hits = nullptr;
    prometheus::Histogram* ttft = nullptr;
    prometheus::Histogram* tpot = nullptr;
    prometheus::Histogram* e2e = nullptr;
    prometheus::Histogram* queue = nullptr;
    prometheus::Histogram* prompt_len = nullptr;
    prometheus::Histogram* generation_len = nullptr;
    prometheus::Histogram* batch_size = nullptr;
    prometheus::Histogram* batch_tokens = nullptr;
    prometheus::Gauge* running = nullptr;
    prometheus::Gauge* waiting = nullptr;
    std::vector<prometheus::Gauge*> kv_usage;  // vLLM has two names for it
    prometheus::Gauge* kv_free_blocks = nullptr;
    prometheus::Gauge* kv_total_blocks = nullptr;
  };

  std::shared_ptr<prometheus::Registry> registry_;
  std::vector<Set> sets_;
  uint64_t preemptions_seen_ = 0;       // engine thread only
  PrefixCacheStats prefix_cache_seen_;  // engine thread only
};

}  // namespace fineserve
