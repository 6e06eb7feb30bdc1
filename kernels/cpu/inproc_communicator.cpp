#include "kernels/cpu/inproc_communicator.h"

#include <condition_variable>
#include <cstring>
#include <mutex>

#include "kernels/half.h"

namespace fineserve {

// What each rank said it was doing in the current collective, checked to agree across ranks.
struct Op {
  const char* kind = "";
  int64_t count = 0;
  DType dtype = DType::F32;
  int root = 0;
  bool operator==(const Op& o) const {
    return std::strcmp(kind, o.kind) == 0 && count == o.count && dtype == o.dtype && root == o.root;
  }
};

struct InprocGroup::State {
  int world = 1;
  std::chrono::milliseconds timeout{0};
  mutable std::mutex mu;
  std::condition_variable cv;
  uint64_t generation = 0;        // barriers completed
  int arrived = 0;                // ranks waiting in the current barrier
  std::vector<uint64_t> arrivals;  // [world] barriers each rank has entered
  std::vector<const void*> bufs;   // [world] the buffers published for the current collective
  std::vector<void*> outs;         // [world]
  std::vector<Op> ops;             // [world]
  bool failed = false;
  std::string why;

  void fail_locked(const std::string& reason) {
    if (!failed) {
      failed = true;
      why = reason;
    }
    cv.notify_all();
  }

  // Waits until every rank has arrived at this barrier (caller holds `lock`).
  void arrive(std::unique_lock<std::mutex>& lock, int rank, const char* what) {
    if (failed) throw CommError(why);
    const uint64_t gen = generation;
    ++arrivals[static_cast<size_t>(rank)];
    if (++arrived == world) {
      arrived = 0;
      ++generation;
      cv.notify_all();
      return;
    }
    const bool done = cv.wait_for(lock, timeout, [&] { return generation != gen || failed; });
    if (failed) throw CommError(why);
    if (!done) {
      std::string missing;
      for (int r = 0; r < world; ++r)
        if (arrivals[static_cast<size_t>(r)] <= gen) missing += (missing.empty() ? "" : ", ") + std::to_string(r);
      fail_locked("in-process communicator: rank " + std::to_string(rank) + " waited " +
                  std::to_string(timeout.count()) + " ms in " + what + " for rank(s) " + missing +
                  " that never arrived");
      throw CommError(why);
    }
  }
};

namespace {

float load(const void* p, int64_t i, DType t) {
  switch (t) {
    case DType::F32: return static_cast<const float*>(p)[i];
    case DType::F16: return half_to_float(static_cast<const uint16_t*>(p)[i]);
    case DType::BF16: return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
    default: FS_ASSERT(false, "all_reduce_sum: dtype must be F32, F16 or BF16");
  }
  return 0;
}

void store(void* p, int64_t i, DType t, float v) {
  switch (t) {
    case DType::F32: static_cast<float*>(p)[i] = v; break;
    case DType::F16: static_cast<uint16_t*>(p)[i] = float_to_half(v); break;
    case DType::BF16: static_cast<uint16_t*>(p)[i] = float_to_bf16(v); break;
    default: FS_ASSERT(false, "all_reduce_sum: dtype must be F32, F16 or BF16");
  }
}

class InprocCommunicator final : public Communicator {
 public:
  InprocCommunicator(std::shared_ptr<InprocGroup::State> s, int rank) : s_(std::move(s)), rank_(rank) {}

  int rank() const override { return rank_; }
  int world() const override { return s_->world; }
  std::string name() const override { return "inproc"; }

  void all_reduce_sum(void* buf, int64_t count, DType dtype) override {
    FS_ASSERT(is_float(dtype), "all_reduce_sum: dtype must be F32, F16 or BF16");
    publish({"all_reduce_sum", count, dtype, 0}, buf, buf);
    // This rank owns elements [lo, hi): it sums them over the ranks in rank order and writes the
    // sum into every rank's buffer. Slices are disjoint, so no two threads touch one element.
    const auto [lo, hi] = slice(count);
    const int W = s_->world;
    for (int64_t i = lo; i < hi; ++i) {
      float acc = load(s_->bufs[0], i, dtype);
      for (int r = 1; r < W; ++r) acc += load(s_->bufs[static_cast<size_t>(r)], i, dtype);
      for (int r = 0; r < W; ++r) store(s_->outs[static_cast<size_t>(r)], i, dtype, acc);
    }
    finish("all_reduce_sum");
  }

