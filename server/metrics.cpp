#include "server/metrics.h"

#include <algorithm>
#include <map>

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

using Labels = std::map<std::string, std::string>;

Histogram* histogram(prometheus::Registry& reg, const std::string& name, const std::string& help,
                     const Histogram::BucketBoundaries& buckets, const Labels& labels) {
  return &prometheus::BuildHistogram().Name(name).Help(help).Labels(labels).Register(reg).Add({}, buckets);
}
prometheus::Gauge* gauge(prometheus::Registry& reg, const std::string& name, const std::string& help, const Labels& labels) {
  return &prometheus::BuildGauge().Name(name).Help(help).Labels(labels).Register(reg).Add({});
}
prometheus::Counter* counter(prometheus::Registry& reg, const std::string& name, const std::string& help, const Labels& labels) {
  return &prometheus::BuildCounter().Name(name).Help(help).Labels(labels).Register(reg).Add({});
}
prometheus::Family<prometheus::Counter>* counter_family(prometheus::Registry& reg, const std::string& name,
                                                        const std::string& help, const Labels& labels) {
  return &prometheus::BuildCounter().Name(name).Help(help).Labels(labels).Register(reg);
}

}  // namespace

Metrics::Metrics(const MetricsOptions& options) : registry_(std::make_shared<prometheus::Registry>()) {
  auto& reg = *registry_;
  Labels labels;
  if (!options.model_name.empty()) labels["model_name"] = options.model_name;

  Set f;
  f.requests = counter_family(reg, "fineserve_requests_total", "Generation requests by endpoint and HTTP status", labels);
  f.success = counter_family(reg, "fineserve_request_success_total",
                             "Requests that finished generating, by finish reason (length, eos_token, stop_sequence)", labels);
  f.success_label = "finish_reason";
  f.aborted = counter_family(reg, "fineserve_request_aborted_total",
                             "Requests cancelled before finishing, by reason (disconnect, timeout, shutdown, error)", labels);
  f.prompt_tokens = counter(reg, "fineserve_prompt_tokens_total", "Prompt tokens of admitted requests", labels);
  f.generation_tokens = counter(reg, "fineserve_generation_tokens_total", "Generated tokens", labels);
  f.preemptions = counter(reg, "fineserve_num_preemptions_total", "Sequences preempted (KV cache full) and recomputed later", labels);
  f.prefix_cache_queries = counter(reg, "fineserve_prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache (one lookup per admission)", labels);
  f.prefix_cache_hits = counter(reg, "fineserve_prefix_cache_hits_total", "Prompt tokens found in the prefix cache (their KV blocks reused, not recomputed)", labels);
  f.ttft = histogram(reg, "fineserve_time_to_first_token_seconds", "Time from arrival to the first generated token", kLatency, labels);
  f.tpot = histogram(reg, "fineserve_time_per_output_token_seconds", "Mean time between generated tokens of a request", kPerToken, labels);
  f.e2e = histogram(reg, "fineserve_e2e_request_latency_seconds", "Time from arrival to the last token", kLatency, labels);
  f.queue = histogram(reg, "fineserve_request_queue_time_seconds", "Time from arrival to the first scheduled step", kLatency, labels);
  f.prompt_len = histogram(reg, "fineserve_request_prompt_tokens", "Prompt tokens per request", kCounts, labels);
  f.generation_len = histogram(reg, "fineserve_request_generation_tokens", "Generated tokens per request", kCounts, labels);
  f.batch_size = histogram(reg, "fineserve_batch_size", "Sequences per engine step", kCounts, labels);
  f.batch_tokens = histogram(reg, "fineserve_batch_tokens", "Tokens per engine step (prefill chunks + decodes)", kCounts, labels);
  f.running = gauge(reg, "fineserve_num_requests_running", "Requests in the running batch", labels);
  f.waiting = gauge(reg, "fineserve_num_requests_waiting", "Requests waiting to be scheduled", labels);
  f.kv_usage = {gauge(reg, "fineserve_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use (0..1)", labels)};
  f.kv_free_blocks = gauge(reg, "fineserve_kv_cache_free_blocks", "Free KV-cache blocks", labels);
  f.kv_total_blocks = gauge(reg, "fineserve_kv_cache_total_blocks", "KV-cache blocks", labels);
  sets_.push_back(f);

  if (options.vllm_names) {
    // vLLM's names, types and label names, for dashboards and autoscalers built on them.
    Set v;
    v.success = counter_family(reg, "vllm:request_success_total", "Count of successfully processed requests.", labels);
    v.success_label = "finished_reason";
    v.prompt_tokens = counter(reg, "vllm:prompt_tokens_total", "Number of prefill tokens processed.", labels);
    v.generation_tokens = counter(reg, "vllm:generation_tokens_total", "Number of generation tokens processed.", labels);
    v.preemptions = counter(reg, "vllm:num_preemptions_total", "Cumulative number of preemption from the engine.", labels);
    v.prefix_cache_queries = counter(reg, "vllm:prefix_cache_queries_total", "Prefix cache queries, in terms of number of queried tokens.", labels);
    v.prefix_cache_hits = counter(reg, "vllm:prefix_cache_hits_total", "Prefix cache hits, in terms of number of cached tokens.", labels);
    v.ttft = histogram(reg, "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", kLatency, labels);
    v.tpot = histogram(reg, "vllm:time_per_output_token_seconds", "Histogram of time per output token in seconds.", kPerToken, labels);
    v.e2e = histogram(reg, "vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", kLatency, labels);
    v.queue = histogram(reg, "vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.", kLatency, labels);
    v.prompt_len = histogram(reg, "vllm:request_prompt_tokens", "Number of prefill tokens processed.", kCounts, labels);
    v.generation_len = histogram(reg, "vllm:request_generation_tokens", "Number of generation tokens processed.", kCounts, labels);
    v.running = gauge(reg, "vllm:num_requests_running", "Number of requests in model execution batches.", labels);
    v.waiting = gauge(reg, "vllm:num_requests_waiting", "Number of requests waiting to be processed.", labels);
    // vLLM's V0 name and its V1 name.
    v.kv_usage = {gauge(reg, "vllm:gpu_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", labels),
                  gauge(reg, "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", labels)};
    sets_.push_back(v);
  }
}

