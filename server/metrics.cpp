#include "server/metrics.h"

#include <prometheus/counter.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>
#include <prometheus/text_serializer.h>

namespace fineserve {
namespace {

using prometheus::Histogram;

// Latency buckets (seconds) as vLLM uses: from 1 ms to a few minutes.
const Histogram::BucketBoundaries kLatency = {0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5,
                                              0.75,  1.0,   2.5,  5.0,  7.5,  10,   20,   40,   80,  160};
const Histogram::BucketBoundaries kPerToken = {0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05,
                                               0.075, 0.1,    0.15,  0.2,  0.3,   0.4,  0.5,   0.75, 1.0,  2.5};
const Histogram::BucketBoundaries kCounts = {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192};

Histogram* histogram(prometheus::Registry& reg, const std::string& name, const std::string& help,
                     const Histogram::BucketBoundaries& buckets) {
  return &prometheus::BuildHistogram().Name(name).Help(help).Register(reg).Add({}, buckets);
}
prometheus::Gauge* gauge(prometheus::Registry& reg, const std::string& name, const std::string& help) {
  return &prometheus::BuildGauge().Name(name).Help(help).Register(reg).Add({});
}
prometheus::Counter* counter(prometheus::Registry& reg, const std::string& name, const std::string& help) {
  return &prometheus::BuildCounter().Name(name).Help(help).Register(reg).Add({});
}

}  // namespace

Metrics::Metrics() : registry_(std::make_shared<prometheus::Registry>()) {
  auto& reg = *registry_;
  requests_ = &prometheus::BuildCounter()
                   .Name("fineserve_requests_total")
                   .Help("Generation requests by endpoint and HTTP status")
                   .Register(reg);
  success_ = &prometheus::BuildCounter()
                  .Name("fineserve_request_success_total")
                  .Help("Requests that finished generating, by finish reason (length, eos_token, stop_sequence)")
                  .Register(reg);
  aborted_ = &prometheus::BuildCounter()
                  .Name("fineserve_request_aborted_total")
                  .Help("Requests cancelled before finishing, by reason (disconnect, timeout, shutdown, error)")
                  .Register(reg);
  prompt_tokens_ = counter(reg, "fineserve_prompt_tokens_total", "Prompt tokens of admitted requests");
  generation_tokens_ = counter(reg, "fineserve_generation_tokens_total", "Generated tokens");
  preemptions_ = counter(reg, "fineserve_num_preemptions_total", "Sequences preempted (KV cache full) and recomputed later");
  prefix_cache_queries_ = counter(reg, "fineserve_prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache (one lookup per admission)");
  prefix_cache_hits_ = counter(reg, "fineserve_prefix_cache_hits_total", "Prompt tokens found in the prefix cache (their KV blocks reused, not recomputed)");
  ttft_ = histogram(reg, "fineserve_time_to_first_token_seconds", "Time from arrival to the first generated token", kLatency);
  tpot_ = histogram(reg, "fineserve_time_per_output_token_seconds", "Mean time between generated tokens of a request", kPerToken);
  e2e_ = histogram(reg, "fineserve_e2e_request_latency_seconds", "Time from arrival to the last token", kLatency);
  queue_ = histogram(reg, "fineserve_request_queue_time_seconds", "Time from arrival to the first scheduled step", kLatency);
  prompt_len_ = histogram(reg, "fineserve_request_prompt_tokens", "Prompt tokens per request", kCounts);
  generation_len_ = histogram(reg, "fineserve_request_generation_tokens", "Generated tokens per request", kCounts);
  batch_size_ = histogram(reg, "fineserve_batch_size", "Sequences per engine step", kCounts);
  batch_tokens_ = histogram(reg, "fineserve_batch_tokens", "Tokens per engine step (prefill chunks + decodes)", kCounts);
  running_ = gauge(reg, "fineserve_num_requests_running", "Requests in the running batch");
  waiting_ = gauge(reg, "fineserve_num_requests_waiting", "Requests waiting to be scheduled");
  kv_usage_ = gauge(reg, "fineserve_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use (0..1)");
  kv_free_blocks_ = gauge(reg, "fineserve_kv_cache_free_blocks", "Free KV-cache blocks");
  kv_total_blocks_ = gauge(reg, "fineserve_kv_cache_total_blocks", "KV-cache blocks");
}

Metrics::~Metrics() = default;

void Metrics::count_request(std::string_view endpoint, int status) {
  requests_->Add({{"endpoint", std::string(endpoint)}, {"status", std::to_string(status)}}).Increment();
}

void Metrics::count_finished(FinishReason reason) {
  success_->Add({{"finish_reason", std::string(finish_reason_name(reason))}}).Increment();
}

void Metrics::count_aborted(std::string_view reason) { aborted_->Add({{"reason", std::string(reason)}}).Increment(); }

void Metrics::observe_request(double queue_s, double ttft_s, double e2e_s, double tpot_s, int prompt_tokens,
                              int generated_tokens) {
  queue_->Observe(queue_s);
  ttft_->Observe(ttft_s);
  e2e_->Observe(e2e_s);
  if (tpot_s >= 0) tpot_->Observe(tpot_s);
  prompt_len_->Observe(prompt_tokens);
  generation_len_->Observe(generated_tokens);
}

void Metrics::count_prompt_tokens(int n) { prompt_tokens_->Increment(n); }
void Metrics::count_generated_tokens(int n) { generation_tokens_->Increment(n); }

void Metrics::observe_step(int seqs, int tokens) {
  batch_size_->Observe(seqs);
  batch_tokens_->Observe(tokens);
}

void Metrics::set_engine_state(const EngineStats& s) {
  running_->Set(s.running);
  waiting_->Set(s.waiting);
  kv_usage_->Set(s.kv_usage);
  kv_free_blocks_->Set(s.free_blocks);
  kv_total_blocks_->Set(s.total_blocks);
  if (s.preemptions > preemptions_seen_) {
    preemptions_->Increment(static_cast<double>(s.preemptions - preemptions_seen_));
    preemptions_seen_ = s.preemptions;
  }
  // Prefix cache: the engine's counters are cumulative; add what is new since the last call.
  if (s.prefix_cache.queries > prefix_cache_seen_.queries) {
    prefix_cache_queries_->Increment(static_cast<double>(s.prefix_cache.queries - prefix_cache_seen_.queries));
    prefix_cache_hits_->Increment(static_cast<double>(s.prefix_cache.hits - prefix_cache_seen_.hits));
    prefix_cache_seen_ = s.prefix_cache;
  }
}

std::string Metrics::serialize() const {
  return prometheus::TextSerializer().Serialize(registry_->Collect());
}

}  // namespace fineserve
