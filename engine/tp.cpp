#include "engine/tp.h"

#include <condition_variable>
#include <deque>
#include <algorithm>
#include <exception>
#include <future>
#include <mutex>
#include <thread>

#include "kernels/base.h"
#include "kernels/cpu/cpu_backend.h"
#include "kernels/cpu/inproc_communicator.h"

namespace fineserve {

// ---- message codec ---------------------------------------------------------------------------------
//
// Step:       [1, T, S, max_blocks, L, B, token_ids[T], positions[T], query_start[S+1],
//              context_len[S], block_table[B], logit_rows[L]]
// AllocateKv: [2, num_blocks, block_size]
// Shutdown:   [3]

std::vector<int32_t> encode_tp_message(const TpMessage& m) {
  std::vector<int32_t> w{static_cast<int32_t>(m.kind)};
  switch (m.kind) {
    case TpMessage::Kind::Shutdown: break;
    case TpMessage::Kind::AllocateKv: w.insert(w.end(), {m.num_blocks, m.block_size}); break;
    case TpMessage::Kind::Step: {
      const StepInput& s = m.step;
      FS_ASSERT(s.positions.size() == s.token_ids.size() && s.query_start.size() == s.context_len.size() + 1);
      w.insert(w.end(), {s.n_tokens(), s.n_seqs(), s.max_blocks, static_cast<int32_t>(s.logit_rows.size()),
                         static_cast<int32_t>(s.block_table.size())});
      for (const auto* v : {&s.token_ids, &s.positions, &s.query_start, &s.context_len, &s.block_table, &s.logit_rows})
        w.insert(w.end(), v->begin(), v->end());
      break;
    }
  }
  return w;
}

TpMessage decode_tp_message(const int32_t* w, size_t n) {
  auto bad = [](const std::string& why) { return Error("malformed tensor-parallel message: " + why); };
  if (n < 1) throw bad("empty");
  TpMessage m;
  switch (w[0]) {
    case static_cast<int32_t>(TpMessage::Kind::Shutdown):
      m.kind = TpMessage::Kind::Shutdown;
      if (n != 1) throw bad("trailing words after Shutdown");
      return m;
    case static_cast<int32_t>(TpMessage::Kind::AllocateKv):
      m.kind = TpMessage::Kind::AllocateKv;
      if (n != 3 || w[1] <= 0 || w[2] <= 0) throw bad("AllocateKv needs 2 positive words");
      m.num_blocks = w[1];
      m.block_size = w[2];
      return m;
    case static_cast<int32_t>(TpMessage::Kind::Step): break;
    default: throw bad("unknown kind " + std::to_string(w[0]));
  }
  m.kind = TpMessage::Kind::Step;
  if (n < 6) throw bad("short Step header");
  const int64_t T = w[1], S = w[2], L = w[4], B = w[5];
  if (T < 0 || S < 0 || L < 0 || B < 0 || w[3] < 0) throw bad("negative size");
  if (static_cast<int64_t>(n) != 6 + 2 * T + (S + 1) + S + B + L) throw bad("length does not match the header");
  StepInput& s = m.step;
  s.max_blocks = w[3];
  const int32_t* p = w + 6;
  auto take = [&](std::vector<int32_t>& v, int64_t k) {
    v.assign(p, p + k);
    p += k;
  };
  take(s.token_ids, T);
  take(s.positions, T);
  take(s.query_start, S + 1);
  take(s.context_len, S);
  take(s.block_table, B);
  take(s.logit_rows, L);
  return m;
}

void run_tp_worker(Model& shard, StepReceiver& receiver) {
  for (;;) {
    TpMessage m = receiver.receive();
    switch (m.kind) {
      case TpMessage::Kind::Shutdown: return;
      case TpMessage::Kind::AllocateKv: shard.allocate_kv_cache(m.num_blocks, m.block_size); break;
      case TpMessage::Kind::Step:
        try {
          shard.forward(m.step, nullptr);
        } catch (const CommError&) {
          throw;
        } catch (const Error&) {
          // A step every rank rejects alike (checked before the first collective, e.g. a position
          // past the context): rank 0 reports it to its caller; the group carries on.
        }
        break;
    }
  }
}

// ---- TpModel ------------------------------------------------------------------------------------------

TpModel::TpModel(int world, std::unique_ptr<StepSender> sender, std::unique_ptr<Backend> backend,
                 std::unique_ptr<Model> shard)
    : world_(world), sender_(std::move(sender)), backend_(std::move(backend)), shard_(std::move(shard)) {
  FS_ASSERT(world_ >= 1 && sender_ && shard_);
}

TpModel::~TpModel() {
  if (!failed_.empty()) sender_->abort(failed_);
  sender_->close();
  // The shard uses the group's communicator, which the sender may own: it goes first.
  shard_.reset();
  backend_.reset();
  sender_.reset();
}

void TpModel::fail(const std::string& why) {
  if (failed_.empty()) failed_ = why;
  sender_->abort(why);
}

void TpModel::allocate_kv_cache(int num_blocks, int block_size) {
  if (!failed_.empty()) throw CommError("the tensor-parallel group failed earlier: " + failed_);
  TpMessage m;
  m.kind = TpMessage::Kind::AllocateKv;
  m.num_blocks = num_blocks;
  m.block_size = block_size;
  try {
    sender_->send(encode_tp_message(m));
  } catch (const CommError& e) {
    fail(e.what());
    throw;
  }
  shard_->allocate_kv_cache(num_blocks, block_size);
}

void TpModel::forward(const StepInput& step, float* logits) {
  if (!failed_.empty()) throw CommError("the tensor-parallel group failed earlier: " + failed_);
  TpMessage m;
  m.kind = TpMessage::Kind::Step;
  m.step = step;
  try {
    sender_->send(encode_tp_message(m));
    shard_->forward(step, logits);
  } catch (const CommError& e) {
    fail(e.what());
    throw;
  }
}

// ---- the in-process group -------------------------------------------------------------------------

namespace {

// Ranks 1..N-1 as threads: each loads its shard and runs run_tp_worker on a queue of messages.
class InprocRuntime final : public StepSender {
 public:
  InprocRuntime(int world, std::chrono::milliseconds timeout)
      : group_(world, timeout), queues_(static_cast<size_t>(world)) {}
  ~InprocRuntime() override { close(); }