Metrics::~Metrics() = default;

void Metrics::set_model_info(const std::string& name, const ModelInfo& info) {
  prometheus::BuildGauge()
      .Name("fineserve_model_info")
      .Help("The served model: name, architecture, quantization and where its quantized weights came from")
      .Register(*registry_)
      .Add({{"model", name},
            {"architecture", info.architecture},
            {"quantization", info.quantization},
            {"source_format", info.source_format}})
      .Set(1);
}

void Metrics::count_request(std::string_view endpoint, int status) {
  for (Set& s : sets_)
    if (s.requests) s.requests->Add({{"endpoint", std::string(endpoint)}, {"status", std::to_string(status)}}).Increment();
}

void Metrics::count_finished(FinishReason reason) {
  for (Set& s : sets_)
    if (s.success) {
      // vLLM's values: "length" or "stop" (an EOS token or a stop string).
      const std::string value = s.success_label == "finished_reason" ? (reason == FinishReason::Length ? "length" : "stop")
                                                                     : std::string(finish_reason_name(reason));
      s.success->Add({{s.success_label, value}}).Increment();
    }
}

void Metrics::count_aborted(std::string_view reason) {
  for (Set& s : sets_)
    if (s.aborted) s.aborted->Add({{"reason", std::string(reason)}}).Increment();
}

void Metrics::observe_request(double queue_s, double ttft_s, double e2e_s, double tpot_s, int prompt_tokens,
                              int generated_tokens) {
  for (Set& s : sets_) {
    s.queue->Observe(queue_s);
    s.ttft->Observe(ttft_s);
    s.e2e->Observe(e2e_s);
    if (tpot_s >= 0) s.tpot->Observe(tpot_s);
    s.prompt_len->Observe(prompt_tokens);
    s.generation_len->Observe(generated_tokens);
  }
}

void Metrics::count_prompt_tokens(int n) {
  for (Set& s : sets_) s.prompt_tokens->Increment(n);
}
void Metrics::count_generated_tokens(int n) {
  for (Set& s : sets_) s.generation_tokens->Increment(n);
}

void Metrics::observe_step(int seqs, int tokens) {
  for (Set& s : sets_) {
    if (s.batch_size) s.batch_size->Observe(seqs);
    if (s.batch_tokens) s.batch_tokens->Observe(tokens);
  }
}

void Metrics::set_engine_state(const EngineStats& e) {
  const double new_preemptions = e.preemptions > preemptions_seen_ ? static_cast<double>(e.preemptions - preemptions_seen_) : 0;
  preemptions_seen_ = std::max(preemptions_seen_, e.preemptions);
  // Prefix cache: the engine's counters are cumulative; add what is new since the last call.
  double new_queries = 0, new_hits = 0;
  if (e.prefix_cache.queries > prefix_cache_seen_.queries) {
    new_queries = static_cast<double>(e.prefix_cache.queries - prefix_cache_seen_.queries);
    new_hits = static_cast<double>(e.prefix_cache.hits - prefix_cache_seen_.hits);
    prefix_cache_seen_ = e.prefix_cache;
  }
  for (Set& s : sets_) {
    s.running->Set(e.running);
    s.waiting->Set(e.waiting);
    for (prometheus::Gauge* g : s.kv_usage) g->Set(e.kv_usage);
    if (s.kv_free_blocks) s.kv_free_blocks->Set(e.free_blocks);
    if (s.kv_total_blocks) s.kv_total_blocks->Set(e.total_blocks);
    if (new_preemptions > 0) s.preemptions->Increment(new_preemptions);
    if (new_queries > 0) {
      s.prefix_cache_queries->Increment(new_queries);
      s.prefix_cache_hits->Increment(new_hits);
    }
  }
}

std::string Metrics::serialize() const {
  return prometheus::TextSerializer().Serialize(registry_->Collect());
}

}  // namespace fineserve
