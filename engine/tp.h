// Tensor parallelism, the engine side (DESIGN: Tensor parallelism): rank 0 runs the scheduler and
// the server; every step's plan (the StepInput) is broadcast to the other ranks, every rank runs
// its shard of the model, and rank 0 returns the logits.
//
// TpModel is that rank-0 view of the group. It implements Model, so the engine and the server do
// not know the model is split:
//
//   engine ──forward(step)──▶ TpModel ──send(step)──▶ StepSender ──▶ ranks 1..N-1: run_tp_worker()
//                               └──▶ shard 0 forward ◀── all-reduces (Communicator) ──┘
//
// Two ways to run a group:
//  - in one process (load_model_tp_inproc): ranks are threads, the collectives are the in-process
//    communicator's and the step plans travel through a queue. The CPU tensor-parallel path
//    (`fineserve generate --tp N --device cpu`, `serve --tp N --device cpu`) and the tests' path.
//  - across processes (engine/tp_net.h): one process per GPU, NCCL collectives, step plans over the
//    TCP control connection that also carried the NCCL bootstrap.
#pragma once

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "kernels/communicator.h"
#include "models/model.h"

namespace fineserve {

// ---- what rank 0 sends the other ranks ------------------------------------------------------------

// One message from rank 0 to the workers, encoded as int32 words (encode_tp_message).
struct TpMessage {
  enum class Kind : int32_t { Step = 1, AllocateKv = 2, Shutdown = 3 };
  Kind kind = Kind::Step;
  StepInput step;      // Step
  int num_blocks = 0;  // AllocateKv
  int block_size = 0;
};

std::vector<int32_t> encode_tp_message(const TpMessage& message);
// Throws fineserve::Error when the words are not a well-formed message.
TpMessage decode_tp_message(const int32_t* words, size_t n);

// Rank 0's end of the plan broadcast.
class StepSender {
 public:
  virtual ~StepSender() = default;
  // Queues `words` (an encoded TpMessage) for every other rank, in order. Throws CommError when
  // the group has lost a rank.
  virtual void send(const std::vector<int32_t>& words) = 0;
  // After a failed step: makes every rank still waiting in a collective give up (in-process: aborts
  // the communicator group). Never throws.
  virtual void abort(const std::string& why) noexcept = 0;
  // Sends Shutdown and waits (bounded) for the other ranks to finish. Never throws.
  virtual void close() noexcept = 0;
};

// A worker's end: blocks until the next message. Throws CommError when rank 0 is gone.
class StepReceiver {
 public:
  virtual ~StepReceiver() = default;
  virtual TpMessage receive() = 0;
};

// The loop of ranks 1..N-1: receives messages and runs them on `shard` until Shutdown (returns).
// An Error from forward() that every rank raises alike (a bad step) is skipped, as rank 0 reports
// it to its caller; a CommError (a collective timed out, a rank died) propagates.
void run_tp_worker(Model& shard, StepReceiver& receiver);

// ---- rank 0's Model ----------------------------------------------------------------------------------

class TpModel final : public Model {
 public:
  // `shard` is rank 0's shard (its collectives on the group's rank-0 communicator); `backend`, if
  // given, is the backend it lives on (owned here so it outlives the shard); `sender` reaches the
  // other ranks and, for an in-process group, owns them.
  TpModel(int world, std::unique_ptr<StepSender> sender, std::unique_ptr<Backend> backend,
          std::unique_ptr<Model> shard);
  ~TpModel() override;

  const ModelInfo& info() const override { return shard_->info(); }
  // Every rank allocates the same number of blocks; each holds only its heads, so this is the
  // size of one block on one rank (the memory budget is per rank, as on one GPU each).
  void allocate_kv_cache(int num_blocks, int block_size) override;
  uint64_t kv_block_bytes(int block_size) const override { return shard_->kv_block_bytes(block_size); }
  void forward(const StepInput& step, float* logits) override;
  int world() const { return world_; }

 private:
  void fail(const std::string& why);
  const int world_;
  std::unique_ptr<StepSender> sender_;
  std::unique_ptr<Backend> backend_;
  std::unique_ptr<Model> shard_;
  std::string failed_;  // non-empty once the group is broken: later calls throw CommError
};

// ---- the in-process group --------------------------------------------------------------------------

struct InprocTpOptions {
  int world = 1;
  // Bounds every collective (a rank that does not arrive makes the others throw CommError).
  std::chrono::milliseconds timeout{std::chrono::minutes(2)};
  // The backend of each rank (e.g. the CPU backend with hardware threads / world OpenMP threads).
  std::function<std::unique_ptr<Backend>(int rank)> make_backend;
};

// Loads the checkpoint as `world` shards, one per thread, with the in-process communicator, and
// returns rank 0's TpModel (world == 1: a TpModel around the whole model). Throws
// fineserve::Error when the model cannot be split (see load_model).
std::unique_ptr<TpModel> load_model_tp_inproc(const std::filesystem::path& path, const InprocTpOptions& options);

// load_model_tp_inproc on CPU backends, the machine's hardware threads shared out among the ranks
// (each rank's OpenMP kernels get hardware_concurrency / world threads, at least 1).
std::unique_ptr<TpModel> load_model_tp_cpu(const std::filesystem::path& path, int world,
                                           std::chrono::milliseconds timeout = std::chrono::minutes(2));

}  // namespace fineserve
