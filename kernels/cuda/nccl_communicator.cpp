#include "kernels/cuda/nccl_communicator.h"

#include <cuda_runtime.h>
#include <nccl.h>

#include <cstring>
#include <string>
#include <thread>

namespace fineserve {
namespace {

using Clock = std::chrono::steady_clock;

void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw CommError(std::string("NCCL communicator: CUDA error in ") + what + ": " + cudaGetErrorString(e));
}

ncclDataType_t nccl_type(DType t) {
  switch (t) {
    case DType::F32: return ncclFloat32;
    case DType::F16: return ncclFloat16;
    case DType::BF16: return ncclBfloat16;
    case DType::I8: return ncclInt8;
    case DType::U8: return ncclUint8;
    case DType::I32: return ncclInt32;
    case DType::I64: return ncclInt64;
  }
  FS_ASSERT(false, "unknown dtype");
  return ncclFloat32;
}

}  // namespace

struct NcclCommunicator::Impl {
  ncclComm_t comm = nullptr;
  // The legacy default stream: it waits for all earlier work on every blocking stream of the
  // device (the CUDA backend's stream is one), so a collective never reads a buffer a backend
  // kernel is still writing; blocking streams wait for it in turn.
  cudaStream_t stream = cudaStreamLegacy;
  bool aborted = false;
  int device = 0;
  std::chrono::milliseconds timeout{0};
  int* scratch = nullptr;  // [1] device int for barrier()

  // Aborts the communicator and throws: the group cannot be trusted after a failed collective.
  [[noreturn]] void fail(const std::string& what) {
    if (comm && !aborted) ncclCommAbort(comm);
    aborted = true;
    comm = nullptr;
    throw CommError("NCCL communicator: " + what);
  }

  void check(ncclResult_t r, const char* what) {
    if (r != ncclSuccess && r != ncclInProgress) fail(std::string(what) + ": " + ncclGetErrorString(r));
  }

  // Polls until the communicator's pending work (init, or the collective just enqueued on
  // `stream` when `stream_done` is set) completes, fails, or the deadline passes.
  void wait(const char* what, bool stream_done) {
    const auto start = Clock::now();
    const auto deadline = start + timeout;
    for (;;) {
      ncclResult_t async = ncclSuccess;
      const ncclResult_t q = ncclCommGetAsyncError(comm, &async);
      if (q != ncclSuccess) fail(std::string(what) + ": ncclCommGetAsyncError: " + ncclGetErrorString(q));
      if (async != ncclSuccess && async != ncclInProgress)
        fail(std::string(what) + ": " + ncclGetErrorString(async) + " (a peer rank may have died)");
      if (async == ncclSuccess) {
        if (!stream_done) return;
        const cudaError_t e = cudaStreamQuery(stream);
        if (e == cudaSuccess) return;
        if (e != cudaErrorNotReady) fail(std::string(what) + ": " + cudaGetErrorString(e));
      }
      const auto now = Clock::now();
      if (now > deadline)
        fail(std::string(what) + " did not complete within " + std::to_string(timeout.count()) +
             " ms (a peer rank is missing or stuck)");
      // A decode step's all-reduce completes in microseconds, and a sleep costs ~55 us however short
      // it is asked to be (timer slack plus a wake-up): with two all-reduces per layer that alone
      // would add milliseconds per token. So: spin (the queries above are the spin), then yield the
      // core to other threads while still polling; only a wait that is clearly not a collective's
      // (a bootstrap, a peer that is late) sleeps, where 100 us no longer matters.
      const auto waited = now - start;
      if (waited < kSpin) continue;
      if (waited < kYield) std::this_thread::yield();
      else std::this_thread::sleep_for(std::chrono::microseconds(100));
    }
  }
  static constexpr std::chrono::microseconds kSpin{20};
  static constexpr std::chrono::milliseconds kYield{5};

