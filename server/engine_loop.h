// The engine thread: one thread owns the Engine and calls step() in a loop; HTTP handler threads
// submit requests through a mutex + condition-variable queue and receive each request's tokens
// through its own RequestHandle (a small channel with its own lock), so that a slow client never
// stalls the batch.
//
//   EngineLoop loop(engine, {.max_queue = 256, .request_timeout_s = 600}, &metrics);
//   auto h = loop.submit(std::move(request), arrival);   // ApiError 429 / 503
//   for (;;) {
//     RequestHandle::Update u = h->wait(100ms);          // tokens, then Finished or Failed
//     ...                                                // client gone: h->cancel("disconnect")
//   }
//
// A cancelled, timed-out or shut-down request leaves the engine at once, which frees its KV blocks.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "engine/engine.h"
#include "server/api.h"

namespace fineserve {

class Metrics;
class EngineLoop;

using Clock = std::chrono::steady_clock;

struct LoopConfig {
  int max_queue = 256;           // requests waiting for a batch slot (not yet running); more -> 429
  double request_timeout_s = 0;  // > 0: a request unfinished this long after arrival is cancelled
};

// One request's channel between the engine thread (producer) and its HTTP thread (consumer).
class RequestHandle {
 public:
  enum class Phase {
    Queued,    // submitted, not yet handed to the engine
    Admitted,  // in the engine (waiting for a slot or generating)
    Finished,  // generation ended normally, every choice: finish holds why (of the last one)
    Failed,    // rejected by the engine (422), timed out, cancelled by shutdown, or an engine fault
  };
  struct Update {
    Phase phase = Phase::Queued;
    std::vector<TokenEvent> tokens;     // new since the previous wait()
    std::optional<FinishReason> finish;  // Phase::Finished
    std::optional<ApiError> failure;     // Phase::Failed
  };

  // Returns at once when there are new tokens or the phase changed since the previous call;
  // otherwise waits up to `timeout` (then the update carries no tokens and the same phase).
  Update wait(std::chrono::milliseconds timeout);
  // The client is gone: the request leaves the engine and its KV blocks are freed. No-op once the
  // request has ended. `reason` labels fineserve_request_aborted_total.
  void cancel(const std::string& reason = "disconnect");

  int prompt_tokens() const { return static_cast<int>(request_.prompt.size()); }
  // Sequences generated for the request (its n choices); it finishes when all of them did.
  int num_sequences() const { return request_.n; }
  const GenerationRequest& request() const { return request_; }

  RequestHandle(EngineLoop* loop, GenerationRequest request, Clock::time_point arrival, Clock::time_point deadline);

 private:
  friend class EngineLoop;
  bool ended_locked() const { return phase_ == Phase::Finished || phase_ == Phase::Failed; }
  void admit();
  void push(TokenEvent event);
  void fail(ApiError error);

  EngineLoop* loop_;
  GenerationRequest request_;
  Clock::time_point arrival_, deadline_;
  std::string cancel_reason_;  // set under mu_ by cancel()

  // Engine-thread bookkeeping (only the engine thread touches these).
  uint64_t engine_id_ = 0;
  bool scheduled_ = false;
  Clock::time_point scheduled_at_, first_token_at_, last_token_at_;
  int generated_ = 0;           // tokens of all its sequences
  int sequences_running_ = 0;   // its sequences still in the engine

  // Shared state.
  mutable std::mutex mu_;
  std::condition_variable cv_;
  Phase phase_ = Phase::Queued;
  Phase reported_phase_ = Phase::Queued;
  std::vector<TokenEvent> pending_;
  std::optional<FinishReason> finish_;
  std::optional<ApiError> failure_;
  int choices_left_ = 0;  // sequences whose finishing event has not been pushed yet
};

class EngineLoop {
 public:
  // Starts the engine thread. `engine` and `metrics` (may be null) must outlive the loop, and the
  // loop must outlive every RequestHandle's use (stop the HTTP server first).
  EngineLoop(Engine& engine, const LoopConfig& config, Metrics* metrics);
  ~EngineLoop();  // stops the thread; requests still in flight fail with 503
  EngineLoop(const EngineLoop&) = delete;
  EngineLoop& operator=(const EngineLoop&) = delete;

  // Queues a request (already validated and tokenized). Throws ApiError 503 while draining, 429
  // when max_queue requests are already waiting.
  std::shared_ptr<RequestHandle> submit(GenerationRequest request, Clock::time_point arrival = Clock::now());

  // Stops accepting requests (submit -> 503); requests in flight continue.
  void begin_drain();
  bool draining() const { return draining_.load(); }
  // Waits until no request is in flight or `timeout` passed; then fails what is left (503) and
  // returns false. Calls begin_drain() first.
  bool drain(std::chrono::duration<double> timeout);

  // Engine state after the latest step; `waiting` includes requests not yet handed to the engine.
  EngineStats stats() const;
  int in_flight() const;  // requests submitted and not yet ended
  // False once the engine thread has died, or while its last kUnhealthyAfterFailedSteps steps all
  // failed (/health and /ready answer 503 then); `problem` says why.
  static constexpr int kUnhealthyAfterFailedSteps = 3;
  bool healthy(std::string* problem = nullptr) const;
  const Engine& engine() const { return engine_; }
  const LoopConfig& config() const { return config_; }

 private:
  friend class RequestHandle;
  void notify_cancel();  // a handle was flagged: scan the active requests
  void run();
  void admit_all(std::vector<std::shared_ptr<RequestHandle>>& incoming);
  void cancel_flagged();
  void expire_deadlines();
  void step_once();
  void fail_active(const ApiError& error, const std::string& metric_reason);
  void end(uint64_t engine_id);
  void die(const std::string& why);

  Engine& engine_;
  LoopConfig config_;
  Metrics* metrics_;

  mutable std::mutex mu_;
  std::condition_variable cv_;        // wakes the engine thread
  std::condition_variable idle_cv_;   // wakes drain()
  std::vector<std::shared_ptr<RequestHandle>> submitted_;
  size_t in_transit_ = 0;   // taken from submitted_, not yet handed to the engine
  int engine_waiting_ = 0;  // engine stats after the latest iteration
  int in_flight_ = 0;       // active_.size() after the latest iteration
  bool engine_idle_ = true;
  bool stop_ = false;
  bool abort_all_ = false;
  bool cancel_scan_ = false;
  EngineStats stats_;
  std::atomic<bool> draining_{false};
  bool dead_ = false;        // the engine thread ended on an exception (under mu_)
  int failed_steps_ = 0;     // consecutive failed steps (under mu_)
  std::string problem_;      // the latest failure (under mu_)

  // Engine thread only.
  std::unordered_map<uint64_t, std::shared_ptr<RequestHandle>> active_;  // by engine id

  std::thread thread_;
};

}  // namespace fineserve