  Communicator& comm(int rank) { return group_.rank(rank); }

  // Starts ranks 1..N-1; each reports through `loaded` once its shard is loaded (or failed to).
  void start(const std::filesystem::path& path, const InprocTpOptions& o) {
    for (int r = 1; r < group_.world(); ++r) {
      auto loaded = std::make_shared<std::promise<void>>();
      loaded_.push_back(loaded->get_future());
      threads_.emplace_back([this, r, path, o, loaded] { worker(r, path, o, *loaded); });
    }
  }

  // Waits for every worker's load; rethrows the first failure.
  void wait_loaded() {
    for (auto& f : loaded_) f.get();
  }

  void send(const std::vector<int32_t>& words) override {
    if (group_.failed()) throw CommError("the in-process tensor-parallel group has failed");
    auto msg = std::make_shared<const std::vector<int32_t>>(words);
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (size_t r = 1; r < queues_.size(); ++r) queues_[r].push_back(msg);
    }
    cv_.notify_all();
  }

  void abort(const std::string& why) noexcept override { group_.abort(why); }

  void close() noexcept override {
    if (closed_) return;
    closed_ = true;
    send_shutdown();
    for (auto& t : threads_) t.join();
    threads_.clear();
  }

  std::shared_ptr<const std::vector<int32_t>> receive(int rank) {
    std::unique_lock<std::mutex> lock(mu_);
    auto& q = queues_[static_cast<size_t>(rank)];
    cv_.wait(lock, [&] { return !q.empty(); });
    auto msg = q.front();
    q.pop_front();
    return msg;
  }