  // Also runs when the constructor throws, so a failed join leaks nothing.
  ~Impl() {
    cudaSetDevice(device);
    // ncclCommFinalize would wait for the peers; a rank that is going away does not.
    if (comm && !aborted) ncclCommAbort(comm);
    if (scratch) cudaFree(scratch);
  }

  void enter() {
    if (aborted) throw CommError("NCCL communicator: used after an earlier failure aborted it");
    check_cuda(cudaSetDevice(device), "cudaSetDevice");
  }
};

NcclCommunicator::NcclCommunicator(const NcclOptions& o) : impl_(std::make_unique<Impl>()), rank_(o.rank), world_(o.world) {
  if (o.world < 1 || o.rank < 0 || o.rank >= o.world)
    throw Error("NCCL: rank " + std::to_string(o.rank) + " is outside a world of " + std::to_string(o.world));
  if (o.unique_id.size() != sizeof(ncclUniqueId))
    throw Error("NCCL: the unique id has " + std::to_string(o.unique_id.size()) + " bytes, expected " +
                std::to_string(sizeof(ncclUniqueId)));
  Impl& m = *impl_;
  m.device = o.device;
  m.timeout = o.timeout;
  check_cuda(cudaSetDevice(o.device), "cudaSetDevice");
  check_cuda(cudaMalloc(reinterpret_cast<void**>(&m.scratch), sizeof(int)), "cudaMalloc");
  ncclUniqueId id;
  std::memcpy(&id, o.unique_id.data(), sizeof(id));
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;  // init and collectives return ncclInProgress; wait() polls with a deadline
  m.check(ncclCommInitRankConfig(&m.comm, o.world, id, o.rank, &config), "ncclCommInitRankConfig");
  m.wait("ncclCommInitRank (joining the group)", false);
}

NcclCommunicator::~NcclCommunicator() = default;

void NcclCommunicator::all_reduce_sum(void* buf, int64_t count, DType dtype) {
  FS_ASSERT(is_float(dtype), "all_reduce_sum: dtype must be F32, F16 or BF16");
  impl_->enter();
  impl_->check(ncclAllReduce(buf, buf, static_cast<size_t>(count), nccl_type(dtype), ncclSum, impl_->comm, impl_->stream),
               "ncclAllReduce");
  impl_->wait("all_reduce_sum", true);
}

void NcclCommunicator::all_gather(const void* send, void* recv, int64_t count, DType dtype) {
  impl_->enter();
  impl_->check(ncclAllGather(send, recv, static_cast<size_t>(count), nccl_type(dtype), impl_->comm, impl_->stream),
               "ncclAllGather");
  impl_->wait("all_gather", true);
}

void NcclCommunicator::broadcast(void* buf, int64_t count, DType dtype, int root) {
  FS_ASSERT(root >= 0 && root < world_);
  impl_->enter();
  impl_->check(ncclBroadcast(buf, buf, static_cast<size_t>(count), nccl_type(dtype), root, impl_->comm, impl_->stream),
               "ncclBroadcast");
  impl_->wait("broadcast", true);
}

void NcclCommunicator::barrier() {
  impl_->enter();
  impl_->check(ncclAllReduce(impl_->scratch, impl_->scratch, 1, ncclInt32, ncclSum, impl_->comm, impl_->stream),
               "ncclAllReduce (barrier)");
  impl_->wait("barrier", true);
}

// ---- the entry points of kernels/communicator.h -------------------------------------------------

std::vector<uint8_t> nccl_unique_id() {
  ncclUniqueId id;
  const ncclResult_t r = ncclGetUniqueId(&id);
  if (r != ncclSuccess) throw Error(std::string("ncclGetUniqueId: ") + ncclGetErrorString(r));
  const auto* p = reinterpret_cast<const uint8_t*>(&id);
  return {p, p + sizeof(id)};
}

std::unique_ptr<Communicator> make_nccl_communicator(const NcclOptions& options) {
  return std::make_unique<NcclCommunicator>(options);
}

bool nccl_built() { return true; }

}  // namespace fineserve
