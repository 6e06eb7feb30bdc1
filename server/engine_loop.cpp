#include "server/engine_loop.h"

#include <algorithm>

#include <spdlog/spdlog.h>

#include "kernels/base.h"
#include "server/metrics.h"

namespace fineserve {

// ---- RequestHandle ------------------------------------------------------------------------------

RequestHandle::RequestHandle(EngineLoop* loop, GenerationRequest request, Clock::time_point arrival,
                             Clock::time_point deadline)
    : loop_(loop), request_(std::move(request)), arrival_(arrival), deadline_(deadline), choices_left_(request_.n) {}

RequestHandle::Update RequestHandle::wait(std::chrono::milliseconds timeout) {
  std::unique_lock lk(mu_);
  cv_.wait_for(lk, timeout, [&] { return !pending_.empty() || phase_ != reported_phase_; });
  Update u;
  u.phase = phase_;
  u.tokens.swap(pending_);
  u.finish = finish_;
  u.failure = failure_;
  reported_phase_ = phase_;
  return u;
}

void RequestHandle::cancel(const std::string& reason) {
  std::lock_guard lk(mu_);
  if (ended_locked() || !cancel_reason_.empty()) return;
  cancel_reason_ = reason;
  // Under mu_, so that the loop's destructor (which fails every handle it holds, taking mu_) cannot
  // complete in between: once a handle has ended, loop_ is never touched again.
  loop_->notify_cancel();
}

void RequestHandle::admit() {
  std::lock_guard lk(mu_);
  if (phase_ == Phase::Queued) phase_ = Phase::Admitted;
  cv_.notify_all();
}

void RequestHandle::push(TokenEvent event) {
  std::lock_guard lk(mu_);
  if (ended_locked()) return;
  if (event.finish) {
    finish_ = event.finish;
    if (--choices_left_ == 0) phase_ = Phase::Finished;
  }
  pending_.push_back(std::move(event));
  cv_.notify_all();
}

void RequestHandle::fail(ApiError error) {
  std::lock_guard lk(mu_);
  if (ended_locked()) return;
  failure_ = std::move(error);
  phase_ = Phase::Failed;
  cv_.notify_all();
}

// ---- EngineLoop ---------------------------------------------------------------------------------

EngineLoop::EngineLoop(Engine& engine, const LoopConfig& config, Metrics* metrics)
    : engine_(engine), config_(config), metrics_(metrics) {
  if (config_.max_queue < 1) throw Error("max_queue must be >= 1");
  if (config_.request_timeout_s < 0) throw Error("request_timeout must be >= 0");
  stats_ = engine_.stats();
  thread_ = std::thread([this] {
    try {
      run();
    } catch (const std::exception& e) {
      die(e.what());
    } catch (...) {
      die("unknown exception");
    }
  });
}

EngineLoop::~EngineLoop() {
  {
    std::lock_guard lk(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
  const ApiError gone(503, error_type::kUnavailable, "the server is shutting down");
  for (auto& [id, h] : active_) {
    engine_.cancel(id);
    h->fail(gone);
  }
  for (auto& h : submitted_) h->fail(gone);
}

std::shared_ptr<RequestHandle> EngineLoop::submit(GenerationRequest request, Clock::time_point arrival) {
  const Clock::time_point deadline =
      config_.request_timeout_s > 0
          ? arrival + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(config_.request_timeout_s))
          : Clock::time_point::max();
  auto h = std::make_shared<RequestHandle>(this, std::move(request), arrival, deadline);
  {
    std::lock_guard lk(mu_);
    if (draining_ || stop_) throw ApiError(503, error_type::kUnavailable, "the server is shutting down");
    if (dead_) throw ApiError(500, error_type::kInternal, "the engine has stopped: " + problem_);
    // Requests that will take a free batch slot are not waiting for one: only those beyond the
    // free slots count against max_queue, so a burst admits max_seqs + max_queue requests.
    const size_t pending = submitted_.size() + in_transit_ + static_cast<size_t>(engine_waiting_);
    const auto free_slots = static_cast<size_t>(std::max(0, engine_.config().max_seqs - stats_.running));
    const size_t queued = pending > free_slots ? pending - free_slots : 0;
    if (queued >= static_cast<size_t>(config_.max_queue))
      throw ApiError(429, error_type::kOverloaded,
                     "the server is overloaded: " + std::to_string(queued) + " requests are already waiting");
    submitted_.push_back(h);
  }
  cv_.notify_all();
  return h;
}

void EngineLoop::notify_cancel() {
  {
    std::lock_guard lk(mu_);
    cancel_scan_ = true;
  }
  cv_.notify_all();
}

void EngineLoop::begin_drain() { draining_ = true; }

// The engine thread ends on an exception nothing below caught: fail every request (their
// clients get a 500) and report unhealthy, so that a supervisor restarts the process.
void EngineLoop::die(const std::string& why) {
  spdlog::critical("the engine loop died: {}", why);
  std::vector<std::shared_ptr<RequestHandle>> orphans;
  {
    std::lock_guard lk(mu_);
    problem_ = "the engine loop died: " + why;
    dead_ = true;
    orphans.swap(submitted_);
    in_transit_ = 0;
    in_flight_ = 0;
  }
  const ApiError error(500, error_type::kInternal, "internal error: the engine stopped (" + why + ")");
  for (auto& [id, h] : active_) h->fail(error);
  active_.clear();
  for (auto& h : orphans) h->fail(error);
  idle_cv_.notify_all();
}

bool EngineLoop::healthy(std::string* problem) const {
  std::lock_guard lk(mu_);
  if (dead_) {
    if (problem) *problem = problem_;
    return false;
  }
  if (failed_steps_ >= kUnhealthyAfterFailedSteps) {
    if (problem) *problem = std::to_string(failed_steps_) + " engine steps in a row failed; last: " + problem_;
    return false;
  }
  return true;
}

bool EngineLoop::drain(std::chrono::duration<double> timeout) {
  begin_drain();
  std::unique_lock lk(mu_);
  const bool clean = idle_cv_.wait_for(lk, timeout, [&] { return submitted_.empty() && in_transit_ == 0 && in_flight_ == 0; });
  if (clean) return true;
  abort_all_ = true;
  cv_.notify_all();
  idle_cv_.wait(lk, [&] { return submitted_.empty() && in_transit_ == 0 && in_flight_ == 0; });
  return false;
}

EngineStats EngineLoop::stats() const {
  std::lock_guard lk(mu_);
  EngineStats s = stats_;
  s.waiting += static_cast<int>(submitted_.size() + in_transit_);
  return s;
}

int EngineLoop::in_flight() const {
  std::lock_guard lk(mu_);
  return static_cast<int>(submitted_.size() + in_transit_) + in_flight_;
}

void EngineLoop::run() {
  std::unique_lock lk(mu_);
  while (true) {
    cv_.wait(lk, [&] { return stop_ || abort_all_ || cancel_scan_ || !submitted_.empty() || !engine_idle_; });
    if (stop_) return;
    std::vector<std::shared_ptr<RequestHandle>> incoming;
    incoming.swap(submitted_);
    in_transit_ = incoming.size();
    const bool abort_all = std::exchange(abort_all_, false);
    const bool cancel_scan = std::exchange(cancel_scan_, false);
    lk.unlock();

    admit_all(incoming);
    // The admitted requests now wait in the engine: count them there (until the step below
    // schedules them, they are waiting).
    lk.lock();
    in_transit_ = 0;
    in_flight_ = static_cast<int>(active_.size());
    engine_waiting_ = engine_.stats().waiting;
    stats_.waiting = engine_waiting_;
    lk.unlock();
    if (cancel_scan) cancel_flagged();
    if (abort_all) fail_active(ApiError(503, error_type::kUnavailable, "the server is shutting down"), "shutdown");
    expire_deadlines();
    if (!engine_.idle()) step_once();

    const EngineStats s = engine_.stats();
    if (metrics_) {
      EngineStats shown = s;
      lk.lock();
      shown.waiting += static_cast<int>(submitted_.size());
      lk.unlock();
      metrics_->set_engine_state(shown);
    }
    lk.lock();
    stats_ = s;
    in_transit_ = 0;
    engine_waiting_ = s.waiting;
    in_flight_ = static_cast<int>(active_.size());
    engine_idle_ = engine_.idle();
    if (submitted_.empty() && in_flight_ == 0) idle_cv_.notify_all();
  }
}

void EngineLoop::admit_all(std::vector<std::shared_ptr<RequestHandle>>& incoming) {
  for (auto& h : incoming) {
    std::string cancelled;
    {
      std::lock_guard hl(h->mu_);
      cancelled = h->cancel_reason_;
    }
    if (!cancelled.empty()) {  // the client left before the engine saw the request
      if (metrics_) metrics_->count_aborted(cancelled);
      h->fail(ApiError(499, "cancelled", "the request was cancelled (" + cancelled + ")"));
      continue;
    }
    try {
      h->engine_id_ = engine_.add(h->request_);
    } catch (const Error& e) {
      h->fail(ApiError(422, error_type::kValidation, e.what()));
      continue;
    } catch (const std::exception& e) {
      spdlog::error("engine rejected a request: {}", e.what());
      h->fail(ApiError(500, error_type::kInternal, std::string("internal error: ") + e.what()));
      continue;
    }
    if (metrics_) metrics_->count_prompt_tokens(h->prompt_tokens());
    h->sequences_running_ = h->num_sequences();
    active_[h->engine_id_] = h;
    h->admit();
  }
}

// cancel() only flags its handle (it must not touch the engine): find the flagged ones.
void EngineLoop::cancel_flagged() {
  std::vector<std::pair<std::shared_ptr<RequestHandle>, std::string>> cancels;
  for (auto& [id, h] : active_) {
    std::lock_guard hl(h->mu_);
    if (!h->cancel_reason_.empty()) cancels.emplace_back(h, h->cancel_reason_);
  }
  for (const auto& [h, reason] : cancels) {
    engine_.cancel(h->engine_id_);
    end(h->engine_id_);
    if (metrics_) metrics_->count_aborted(reason);
    h->fail(ApiError(499, "cancelled", "the request was cancelled (" + reason + ")"));
  }
}

void EngineLoop::expire_deadlines() {
  if (config_.request_timeout_s <= 0) return;
  const Clock::time_point now = Clock::now();
  std::vector<uint64_t> expired;
  for (auto& [id, h] : active_)
    if (now >= h->deadline_) expired.push_back(id);
  for (uint64_t id : expired) {
    auto h = active_.at(id);
    engine_.cancel(id);
    end(id);
    if (metrics_) metrics_->count_aborted("timeout");
    h->fail(ApiError(504, error_type::kTimeout,
                     "the request did not finish within the server's request timeout (" +
                         std::to_string(config_.request_timeout_s) + " s)"));
  }
}

void EngineLoop::fail_active(const ApiError& error, const std::string& metric_reason) {
  std::vector<uint64_t> ids;
  for (auto& [id, h] : active_) ids.push_back(id);
  for (uint64_t id : ids) {
    auto h = active_.at(id);
    engine_.cancel(id);
    end(id);
    if (metrics_) metrics_->count_aborted(metric_reason);
    h->fail(error);
  }
}

void EngineLoop::end(uint64_t engine_id) { active_.erase(engine_id); }

void EngineLoop::step_once() {
  std::vector<TokenEvent> events;
  try {
    events = engine_.step();
  } catch (const std::exception& e) {
    // A fault inside a step leaves the batch in an unknown state: fail every request in it and
    // keep serving (the engine frees their blocks on cancel).
    spdlog::error("engine step failed: {}", e.what());
    {
      std::lock_guard lk(mu_);
      ++failed_steps_;
      problem_ = e.what();
    }
    fail_active(ApiError(500, error_type::kInternal, std::string("internal error: ") + e.what()), "error");
    return;
  }
  {
    std::lock_guard lk(mu_);
    failed_steps_ = 0;
  }
  const Clock::time_point now = Clock::now();
  const StepStats& step = engine_.last_step();
  if (metrics_ && step.seqs > 0) metrics_->observe_step(step.seqs, step.tokens);
  for (uint64_t id : step.ids) {
    auto it = active_.find(id);
    if (it != active_.end() && !it->second->scheduled_) {
      it->second->scheduled_ = true;
      it->second->scheduled_at_ = now;
    }
  }
  if (metrics_) {
    const auto generated = std::count_if(events.begin(), events.end(), [](const TokenEvent& e) { return e.token >= 0; });
    if (generated > 0) metrics_->count_generated_tokens(static_cast<int>(generated));
  }
  for (TokenEvent& e : events) {
    auto it = active_.find(e.request_id);
    if (it == active_.end()) continue;
    std::shared_ptr<RequestHandle> h = it->second;
    if (e.token >= 0 && h->generated_++ == 0) h->first_token_at_ = now;
    if (h->generated_ == 0) h->first_token_at_ = now;  // a prompt-only request: its one event
    h->last_token_at_ = now;
    // The request ends with the last of its choices (the engine thread alone counts them here;
    // the handle counts its own under its lock).
    const bool last = e.finish && --h->sequences_running_ == 0;
    // Metrics first: once the client has its last token it may read /metrics at once.
    if (e.finish && metrics_) metrics_->count_finished(*e.finish);
    if (last && metrics_) {
      const auto secs = [](Clock::duration d) { return std::chrono::duration<double>(d).count(); };
      const double tpot = h->generated_ > 1 ? secs(h->last_token_at_ - h->first_token_at_) / (h->generated_ - 1) : -1.0;
      metrics_->observe_request(secs(h->scheduled_at_ - h->arrival_), secs(h->first_token_at_ - h->arrival_),
                                secs(now - h->arrival_), tpot, h->prompt_tokens(), h->generated_);
    }
    if (last) end(h->engine_id_);
    h->push(std::move(e));
  }
}

}  // namespace fineserve