 private:
  class Receiver final : public StepReceiver {
   public:
    Receiver(InprocRuntime& rt, int rank) : rt_(rt), rank_(rank) {}
    TpMessage receive() override {
      const auto msg = rt_.receive(rank_);
      return decode_tp_message(msg->data(), msg->size());
    }

   private:
    InprocRuntime& rt_;
    int rank_;
  };

  void send_shutdown() noexcept {
    TpMessage m;
    m.kind = TpMessage::Kind::Shutdown;
    auto msg = std::make_shared<const std::vector<int32_t>>(encode_tp_message(m));
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (size_t r = 1; r < queues_.size(); ++r) queues_[r].push_back(msg);
    }
    cv_.notify_all();
  }

  void worker(int rank, const std::filesystem::path& path, const InprocTpOptions& o, std::promise<void>& loaded) {
    bool is_loaded = false;
    try {
      std::unique_ptr<Backend> backend = o.make_backend(rank);
      std::unique_ptr<Model> shard = load_model(path, *backend, {rank, group_.world()}, &group_.rank(rank));
      loaded.set_value();
      is_loaded = true;
      Receiver rx(*this, rank);
      run_tp_worker(*shard, rx);
    } catch (const std::exception& e) {
      // A rank that cannot go on breaks the group: the others must not wait out the timeout.
      group_.abort("tensor-parallel rank " + std::to_string(rank) + " failed: " + e.what());
      if (!is_loaded) loaded.set_exception(std::current_exception());
      drain(rank);
    }
  }

  // A failed worker still consumes its queue until Shutdown, so close() can join it.
  void drain(int rank) {
    for (;;) {
      const auto msg = receive(rank);
      if (msg->size() == 1 && (*msg)[0] == static_cast<int32_t>(TpMessage::Kind::Shutdown)) return;
    }
  }

  InprocGroup group_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::deque<std::shared_ptr<const std::vector<int32_t>>>> queues_;  // [world]; 0 unused
  std::vector<std::thread> threads_;
  std::vector<std::future<void>> loaded_;
  bool closed_ = false;
};

}  // namespace

std::unique_ptr<TpModel> load_model_tp_inproc(const std::filesystem::path& path, const InprocTpOptions& o) {
  if (o.world < 1) throw Error("the tensor-parallel size must be >= 1 (got " + std::to_string(o.world) + ")");
  FS_ASSERT(o.make_backend, "InprocTpOptions.make_backend is required");
  auto rt = std::make_unique<InprocRuntime>(o.world, o.timeout);
  rt->start(path, o);
  std::unique_ptr<Backend> backend;
  std::unique_ptr<Model> shard;
  std::exception_ptr rank0_error;
  try {
    backend = o.make_backend(0);
    shard = load_model(path, *backend, {0, o.world}, &rt->comm(0));
  } catch (...) {
    rank0_error = std::current_exception();
  }
  // Rank 0's error first (every rank usually fails alike); then any worker's.
  if (rank0_error) {
    rt->abort("rank 0 failed to load");
    std::rethrow_exception(rank0_error);  // ~InprocRuntime shuts the workers down
  }
  rt->wait_loaded();
  return std::make_unique<TpModel>(o.world, std::move(rt), std::move(backend), std::move(shard));
}

std::unique_ptr<TpModel> load_model_tp_cpu(const std::filesystem::path& path, int world, std::chrono::milliseconds timeout) {
  InprocTpOptions o;
  o.world = world;
  o.timeout = timeout;
  const int hw = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  const int threads = std::max(1, hw / std::max(1, world));
  o.make_backend = [threads](int) {
    CpuOptions c;
    c.threads = threads;
    return make_cpu_backend(c);
  };
  return load_model_tp_inproc(path, o);
}

}  // namespace fineserve
