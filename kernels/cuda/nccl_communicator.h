// The NCCL communicator: one rank per GPU, in one process or many (DESIGN: Tensor parallelism).
//
// Rank 0 makes the unique id (nccl_unique_id()), hands it to the other ranks out of band (the TCP
// bootstrap of engine/tp_net.h), and every rank constructs an NcclCommunicator with it.
//
// Nothing here waits forever. The communicator is created non-blocking (ncclConfig_t.blocking = 0)
// and init is polled with ncclCommGetAsyncError against the deadline; every collective is enqueued
// on the stream and then polled (cudaStreamQuery + ncclCommGetAsyncError) until it completes, the
// group reports an error (a peer died, a network failure) or the timeout passes. On error or
// timeout the communicator is aborted (ncclCommAbort) and CommError is thrown; it is unusable
// afterwards. Polling makes every collective synchronous for the calling thread, which is what
// the model's forward wants anyway (the next op reads the all-reduced activations).
//
// Buffers are device memory on the rank's device. Ordering with the backend's kernels: the
// collective runs on the legacy default stream (cudaStreamLegacy), which the CUDA runtime orders
// after all earlier work on the device's blocking streams — the CUDA backend's stream is one
// (cudaStreamCreate) — and before their later work.
#pragma once

#include <memory>

#include "kernels/communicator.h"

namespace fineserve {

class NcclCommunicator final : public Communicator {
 public:
  // Joins the group (collective over all ranks: every rank must construct one with the same id
  // and world before the timeout). Throws CommError on timeout or NCCL error.
  explicit NcclCommunicator(const NcclOptions& options);
  ~NcclCommunicator() override;

  int rank() const override { return rank_; }
  int world() const override { return world_; }
  std::string name() const override { return "nccl"; }
  void all_reduce_sum(void* buf, int64_t count, DType dtype) override;
  void all_gather(const void* send, void* recv, int64_t count, DType dtype) override;
  void broadcast(void* buf, int64_t count, DType dtype, int root) override;
  void barrier() override;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  int rank_ = 0, world_ = 1;
};

}  // namespace fineserve