  void all_gather(const void* send, void* recv, int64_t count, DType dtype) override {
    publish({"all_gather", count, dtype, 0}, send, recv);
    // Every rank fills its own recv; memmove because send may lie inside recv (in place).
    const size_t bytes = static_cast<size_t>(count) * dtype_size(dtype);
    for (int r = 0; r < s_->world; ++r)
      if (bytes) std::memmove(static_cast<char*>(recv) + static_cast<size_t>(r) * bytes, s_->bufs[static_cast<size_t>(r)], bytes);
    finish("all_gather");
  }

  void broadcast(void* buf, int64_t count, DType dtype, int root) override {
    FS_ASSERT(root >= 0 && root < s_->world);
    publish({"broadcast", count, dtype, root}, buf, buf);
    const size_t bytes = static_cast<size_t>(count) * dtype_size(dtype);
    if (rank_ != root && bytes) std::memcpy(buf, s_->bufs[static_cast<size_t>(root)], bytes);
    finish("broadcast");
  }

  void barrier() override {
    std::unique_lock<std::mutex> lock(s_->mu);
    s_->arrive(lock, rank_, "barrier");
  }

 private:
  std::pair<int64_t, int64_t> slice(int64_t count) const {
    const int64_t W = s_->world;
    return {count * rank_ / W, count * (rank_ + 1) / W};
  }

  // Publishes this rank's buffers and waits for every rank to have published theirs.
  void publish(const Op& op, const void* in, void* out) {
    std::unique_lock<std::mutex> lock(s_->mu);
    if (s_->failed) throw CommError(s_->why);
    s_->bufs[static_cast<size_t>(rank_)] = in;
    s_->outs[static_cast<size_t>(rank_)] = out;
    s_->ops[static_cast<size_t>(rank_)] = op;
    s_->arrive(lock, rank_, op.kind);
    FS_ASSERT(s_->ops[static_cast<size_t>(rank_)] == s_->ops[0],
              "ranks called different collectives (or counts, dtypes, roots) at the same point");
  }

  // Waits until every rank is done with everyone's buffers.
  void finish(const char* what) {
    std::unique_lock<std::mutex> lock(s_->mu);
    s_->arrive(lock, rank_, what);
  }

  std::shared_ptr<InprocGroup::State> s_;
  const int rank_;
};

}  // namespace

InprocGroup::InprocGroup(int world, std::chrono::milliseconds timeout) : state_(std::make_shared<State>()) {
  if (world < 1) throw Error("tensor-parallel world size must be >= 1 (got " + std::to_string(world) + ")");
  FS_ASSERT(timeout.count() > 0);
  state_->world = world;
  state_->timeout = timeout;
  state_->arrivals.assign(static_cast<size_t>(world), 0);
  state_->bufs.assign(static_cast<size_t>(world), nullptr);
  state_->outs.assign(static_cast<size_t>(world), nullptr);
  state_->ops.assign(static_cast<size_t>(world), Op{});
  for (int r = 0; r < world; ++r) comms_.push_back(std::make_unique<InprocCommunicator>(state_, r));
}

InprocGroup::~InprocGroup() = default;

int InprocGroup::world() const { return state_->world; }

Communicator& InprocGroup::rank(int r) {
  FS_ASSERT(r >= 0 && r < state_->world);
  return *comms_[static_cast<size_t>(r)];
}

void InprocGroup::abort(const std::string& why) {
  std::lock_guard<std::mutex> lock(state_->mu);
  state_->fail_locked(why);
}

bool InprocGroup::failed() const {
  std::lock_guard<std::mutex> lock(state_->mu);
  return state_->failed;
}

}  // namespace fineserve
